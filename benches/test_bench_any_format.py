"""Whole-image verify of formats other than qcow2-against-raw, ours against
``qemu-img compare`` on the same pair, side by side (one group per case):

- a 2 GiB vmdk against its raw disk (at BLKVERIFY_BENCH_MIB=1024): monolithicSparse
  (random data, every grain allocated) and streamOptimized (OS-like data, every
  grain compressed); the target is at least 2x qemu-img compare;
- qcow2 against qcow2 (both fully allocated, 2 GiB): the target is at least 1.8x.

Run: ``BLKVERIFY_BENCH_MIB=1024 pytest benches/test_bench_any_format.py --benchmark-enable``
(with BLKVERIFY_BENCH_DIR to keep the images between runs).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from test_bench_verify import measure

IMPLEMENTATIONS = ["qemu-img-compare", "blkverify"]


def compare(impl: str, ref: Path, ref_format: str, test: Path, test_format: str) -> None:
    if impl == "blkverify":
        argv = [sys.executable, "-m", "blkverify_rs", "verify", "-q", str(ref), str(test)]
    else:
        argv = ["qemu-img", "compare", "-q", "-f", ref_format, "-F", test_format]
        argv += [str(ref), str(test)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_vmdk_vs_raw(benchmark, impl: str, vmdk_pair: tuple[Path, Path, str]) -> None:
    raw, vmdk, subformat = vmdk_pair
    benchmark.extra_info["size_mib"] = raw.stat().st_size >> 20
    group = f"verify: {subformat} vmdk vs raw"
    measure(benchmark, group, impl, compare, impl, raw, "raw", vmdk, "vmdk")


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_qcow2_vs_qcow2(benchmark, impl: str, qcow2_pair: tuple[Path, Path]) -> None:
    reference, test = qcow2_pair
    benchmark.extra_info["size_mib"] = reference.stat().st_size >> 20
    group = "verify: fully allocated qcow2 vs qcow2"
    measure(benchmark, group, impl, compare, impl, reference, "qcow2", test, "qcow2")
