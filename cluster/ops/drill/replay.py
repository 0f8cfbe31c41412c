"""The replay check: every successful stream again, same prompt, parameters and seed, with no fault;
a resumed stream must equal it token for token."""

from __future__ import annotations

import asyncio
import difflib

from cluster.ops.drill.load import LoadRunner
from cluster.ops.drill.records import RequestRecord


def compare(received: list[int], replay: list[int]) -> tuple[int, int]:
    """(duplicated, lost): tokens received that the replay does not have, and replay tokens not received."""
    duplicated = lost = 0
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(a=received, b=replay, autojunk=False).get_opcodes():
        if op in ("replace", "insert", "delete"):
            duplicated += a1 - a0
            lost += b1 - b0
    return duplicated, lost


async def replay_check(load: LoadRunner, records: list[RequestRecord], concurrency: int) -> tuple[int, list[str]]:
    """Fills duplicated_tokens / lost_tokens of every OK record; returns how many were checked, and
    the replays that failed (each id with its error), whose records stay unchecked."""
    todo = [r for r in records if r.ok]
    gate = asyncio.Semaphore(concurrency)
    failed: list[str] = []

    async def one(record: RequestRecord) -> None:
        i = int(record.id.rsplit("-", 1)[1])
        async with gate:
            tokens: list[int] = []
            last = None
            async for chunk in load.client.generate(
                load.spec.prompt,
                effort=load.spec.effort,
                request_id=f"replay-{i}",
                timeout_s=load.spec.request_timeout_s,
                **load.params(i),
            ):
                tokens.extend(chunk.token_ids)
                last = chunk
        if last is not None and last.error is None:
            record.duplicated_tokens, record.lost_tokens = compare(record.tokens, tokens)
        else:
            failed.append(f"replay-{i}: {last.error.message if last is not None else 'no chunk'}")

    await asyncio.gather(*(one(r) for r in todo))
    return sum(r.replay_checked for r in todo), failed
