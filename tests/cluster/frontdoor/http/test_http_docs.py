"""docs/http.md's (and README's) curl and ``openai`` examples, run as written against a real front door (its
address and model name swapped in; a scripted backend answers)."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import pytest

from ..harness import MODEL, ScriptedBackend, serving

pytestmark = pytest.mark.e2e
DOC = pathlib.Path(__file__).resolve().parents[4] / "docs" / "http.md"
DOC_URL, DOC_MODEL = "http://127.0.0.1:8000", "levante-default"


README = DOC.parents[1] / "README.md"


def blocks(lang: str, doc: pathlib.Path = DOC) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", doc.read_text(), re.MULTILINE | re.DOTALL)


def test_the_docs_curl_and_openai_examples_run_against_a_real_front_door(loop, tmp_path):
    (curl,), (snippet,) = blocks("bash"), blocks("python")
    assert curl in blocks("bash", README) and snippet in blocks("python", README)  # README shows the same two
    assert DOC_URL in curl and DOC_URL in snippet and DOC_MODEL in curl and DOC_MODEL in snippet
    with serving(loop, ScriptedBackend()) as door:

        def here(text: str) -> str:
            return text.replace(DOC_URL, door.http.url).replace(DOC_MODEL, MODEL)

        answer = subprocess.run(["bash", "-c", here(curl)], capture_output=True, text=True, timeout=60, check=True)
        script = tmp_path / "snippet.py"
        script.write_text(here(snippet))
        printed = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert json.loads(answer.stdout)["choices"][0]["message"]["content"] == "hi!"
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == "hi!\n2 tokens\n"
