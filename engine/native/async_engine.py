"""``AsyncEngine``: the engine behind ``EngineClient``, stepping in its own thread.

asyncio callers submit, stream and abort; a single background thread owns
the ``EngineCore`` (nothing else touches it) and hands deltas back to each
caller's event loop. Torch releases the GIL in its kernels, so the event
loop stays responsive while a step runs.

If a step raises (under expert parallelism: a peer rank died, or a
collective timed out after ``parallel.timeout_s``) the engine stops for
good: ``health()`` turns False, every open stream ends with ``abort`` and
new submits fail as ``unavailable``. Shutdown ends open streams the same way.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from engine.core.request import SamplingParams
from engine.native.engine_core import EngineCore
from engine.types import EngineClient, EngineError, EngineInfo, EngineStats, Prompt, RequestDelta, Resume

# What callers put in the engine thread's inbox; only that thread touches the EngineCore.


@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt: Prompt
    params: SamplingParams
    resume: Resume | None
    arrival: float  # time.time() at submit: the wait in the inbox (behind a running step) is queueing too
    loop: asyncio.AbstractEventLoop  # the submitter's, where ``done`` resolves
    done: asyncio.Future  # admitted (None) or refused (the EngineError)

    def resolve(self, error: BaseException | None = None) -> None:
        """From the engine thread: let the submitter's ``await`` return, or raise ``error``."""
        self.loop.call_soon_threadsafe(self._settle, error)

    def _settle(self, error: BaseException | None) -> None:  # on the submitter's loop
        if self.done.done():  # the submitter gave up waiting (cancelled)
            return
        if error is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(error)


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Forget:
    """Abort a request whose submitter gave up during admission, then free its id (``AsyncEngine._forget``)."""

    request_id: str
    loop: asyncio.AbstractEventLoop
    stream: tuple[asyncio.AbstractEventLoop, Any]  # the stand-in that holds the id meanwhile


@dataclass(frozen=True)
class Wake:
    """Nothing to do: wakes a thread blocked on an empty inbox, so it sees it is stopping."""


InboxMessage = AddRequest | AbortRequest | Forget | Wake


class AsyncEngine(EngineClient):
    def __init__(self, core: EngineCore):
        """Drive a built core (``engine.native.builder.build_engine_core``) from a thread started here."""
        self.core = core
        self._inbox: queue.SimpleQueue[InboxMessage] = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stats = self.core.stats()
        self._info = self.core.info()
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="levante-engine", daemon=True)
        self._thread.start()

    # ---- EngineClient --------------------------------------------------------------------------

    async def submit(
        self, request_id: str, prompt: Prompt, params: SamplingParams, resume: Resume | None = None
    ) -> None:
        await self._check_can_take(request_id, self._streams, self._error)
        loop = asyncio.get_running_loop()
        self._streams[request_id] = (loop, asyncio.Queue())
        done: asyncio.Future = loop.create_future()
        self._inbox.put(AddRequest(request_id, prompt, params, resume, time.time(), loop, done))
        try:
            await done  # admission errors (bad prompt, too long) surface here, raised in the caller
        except asyncio.CancelledError:
            # The engine thread may admit it still: end it there (queued behind the add), or it runs on
            # with no one to stop it. Until then a stand-in holds its id and swallows what it sent.
            stand_in = self._streams[request_id] = (loop, _Discard())
            self._inbox.put(Forget(request_id, loop, stand_in))
            raise
        except BaseException:
            self._streams.pop(request_id, None)
            raise

    async def stream(self, request_id: str) -> AsyncIterator[RequestDelta]:
        if request_id not in self._streams:
            raise EngineError("request_id", f"{request_id!r} was not submitted")
        q = self._streams[request_id][1]
        try:
            while True:
                delta: RequestDelta = await q.get()
                yield delta
                if delta.finished:
                    return
        finally:
            self._streams.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(AbortRequest(request_id))

    async def stats(self) -> EngineStats:
        return self._stats

    async def health(self) -> bool:
        return self._thread.is_alive() and self._error is None

    async def info(self) -> EngineInfo:
        return self._info

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(Wake())
        self._thread.join(timeout)

    # ---- the engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                busy = self.core.has_unfinished_requests()
                self._drain_inbox(block=not busy)
                deltas = self.core.step() if self.core.has_unfinished_requests() else []
                self._stats = self.core.stats()  # before delivery: a caller that saw its end sees its blocks freed
                self._dispatch(deltas)
                self.core.keepalive()  # expert-parallel peers wait on us between steps
        except BaseException as e:  # noqa: BLE001 -- a broken engine must fail its streams, not hang them
            self._error = e
        finally:
            self._refuse_pending()
            for rid in list(self._streams):
                self._deliver(RequestDelta(rid, [], finished=True, finish_reason="abort"))
            try:
                self.core.close(peers_ok=self._error is None)  # after a failed collective, peers may not listen
            except BaseException as e:  # noqa: BLE001 - the engine is down either way; keep the first error
                self._error = self._error or e

    def _refuse_pending(self) -> None:
        """Submits still in the inbox when the engine stops: fail them rather than leave callers waiting."""
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(msg, AddRequest):
                msg.resolve(EngineError("engine", f"stopped: {self._error!r}", kind="unavailable"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            msg = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(msg)
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, msg: InboxMessage) -> None:
        if isinstance(msg, AddRequest):
            self._add(msg)
        elif isinstance(msg, AbortRequest):
            delta = self.core.abort_request(msg.request_id)
            if delta is not None:
                self._stats = self.core.stats()
                self._deliver(delta)
        elif isinstance(msg, Forget):
            if self.core.abort_request(msg.request_id) is not None:
                self._stats = self.core.stats()
            # after every delta it sent (the same loop, in order): then the id is free
            msg.loop.call_soon_threadsafe(self._forget, msg)

    def _add(self, msg: AddRequest) -> None:
        try:
            self.core.add_request(msg.request_id, msg.prompt, msg.params, msg.resume, arrival=msg.arrival)
        except Exception as e:  # noqa: BLE001 -- one bad request fails itself, never the engine thread
            msg.resolve(
                e
                if isinstance(e, EngineError)
                else EngineError.from_value_error(e)
                if isinstance(e, ValueError)
                else EngineError("request", f"could not be admitted: {type(e).__name__}: {e}")
            )
            return
        msg.resolve()

    def _forget(self, msg: Forget) -> None:  # on the submitter's loop
        if self._streams.get(msg.request_id) is msg.stream:
            del self._streams[msg.request_id]

    def _dispatch(self, deltas: list[RequestDelta]) -> None:
        """A step's deltas, one hand-off per event loop rather than per request: each wakes a loop."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestDelta]]] = {}
        for d in deltas:
            target = self._streams.get(d.request_id)
            if target is not None:
                by_loop.setdefault(target[0], []).append((target[1], d))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _deliver(self, d: RequestDelta) -> None:
        target = self._streams.get(d.request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, d)


class _Discard:
    """The queue of a request nobody reads any more."""

    def put_nowait(self, item: object) -> None:
        del item


def _put_all(items: list[tuple[asyncio.Queue, RequestDelta]]) -> None:
    for q, d in items:
        q.put_nowait(d)
