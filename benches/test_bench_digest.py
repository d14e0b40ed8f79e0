"""`blkverify digest` against `blksum -c` (blkhash 0.11, reading through the page
cache as we do), side by side on the same images, and both against the machine's
SHA-256 rate on every core, measured in the same run with `openssl speed`.

Each case is one benchmark group with one entry per implementation;
``extra_info["ratio"]`` on our entry is blksum's median over ours, and
``extra_info["cpu_s"]`` each one's median CPU time (user + system). On the fully
allocated raw image, ``extra_info["sha256_share"]`` is our hashing rate (image
bytes over our median) as a share of the machine's. CI runs each once as a smoke
test; measure with ``BLKVERIFY_BENCH_MIB=1024 pytest benches/test_bench_digest.py
--benchmark-enable``.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
from pathlib import Path

import bench_table
import pytest

IMPLEMENTATIONS = ["blksum", "blkverify"]
_medians: dict[str, float] = {}
_digests: dict[str, list[str]] = {}


@pytest.fixture(scope="session")
def sha256_rate() -> float:
    """Bytes per second that SHA-256 hashes 64 KiB buffers on every core at once."""
    return bench_table.sha256_rate(3 if "--benchmark-enable" in sys.argv else 1)


def cpu_seconds() -> float:
    """CPU time of this process's waited-for children (and theirs: blksum's qemu-nbd)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def digest_once(
    impl: str, blksum: Path, image: Path, expected: list[str], cpu: list[float]
) -> None:
    if impl == "blksum":
        argv = [str(blksum), "-c", str(image)]
    else:
        argv = [sys.executable, "-m", "blkverify_rs", "digest", str(image)]
    before = cpu_seconds()
    result = subprocess.run(argv, capture_output=True, text=True, cwd=image.parent)
    cpu.append(cpu_seconds() - before)
    assert result.returncode == 0, result.stderr
    digest = result.stdout.split()[0]
    # Both must print the same digest, whichever ran first.
    if expected:
        assert digest == expected[0]
    expected.append(digest)


def measure(benchmark, group: str, impl: str, blksum: Path, image: Path) -> float | None:
    benchmark.group = group
    benchmark.extra_info["implementation"] = impl
    expected = _digests.setdefault(group, [])
    cpu: list[float] = []
    benchmark.pedantic(
        digest_once, args=(impl, blksum, image, expected, cpu), rounds=3, iterations=1
    )
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: a smoke run
        return None
    # CPU time (user + system) tells the two apart on a busy machine, where wall
    # time mostly measures the scheduler: blksum runs more threads than cores.
    benchmark.extra_info["cpu_s"] = round(statistics.median(cpu), 3)
    median = stats.stats.median
    reference = _medians.get(group)
    if reference is None:
        _medians[group] = median
    else:
        benchmark.extra_info["ratio"] = round(reference / median, 2)
    benchmark.extra_info["loadavg"] = Path("/proc/loadavg").read_text().split()[0]
    return median


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_allocated_raw(benchmark, impl, blksum, allocated_pair, sha256_rate) -> None:
    raw, _ = allocated_pair
    median = measure(benchmark, "digest: fully allocated raw", impl, blksum, raw)
    benchmark.extra_info["machine_sha256_MBps"] = round(sha256_rate / 1e6)
    if median is not None:
        rate = raw.stat().st_size / median
        benchmark.extra_info["MBps"] = round(rate / 1e6)
        benchmark.extra_info["sha256_share"] = round(rate / sha256_rate, 2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_allocated_qcow2(benchmark, impl, blksum, allocated_pair) -> None:
    _, qcow2 = allocated_pair
    measure(benchmark, "digest: the same data as qcow2", impl, blksum, qcow2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_compressed(benchmark, impl, blksum, compressed_pair) -> None:
    _, qcow2, ctype = compressed_pair
    measure(benchmark, f"digest: {ctype}-compressed qcow2, OS-like data", impl, blksum, qcow2)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_sparse(benchmark, impl, blksum, sparse_pair) -> None:
    _, qcow2 = sparse_pair
    measure(
        benchmark, "digest: sparse qcow2 (1 TiB with 1 GiB of data at scale)", impl, blksum, qcow2
    )
