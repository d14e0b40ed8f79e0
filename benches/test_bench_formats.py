"""Whole-image verify of VHD (``vpc``, dynamic and fixed) and VDI images, ours against
``qemu-img compare``, side by side: the fully allocated random data of
``allocated_pair`` (2 x BLKVERIFY_BENCH_MIB: 2 GiB at 1024) converted into each format.

    BLKVERIFY_BENCH_MIB=1024 pytest benches/test_bench_formats.py --benchmark-enable

``extra_info["ratio"]`` on our entry is ``qemu-img compare``'s median over ours.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import make_images
import pytest

_medians: dict[str, float] = {}


@pytest.fixture(scope="session", params=sorted(make_images.VPC_VDI))
def format_pair(request, allocated_pair: tuple[Path, Path]) -> tuple[Path, Path, str, str]:
    """The allocated raw file and its copy in one format (built once, then kept)."""
    raw, _ = allocated_pair
    mib = raw.stat().st_size >> 20
    _, image = make_images.vpc_vdi_pairs(raw.parent, mib)[request.param]
    return raw, image, make_images.VPC_VDI[request.param][0], request.param


def run_identical(impl: str, raw: Path, image: Path, fmt: str) -> None:
    if impl == "blkverify":
        argv = [
            sys.executable,
            "-m",
            "blkverify_rs",
            "verify",
            "-q",
            "-F",
            fmt,
            str(raw),
            str(image),
        ]
    else:
        argv = ["qemu-img", "compare", "-q", "-f", "raw", "-F", fmt, str(raw), str(image)]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("impl", ["qemu-img-compare", "blkverify"])
def test_allocated_format(benchmark, impl: str, format_pair) -> None:
    raw, image, fmt, name = format_pair
    group = f"verify: fully allocated {name} vs raw"
    benchmark.group = group
    benchmark.extra_info["implementation"] = impl
    benchmark.extra_info["bytes"] = raw.stat().st_size
    benchmark.pedantic(run_identical, args=(impl, raw, image, fmt), rounds=3, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: a smoke run
        return
    median = stats.stats.median
    if group not in _medians:
        _medians[group] = median
    else:
        benchmark.extra_info["ratio"] = round(_medians[group] / median, 2)
