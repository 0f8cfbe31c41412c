"""The docs check: every fenced code block in README.md, docs/*.md and configs/README.md is run here,
covered by a named test, or marked as needing what this check cannot provide (docs/testing.md).

Each block carries one annotation on the line(s) just before it, ``<!-- docs-check: KIND [details] -->``:

- ``run``: run here (``python`` blocks with this interpreter; command blocks as one bash script with
  ``set -e``, ``levante`` being this checkout's CLI, ``.venv/bin/python`` this interpreter, ``/tmp/``
  a private temp dir); must exit 0.
- ``test PATH::NAME [PATH::NAME ...] ["TEXT" ...]``: exercised by those tests; they must exist, and
  their modules must contain the block's distinctive parts: each quoted TEXT (which must be in the
  block too), or without any, for each command line its ``levante`` subcommand words, its ``--flags``
  and the names of the files it names.
- ``output``, ``kubernetes REASON``, ``gpu REASON``, ``manual REASON``.

Inline code spans in prose that start with ``levante `` or ``make `` must appear in a checked block,
in a test module, or in ALLOWED below.
"""

from __future__ import annotations

import ast
import os
import pathlib
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ["README.md", *sorted(f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")), "configs/README.md"]
KINDS = ("run", "test", "output", "kubernetes", "gpu", "manual")
NEEDS_REASON = ("kubernetes", "gpu", "manual")
COMMAND_LANGS = ("", "shell", "console", "sh", "bash")
RUN_TIMEOUT_S = 300

# Inline commands in prose that no checked block or test contains, each with why that is fine.
ALLOWED = {
    "make serve": "the Makefile's serve recipe; its command is checked (test_check_is_documented_where_make_serve_is)",
    "make test": "this suite itself",
    "levante generate | models | bench": "a synopsis; each command is in a checked block",
    "levante client generate | models | health": "a synopsis; needs a running front door (manual blocks)",
    "levante up | down | status": "a synopsis; the commands are in checked blocks",
    "levante bench-tracing": "a measurement that takes minutes (a manual block in docs/benchmarks.md)",
    "levante serve --config configs/mistral-small-4.yaml": "needs two GPUs (a gpu block in docs/gpu.md)",
    "levante client generate --regions NAME=HOST:PORT,...": "a synopsis of the checked README command",
    "levante serve --config FILE": "a synopsis of the checked serve commands",
    "levante up --config FILE": "a synopsis of the checked up command",
    "levante drill --scenario FILE": "a synopsis of the checked drill command",
}

_FENCE = re.compile(r"^(\s*)(```+|~~~+)\s*([\w+-]*)\s*$")
_NOTE = re.compile(r"<!--\s*docs-check:\s*(.*?)\s*-->", re.DOTALL)


@dataclass
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    note: str | None  # the annotation's text, None when there is none
    problems: list[str] = field(default_factory=list)

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def kind(self) -> str:
        return self.note.split(None, 1)[0] if self.note else ""

    @property
    def details(self) -> str:
        parts = (self.note or "").split(None, 1)
        return parts[1] if len(parts) > 1 else ""


def _annotation(lines: list[str], fence: int) -> tuple[str | None, list[str]]:
    """The docs-check comment(s) ending on the non-blank line just before the fence."""
    j = fence - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0 or not lines[j].rstrip().endswith("-->"):
        return None, []
    k = j
    while k >= 0 and "<!--" not in lines[k]:
        k -= 1
    notes = _NOTE.findall("\n".join(lines[k : j + 1]))
    if not notes:
        return None, []
    return " ".join(notes[-1].split()), ([] if len(notes) == 1 else ["more than one docs-check annotation"])


def parse(doc: str) -> tuple[list[Block], list[tuple[int, str]]]:
    """The fenced blocks of one doc, and its inline code spans (line, text) outside them."""
    lines = (ROOT / doc).read_text().split("\n")
    blocks, prose, i = [], [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            prose.append((i + 1, lines[i]))
            i += 1
            continue
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(m.group(2)[0])}{{{len(m.group(2))},}}\s*$", lines[j]):
            j += 1
        indent = len(m.group(1))
        body = "\n".join(line[indent:] if line[:indent].isspace() else line for line in lines[i + 1 : j])
        note, problems = _annotation(lines, i)
        blocks.append(Block(doc, i + 1, m.group(3), body + "\n", note, problems))
        i = j + 1
    spans = []
    text = "\n".join(line for _, line in prose)
    starts = [n for n, _ in prose]
    offsets, pos = [], 0
    for _, line in prose:
        offsets.append(pos)
        pos += len(line) + 1
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = " ".join(m.group(1).split())
        if span.startswith(("levante ", "make ")):
            idx = max(k for k, off in enumerate(offsets) if off <= m.start())
            spans.append((starts[idx], span))
    return blocks, spans


ALL: list[Block] = []
SPANS: list[tuple[str, int, str]] = []
for _doc in DOCS:
    _blocks, _spans = parse(_doc)
    ALL += _blocks
    SPANS += [(_doc, n, s) for n, s in _spans]


def _test_sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "tests").rglob("*.py") if p.name != "test_docs.py"}


def _commands(text: str) -> list[str]:
    """The command lines of a block: continuations joined, comments and blank lines dropped."""
    out, cur = [], ""
    for raw in text.split("\n"):
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        cur += line
        if cur.strip():
            out.append(cur.strip())
        cur = ""
    return out


def distinctive(text: str) -> list[str]:
    """What a test must contain to be said to run these commands: subcommands, flags, file names."""
    want: list[str] = []
    for cmd in _commands(text):
        try:
            words = shlex.split(cmd)
        except ValueError:
            words = cmd.split()
        while words and re.match(r"^\w+=", words[0]):  # VAR=value prefixes
            words.pop(0)
        if words and words[0] == "levante":
            for w in words[1:]:
                if w.startswith("-") or not re.match(r"^[a-z][a-z-]*$", w):
                    break
                want.append(w)
        for w in words:
            if w.startswith("--"):
                want.append(w.split("=", 1)[0])
            for path in re.findall(r"[\w./<>-]+\.(?:ya?ml|json|md)\b", w):
                stem = os.path.splitext(os.path.basename(path))[0]
                if "<" not in stem:
                    want.append(stem)
    return list(dict.fromkeys(want))


def check_note(block: Block, sources: dict[str, str]) -> list[str]:
    """What is wrong with one block's annotation (not running it)."""
    problems = list(block.problems)
    if block.note is None:
        return problems + ["no <!-- docs-check: KIND ... --> annotation on the line(s) just before it"]
    if block.kind not in KINDS:
        return problems + [f"unknown docs-check kind {block.kind!r} (one of {', '.join(KINDS)})"]
    if block.kind in NEEDS_REASON and not block.details:
        problems.append(f"'{block.kind}' needs a reason")
    if block.kind == "run" and block.lang not in ("python", *COMMAND_LANGS):
        problems.append(f"'run' cannot run a {block.lang!r} block")
    if block.kind != "test":
        return problems
    refs = re.findall(r"(\S+\.py)::(\w+)", block.details)
    quoted = re.findall(r'"([^"]+)"', block.details)
    if not refs:
        return problems + ["'test' names no PATH::NAME"]
    text = ""
    for path, name in refs:
        src = sources.get(path)
        if src is None:
            problems.append(f"test module {path} does not exist")
            continue
        try:
            tree = ast.parse(src)
        except SyntaxError as e:
            problems.append(f"test module {path} does not parse: {e}")
            continue
        if not any(isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name for n in tree.body):
            problems.append(f"{path} defines no test {name}")
        text += src
    want = quoted or (distinctive(block.text) if block.lang in COMMAND_LANGS else [])
    if not want:
        problems.append('nothing distinctive to look for: add a "quoted text" from the block to the annotation')
    for q in quoted:
        if q not in block.text:
            problems.append(f"annotation text {q!r} is not in the block any more")
    missing = [w for w in want if w not in text]
    if missing and text:
        problems.append(
            f"{', '.join(p for p, _ in refs)} do(es) not contain {missing}: the doc and the test have drifted apart"
        )
    return problems


def summary() -> str:
    counts = {k: sum(b.kind == k for b in ALL) for k in KINDS}
    return (
        f"docs check: {len(ALL)} snippets in {len(DOCS)} files: {counts['run']} run, "
        f"{counts['test']} covered by tests, {counts['kubernetes']} kubernetes, {counts['gpu']} gpu, "
        f"{counts['output']} output, {counts['manual']} manual; {len(SPANS)} inline commands"
    )


DOCS_CHECK_SUMMARY = summary()  # printed at the end of the session by tests/conftest.py


def test_docs_are_found():
    for doc in DOCS:
        assert (ROOT / doc).is_file(), doc
    assert len(ALL) > 20, "the parser found almost no code blocks"


def test_every_block_is_annotated_and_its_tests_exist():
    sources = _test_sources()
    problems = [f"{b.where}: {p}" for b in ALL for p in check_note(b, sources)]
    assert not problems, "docs check:\n" + "\n".join(problems)


def test_inline_commands_are_checked():
    sources = "\n".join(_test_sources().values())
    checked = "\n".join(" ".join(b.text.split()) for b in ALL if b.kind in ("run", "test"))
    loose = [f"{doc}:{n}: `{s}`" for doc, n, s in SPANS if s not in checked and s not in sources and s not in ALLOWED]
    assert not loose, "inline commands in no checked block, no test and not in ALLOWED:\n" + "\n".join(loose)


def test_allowed_inline_commands_are_still_used():
    used = {s for _, _, s in SPANS}
    assert not set(ALLOWED) - used, f"ALLOWED entries no doc uses any more: {sorted(set(ALLOWED) - used)}"


@pytest.fixture(scope="module")
def shell_env(tmp_path_factory):
    bindir = tmp_path_factory.mktemp("docs-bin")
    wrapper = bindir / "levante"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cluster.cli "$@"\n')
    wrapper.chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    )
    return env


RUNS = [b for b in ALL if b.kind == "run"]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNS, ids=[b.where for b in RUNS])
def test_run_block(block: Block, shell_env, tmp_path):
    text = block.text.replace("/tmp/", f"{tmp_path}/").replace(".venv/bin/python", shlex.quote(sys.executable))
    if block.lang == "python":
        argv = [sys.executable, "-c", text]
    else:
        argv = ["bash", "-c", "set -euo pipefail\n" + text]
    env = dict(shell_env, TMPDIR=str(tmp_path))
    try:
        done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{block.where}: still running after {RUN_TIMEOUT_S}s: {(e.stderr or '')[-2000:]}")
    assert done.returncode == 0, (
        f"{block.where}: exit {done.returncode}\n--- stdout (tail)\n"
        f"{done.stdout[-1500:]}\n--- stderr (tail)\n{done.stderr[-3000:]}"
    )
