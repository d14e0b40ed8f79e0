"""``blkverify serve`` side by side with QEMU's blkverify under ``qemu-nbd`` and
with ``qemu-nbd`` serving the test image alone (issue 21): fio's nbd engine
(4 KiB randrw 70/30, verify=crc32c, queue depth 1 and 8) and ``qemu-img
convert -n`` of a fully allocated random image into each server, on fresh
images every round. The helpers are benches/bench_serve.py's, which runs the
same cases in interleaved rounds for BENCHMARKS.md; here each group is one
pytest-benchmark table.

    BLKVERIFY_BENCH_MIB=1024 pytest benches/test_bench_serve.py --benchmark-enable

``extra_info`` has the ops/s fio reports (or the seconds convert took), serve's
peak RSS, the load average and the command. Every serve round is checked for
honest work: its summary's bytes, on both sides, equal what the client moved.
Without ``--benchmark-enable`` (CI) the sizes are tiny and each case runs once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import bench_serve
import make_images
import pytest
from conftest import BENCH_MIB

OPS = 60_000 if "--benchmark-enable" in sys.argv else 500


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("depth", [1, 8])
@pytest.mark.parametrize("impl", bench_serve.IMPLS)
def test_fio_randrw_through_each_server(
    benchmark, tmp_path: Path, impl: str, depth: int, fmt: str
) -> None:
    samples: list[dict] = []

    def run() -> None:
        samples.append(bench_serve.fio_case(tmp_path, impl, fmt, depth, OPS, BENCH_MIB))

    benchmark.group = f"fio 4 KiB randrw 70/30 verify=crc32c, QD{depth}, test side {fmt}"
    benchmark.pedantic(run, rounds=3 if OPS > 500 else 1, iterations=1)
    ops = sorted(s["ops_per_s"] for s in samples)[len(samples) // 2]
    assert all(s["error"] == 0 for s in samples)
    benchmark.extra_info.update(
        implementation=impl,
        ops=OPS,
        ops_per_s=round(ops),
        peak_rss_kib=max(s["peak_rss_kib"] or 0 for s in samples),
        loadavg=os.getloadavg(),
        command=" ".join(bench_serve.fio_argv("URI", depth, OPS, BENCH_MIB)),
    )


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
@pytest.mark.parametrize("impl", bench_serve.IMPLS)
def test_convert_into_each_server(
    benchmark, bench_dir: Path, tmp_path: Path, impl: str, fmt: str
) -> None:
    _, source = make_images.full_pair(bench_dir, 2 * BENCH_MIB)
    samples: list[dict] = []

    def run() -> None:
        samples.append(bench_serve.convert_case(tmp_path, impl, fmt, source))

    benchmark.group = f"qemu-img convert -n of {2 * BENCH_MIB} MiB of random data, test side {fmt}"
    benchmark.pedantic(run, rounds=3 if OPS > 500 else 1, iterations=1)
    benchmark.extra_info.update(
        implementation=impl,
        peak_rss_kib=max(s["peak_rss_kib"] or 0 for s in samples),
        loadavg=os.getloadavg(),
        command=f"qemu-img convert -n -f qcow2 -O raw {source.name} URI",
    )


def test_serve_catches_a_planted_corruption(tmp_path: Path) -> None:
    """The control: the same fio run on a test side that differs at one byte of
    every MiB is stopped by serve's finding."""
    result = bench_serve.control_case(tmp_path, OPS, BENCH_MIB)
    assert result["findings"] >= 1
