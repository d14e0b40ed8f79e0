"""The allocation map: ``blkverify map --json`` against ``qemu-img map
--output=json``, side by side, on a 1 TiB sparse qcow2 and on the fully
allocated benchmark image; and the HTML page of a 1 TiB sparse image with
100,000 findings (no QEMU peer draws one), whose size lands in ``extra_info``.
The issue's bound: under 5 MB in under 2 s.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MiB = 1 << 20
TiB = 1 << 40
FINDINGS = 100_000
# blkverify-api is bv.map in this process: the map without Python's start-up.
IMPLEMENTATIONS = ["qemu-img-map", "blkverify", "blkverify-api"]
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def terabyte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1 TiB qcow2 (64 KiB clusters) with data at a few places."""
    path = tmp_path_factory.mktemp("map") / "tera.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1T"], check=True)
    writes = [f"write -P {i + 1} {i * (TiB // 64)} 1M" for i in range(64)]
    argv = ["qemu-io", "-f", "qcow2", *(x for w in writes for x in ("-c", w)), str(path)]
    subprocess.run(argv, check=True, capture_output=True)
    return path


def command(impl: str, image: Path) -> list[str]:
    if impl == "blkverify":
        return [sys.executable, "-m", "blkverify_rs", "map", "--json", str(image)]
    return ["qemu-img", "map", "--output=json", str(image)]


def run_map(impl: str, image: Path) -> None:
    if impl == "blkverify-api":
        import blkverify_rs as bv

        assert bv.map(image)
        return
    result = subprocess.run(command(impl, image), capture_output=True, text=True)
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
def test_map_terabyte(benchmark, impl: str, terabyte: Path) -> None:
    measure(benchmark, "map: 1 TiB sparse qcow2", impl, run_map, impl, terabyte)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_map_allocated(benchmark, impl: str, allocated_pair: tuple[Path, Path]) -> None:
    _raw, qcow2 = allocated_pair
    measure(benchmark, "map: fully allocated qcow2", impl, run_map, impl, qcow2)


def test_html_terabyte_100000_findings(benchmark, terabyte: Path, tmp_path: Path) -> None:
    import blkverify_rs as bv

    # One-sector runs a MiB apart: 100,000 of them over the first 100 GiB.
    mismatches = [
        bv.Mismatch(sector=i * 2048, offset=i * MiB, length=512, first_byte=i * MiB + 7)
        for i in range(FINDINGS)
    ]
    report = bv.Report(
        raw="reference.raw", test=str(terabyte), raw_format="raw", test_format="qcow2",
        virtual_size=TiB, raw_size=TiB, test_size=TiB, identical=False,
        bytes_compared=TiB, bytes_read=0, elapsed_s=1.0, truncated=False,
        mismatches=mismatches,
    )  # fmt: skip
    out = tmp_path / "page.html"
    benchmark.group = "map --html: 1 TiB sparse qcow2, 100,000 findings"
    benchmark.extra_info["implementation"] = "blkverify"
    benchmark.pedantic(report.to_html, args=(out,), rounds=3, iterations=1)
    benchmark.extra_info["page_bytes"] = out.stat().st_size
    assert out.stat().st_size < 5 * MiB
