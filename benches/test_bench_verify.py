"""Whole-image verify, ours against ``qemu-img compare``, side by side.

Each case is one benchmark group with one entry per implementation, so
pytest-benchmark prints them as a table. CI runs each once as a smoke test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

IMPLEMENTATIONS = ["blkverify", "qemu-img-compare"]


def command(impl: str, raw: Path, test: Path) -> list[str]:
    if impl == "blkverify":
        return [sys.executable, "-m", "blkverify_rs", "verify", "-q", str(raw), str(test)]
    return ["qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", str(raw), str(test)]


def run_identical(impl: str, raw: Path, test: Path) -> None:
    result = subprocess.run(command(impl, raw, test), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_allocated(benchmark, impl: str, allocated_pair: tuple[Path, Path]) -> None:
    raw, qcow2 = allocated_pair
    benchmark.group = "verify: fully allocated qcow2 vs raw"
    benchmark.extra_info["bytes"] = raw.stat().st_size
    benchmark.pedantic(run_identical, args=(impl, raw, qcow2), rounds=3, iterations=1)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compressed(benchmark, impl: str, compressed_pair: tuple[Path, Path, str]) -> None:
    raw, qcow2, ctype = compressed_pair
    benchmark.group = f"verify: {ctype}-compressed qcow2 vs raw"
    benchmark.extra_info["bytes"] = raw.stat().st_size
    benchmark.pedantic(run_identical, args=(impl, raw, qcow2), rounds=3, iterations=1)
