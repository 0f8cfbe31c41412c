"""Reasoning depth as plain functions: explicit efforts capped by the tenant, AUTO by prompt, deadline and load.

No Ray, no I/O, no clock: callers pass in times and loads, so every rule is a
table-driven unit test. The replica router and the in-process ``LocalBackend``
both call these.
"""

from __future__ import annotations

import dataclasses
import re
from functools import lru_cache
from typing import Any

from cluster.config import AutoEffortConfig
from cluster.types import AUTO, EFFORTS, Decision, GenerateRequest, Prompt

# -- reasoning depth ---------------------------------------------------------


def decide_effort(
    requested: str,
    max_effort: str,
    prompt_text: str,
    prompt_chars: int,
    deadline_s: float | None,
    queue_delay_s: float,
    cfg: AutoEffortConfig,
) -> Decision:
    """The effort one request runs at, and why, in words a person can read.

    ``requested`` is the caller's ``reasoning_effort`` (one of EFFORTS or
    ``"auto"``); ``max_effort`` the tenant's ceiling; ``deadline_s`` the
    seconds left until the request's deadline (None: none), computed by the
    caller from its own clock; ``queue_delay_s`` the current queueing delay.

    AUTO starts at ``cfg.default``; reasoning keywords raise it to at least
    ``keyword_effort`` and a long prompt to at least ``long_prompt_effort``
    (cues only ever deepen). Then a deadline too short for the effort
    (``min_deadline_s``) steps it down until it fits, and load steps it down
    one level (queue delay >= ``degrade_queue_delay_s``) or to none
    (>= ``none_queue_delay_s``): depth degrades before requests queue.
    Finally the tenant's ``max_effort`` caps it.

    An explicit effort is honoured as asked, capped only by ``max_effort``:
    neither load nor the deadline lowers it, because a caller who named a
    depth wants that depth (or a clear failure), not a silently shallower
    answer. Raises ValueError("reasoning_effort: ...") for an unknown effort.
    """
    if requested not in EFFORTS and requested != AUTO:
        raise ValueError(f"reasoning_effort: must be one of {EFFORTS + (AUTO,)}, got {requested!r}")
    if max_effort not in EFFORTS:
        raise ValueError(f"max_effort: must be one of {EFFORTS}, got {max_effort!r}")
    if requested != AUTO:
        return _capped(requested, max_effort, [f"requested {requested}"])

    effort, steps = _effort_from_cues(prompt_text, prompt_chars, cfg)
    effort = _effort_within_deadline(effort, deadline_s, cfg, steps)
    effort = _effort_under_load(effort, queue_delay_s, cfg, steps)
    return _capped(effort, max_effort, ["auto: " + steps[0], *steps[1:]])


def _effort_from_cues(prompt_text: str, prompt_chars: int, cfg: AutoEffortConfig) -> tuple[str, list[str]]:
    """AUTO's starting effort: the default, deepened by reasoning keywords and a long prompt; and why."""
    effort = cfg.default
    steps: list[str] = []
    keyword = find_keyword(prompt_text, cfg.keywords)
    if keyword is not None and _deeper(cfg.keyword_effort, effort):
        effort = cfg.keyword_effort
        steps.append(f"prompt asks for reasoning ({keyword!r}) -> {effort}")
    if prompt_chars >= cfg.long_prompt_chars and _deeper(cfg.long_prompt_effort, effort):
        effort = cfg.long_prompt_effort
        steps.append(f"long prompt ({prompt_chars} chars >= {cfg.long_prompt_chars}) -> {effort}")
    if not steps:
        steps.append(f"no reasoning cues -> {effort}")
    return effort, steps


def _effort_within_deadline(effort: str, deadline_s: float | None, cfg: AutoEffortConfig, steps: list[str]) -> str:
    """The deepest effort up to ``effort`` whose ``min_deadline_s`` the deadline leaves; a step if lowered."""
    if deadline_s is None:
        return effort
    fitting = effort
    while fitting != "none" and deadline_s < cfg.min_deadline_s.get(fitting, 0.0):
        fitting = EFFORTS[EFFORTS.index(fitting) - 1]
    if fitting != effort:
        steps.append(
            f"deadline in {deadline_s:.1f}s < {cfg.min_deadline_s.get(effort, 0.0):g}s needed for {effort} -> {fitting}"
        )
    return fitting


def _effort_under_load(effort: str, queue_delay_s: float, cfg: AutoEffortConfig, steps: list[str]) -> str:
    """One level shallower past ``degrade_queue_delay_s``, none past ``none_queue_delay_s``; a step if lowered."""
    if effort == "none":
        return effort
    if queue_delay_s >= cfg.none_queue_delay_s:
        steps.append(f"queue delay {queue_delay_s:.1f}s >= {cfg.none_queue_delay_s:g}s -> none")
        return "none"
    if queue_delay_s >= cfg.degrade_queue_delay_s:
        effort = EFFORTS[EFFORTS.index(effort) - 1]
        steps.append(f"queue delay {queue_delay_s:.1f}s >= {cfg.degrade_queue_delay_s:g}s -> {effort}")
    return effort


def decide_for(request: GenerateRequest, queue_delay_s: float, cfg: AutoEffortConfig, now: float) -> Decision:
    """``decide_effort`` with its inputs taken from a request: the one way every backend does it.

    ``now`` is ``time.time()`` (deadlines are wall-clock); a token-id prompt counts ~4 characters a token.
    """
    text = render_prompt(request.prompt)
    chars = len(text) if text else 4 * len(request.prompt)
    deadline_s = None if request.deadline is None else max(0.0, request.deadline - now)
    return decide_effort(request.reasoning_effort, request.max_effort, text, chars, deadline_s, queue_delay_s, cfg)


def find_keyword(text: str, keywords: tuple[str, ...]) -> str | None:
    """The first of ``keywords`` found in ``text`` as whole words, case-insensitively.

    Whole words so that "improve" does not match "prove" nor "reasonable"
    "reason"; a phrase matches across any whitespace ("step  by\\nstep").
    """
    for keyword in keywords:
        if _keyword_pattern(keyword).search(text):
            return keyword
    return None


@lru_cache(maxsize=256)
def _keyword_pattern(keyword: str) -> re.Pattern[str]:
    words = [re.escape(w) for w in keyword.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", re.IGNORECASE)


def _deeper(a: str, b: str) -> bool:
    return EFFORTS.index(a) > EFFORTS.index(b)


def within_ceiling(request: GenerateRequest) -> GenerateRequest:
    """The request with an explicit effort capped at its tenant's ceiling (before it leaves the region,
    whose tenant the next region does not know); AUTO is decided where it is served."""
    effort = request.reasoning_effort
    if effort in EFFORTS and request.max_effort in EFFORTS and _deeper(effort, request.max_effort):
        return dataclasses.replace(request, reasoning_effort=request.max_effort)
    return request


def lowest_effort(effort: str, ceiling: str | None) -> str:
    """The shallower of ``effort`` and ``ceiling`` (None: no ceiling)."""
    return effort if ceiling is None or not _deeper(effort, ceiling) else ceiling


def _capped(effort: str, max_effort: str, steps: list[str]) -> Decision:
    if _deeper(effort, max_effort):
        steps.append(f"capped at tenant max_effort {max_effort}")
        effort = max_effort
    return Decision(effort=effort, reason="; ".join(steps))


def render_prompt(prompt: Prompt) -> str:
    """The text of a prompt: itself, or chat messages as "role: content" lines; "" for token ids."""
    if isinstance(prompt, str):
        return prompt
    if prompt and isinstance(prompt[0], dict):
        return "\n".join(f"{m.get('role', '')}: {_content_text(m.get('content'))}" for m in prompt)
    return ""


def _content_text(content: Any) -> str:
    return content if isinstance(content, str) else "" if content is None else str(content)
