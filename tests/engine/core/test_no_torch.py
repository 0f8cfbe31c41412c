import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
MODULES = [
    "engine.core",
    "engine.core.request",
    "engine.core.block_pool",
    "engine.core.kv_cache",
    "engine.core.scheduler",
]


def test_core_imports_without_torch() -> None:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in MODULES)
        + "bad = [m for m in ('torch', 'numpy') if m in sys.modules]\n"
        + "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
