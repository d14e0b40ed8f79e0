"""Whole-image verify, ours against ``qemu-img compare``, side by side; and
4 KiB reads through the Python API against ``qemu-img bench``.

Each case is one benchmark group with one entry per implementation, so
pytest-benchmark prints them as a table; ``extra_info["ratio"]`` on our entry is
the reference's median over ours (set when the reference ran first in the
group). CI runs each once as a smoke test.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

IMPLEMENTATIONS = ["qemu-img-compare", "blkverify"]
READS = 20000 if "--benchmark-enable" in sys.argv else 200
_medians: dict[str, float] = {}


def command(impl: str, raw: Path, test: Path) -> list[str]:
    if impl == "blkverify":
        return [sys.executable, "-m", "blkverify_rs", "verify", "-q", str(raw), str(test)]
    fmt = test.suffix[1:]  # qcow2, vhdx
    return ["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(raw), str(test)]


def run_identical(impl: str, raw: Path, test: Path) -> None:
    result = subprocess.run(command(impl, raw, test), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def measure(benchmark, group: str, impl: str, target, *args) -> None:
    benchmark.group = group
    benchmark.extra_info["implementation"] = impl
    benchmark.pedantic(target, args=args, rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: a smoke run
        return
    median = stats.stats.median
    reference = _medians.get(group)
    if reference is None:
        _medians[group] = median
    else:
        benchmark.extra_info["ratio"] = round(reference / median, 2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_allocated(benchmark, impl: str, allocated_pair: tuple[Path, Path]) -> None:
    raw, qcow2 = allocated_pair
    measure(
        benchmark, "verify: fully allocated qcow2 vs raw", impl, run_identical, impl, raw, qcow2
    )


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_allocated_vhdx(benchmark, impl: str, vhdx_pair: tuple[Path, Path]) -> None:
    raw, vhdx = vhdx_pair
    measure(benchmark, "verify: fully allocated vhdx vs raw", impl, run_identical, impl, raw, vhdx)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compressed(benchmark, impl: str, compressed_pair: tuple[Path, Path, str]) -> None:
    raw, qcow2, ctype = compressed_pair
    group = f"verify: {ctype}-compressed qcow2 vs raw"
    measure(benchmark, group, impl, run_identical, impl, raw, qcow2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sparse(benchmark, impl: str, sparse_pair: tuple[Path, Path]) -> None:
    raw, qcow2 = sparse_pair
    measure(benchmark, "verify: sparse raw vs qcow2", impl, run_identical, impl, raw, qcow2)


def python_reads(path: Path, count: int) -> None:
    import blkverify_rs as bv

    with bv.open(path) as img:
        read = img.read
        end = img.size - 4096
        offset = 0
        for _ in range(count):
            read(offset, 4096)
            offset = offset + 4096 if offset < end else 0


def qemu_bench_reads(path: Path, count: int) -> None:
    subprocess.run(
        ["qemu-img", "bench", "-f", "qcow2", "-c", str(count), "-d", "1", "-s", "4k", str(path)],
        check=True,
        capture_output=True,
    )


@pytest.mark.parametrize("impl", ["qemu-img-bench", "blkverify-python"])
def test_4k_reads(benchmark, impl: str, allocated_pair: tuple[Path, Path]) -> None:
    """Sequential 4 KiB reads of one qcow2: the per-call overhead of the Python
    API (the mirrored device's version is added with the device)."""
    _, qcow2 = allocated_pair
    target = python_reads if impl == "blkverify-python" else qemu_bench_reads
    benchmark.extra_info["reads"] = READS
    measure(benchmark, "4 KiB reads", impl, target, qcow2, READS)
