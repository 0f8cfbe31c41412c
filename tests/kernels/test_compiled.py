"""Our C kernels' build: compiled once into the user's cache, and a failing compiler named with nothing left."""

from __future__ import annotations

import logging
import shutil

import pytest

from kernels import compiled
from kernels.attention import decode
from kernels.linear import panels as linear_panels
from kernels.linear import vnni
from kernels.moe import panels as moe_panels
from kernels.norm import rms

KERNELS = [vnni.KERNEL, decode.KERNEL, linear_panels.KERNEL, moe_panels.KERNEL, rms.KERNEL]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.source.parent.parent.name}/{k.source.name}")
def test_each_source_compiles_where_the_cpu_has_its_instructions(kernel, monkeypatch, tmp_path):
    """A source that stops compiling fails here, not as kernel tests skipped for a machine that cannot."""
    cc = shutil.which("cc")
    if cc is None or not set(kernel.cpu_flags) <= compiled.cpu_flags():
        pytest.skip(f"no cc, or the CPU lacks {kernel.cpu_flags}: {kernel.source.name} cannot build here")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compiled.build(kernel, cc).exists()


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.source.parent.parent.name}/{k.source.name}")
def test_the_library_is_built_once_into_the_users_cache(kernel, monkeypatch, tmp_path):
    if compiled.load(kernel) is None:
        pytest.skip(f"this machine cannot build {kernel.source.name}: see the warning above")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = compiled.build(kernel, "cc")
    assert built.parent == tmp_path / "levante" / "kernels" and built.exists()
    stamp = built.stat().st_mtime_ns
    assert compiled.build(kernel, "cc") == built and built.stat().st_mtime_ns == stamp  # found, not compiled again
    assert [p.name for p in built.parent.iterdir()] == [built.name]  # no temporary file left


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: f"{k.source.parent.parent.name}/{k.source.name}")
def test_a_compiler_that_fails_is_named(kernel, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    monkeypatch.setattr(compiled, "cpu_flags", lambda: set(kernel.cpu_flags))
    monkeypatch.setattr(compiled.platform, "machine", lambda: "x86_64")
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        assert compiled.load(kernel) is None
    assert f"{kernel.name} off" in caplog.text and "false -O3" in caplog.text and "failed" in caplog.text
    assert list((tmp_path / "levante" / "kernels").iterdir()) == []  # the failed build's file removed


def test_a_cpu_without_the_instructions_is_named(monkeypatch, caplog):
    monkeypatch.setattr(compiled, "cpu_flags", lambda: {"avx2", "fma"})
    with caplog.at_level(logging.WARNING, logger=compiled.__name__):
        assert compiled.load(decode.KERNEL) is None
    assert "the C decode attention off" in caplog.text and "avx512f" in caplog.text
