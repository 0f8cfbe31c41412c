"""Rank 0 tells ranks 1.. what to run: ``StepBroadcaster`` sends, ``StepReceiver`` receives.

A header goes out as an all-reduce (rank 0 contributes it, the others
zeros) rather than a broadcast: every rank must take part, so a header is
also an acknowledgement, and rank 0 learns of a dead or stuck peer at its
next message (a step, or a keepalive while idle) instead of only inside a
forward. The step payload follows as a plain broadcast.
"""

from __future__ import annotations

import time

import torch

from engine.native.parallel.group import ExpertGroup
from engine.native.parallel.wire import (
    HEADER_LEN,
    Hello,
    Kind,
    header,
    pack_step,
    payload_len,
    step_header,
    unpack_step,
)
from engine.native.runner import StepInputs


class PeerMismatchError(RuntimeError):
    """The ranks of a group did not load the same model."""


def _exchange_header(group: ExpertGroup, values: list[int] | None) -> list[int]:
    """Rank 0 passes the header, ranks 1.. pass None; all return rank 0's header."""
    t = (
        torch.tensor(values, dtype=torch.int64, device=group.device)
        if values is not None
        else torch.zeros(HEADER_LEN, dtype=torch.int64, device=group.device)
    )
    return group.all_reduce_sum(t).tolist()


def _check_same_model(group: ExpertGroup, mismatch: str | None) -> None:
    """Every rank says whether its model differs from rank 0's; all raise if any does."""
    flag = torch.tensor([int(mismatch is not None)], dtype=torch.int64, device=group.device)
    if group.all_reduce_max(flag).item():
        raise PeerMismatchError(mismatch or "an expert-parallel rank loaded a different model than rank 0")


class StepBroadcaster:
    """Rank 0's side; the runner's ``StepSink``. Ranks 1.. wait between steps, so an idle rank 0
    sends a keepalive every ``timeout_s / 4`` (their wait is bounded by ``timeout_s`` too)."""

    def __init__(self, group: ExpertGroup):
        self.group = group
        self.keepalive_interval_s = group.parallel.timeout_s / 4
        self._last_sent = time.monotonic()

    def hello(self, hello: Hello) -> None:
        self._send_header(hello.header())
        _check_same_model(self.group, None)

    def send(self, inputs: StepInputs) -> None:
        head = step_header(inputs)
        self._send_header(head)
        self.group.broadcast_from_driver(pack_step(inputs, head[3], self.group.device))

    def keepalive(self) -> None:
        """Cheap to call every loop turn: sends only when nothing went out for a while."""
        if time.monotonic() - self._last_sent >= self.keepalive_interval_s:
            self._send_header(header(Kind.KEEPALIVE))

    def stop(self) -> None:
        self._send_header(header(Kind.STOP))

    def _send_header(self, values: list[int]) -> None:
        _exchange_header(self.group, values)
        self._last_sent = time.monotonic()


class StepReceiver:
    """The side of ranks 1..: the hello, then steps until rank 0 says stop."""

    def __init__(self, group: ExpertGroup):
        self.group = group

    def hello(self, vocab_size: int, num_expert_params: int) -> Hello:
        """Rank 0's hello, after checking that this rank loaded the same model (raises otherwise)."""
        head = _exchange_header(self.group, None)
        if head[0] != Kind.HELLO:
            raise RuntimeError(f"expected a hello from rank 0, got message kind {head[0]}")
        hello = Hello.of(head)
        mismatch = None
        if (hello.vocab_size, hello.num_expert_params) != (vocab_size, num_expert_params):
            mismatch = (
                f"rank {self.group.rank} loaded a model with vocab_size={vocab_size} and "
                f"{num_expert_params} routed-expert params; rank 0 has vocab_size={hello.vocab_size} "
                f"and {hello.num_expert_params}"
            )
        _check_same_model(self.group, mismatch)
        return hello

    def recv(self) -> StepInputs | None:
        """The next step's inputs (keepalives are absorbed), or None when rank 0 stops the group."""
        while True:
            head = _exchange_header(self.group, None)
            kind = head[0]
            if kind == Kind.STEP:
                payload = torch.empty(payload_len(head), dtype=torch.int64, device=self.group.device)
                return unpack_step(head, self.group.broadcast_from_driver(payload))
            if kind == Kind.STOP:
                return None
            if kind != Kind.KEEPALIVE:
                raise RuntimeError(f"unexpected message kind {kind} from rank 0")
