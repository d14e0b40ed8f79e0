"""One 4 KiB read through the mirrored device (two reads and a compare), against
the same read of a single image, on warm page-cache images. Measured only with
``pytest benches --benchmark-enable``; CI runs each once as a smoke test."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import blkverify_rs as bv
import pytest


@pytest.fixture(scope="module")
def device_pair(bench_dir: Path) -> tuple[Path, Path]:
    raw = bench_dir / "device-raw.img"
    test = bench_dir / "device-test.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 16M", str(raw)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(test)], check=True
    )
    raw_test = bench_dir / "device-test.raw"
    shutil.copyfile(raw, raw_test)
    return raw, test


@pytest.mark.parametrize("target", ["device-qcow2", "device-raw", "image-qcow2"])
def test_read_4k(benchmark, target: str, device_pair: tuple[Path, Path]) -> None:
    raw, test = device_pair
    if target == "device-qcow2":
        handle = bv.open(raw=raw, test=test)
    elif target == "device-raw":
        handle = bv.open(raw=raw, test=raw.parent / "device-test.raw")
    else:
        handle = bv.open(test)
    benchmark.group = "one 4 KiB read"
    with handle:
        buf = bytearray(4096)
        benchmark(handle.readinto, 8 * 4096, buf)
        assert bytes(buf) == b"\x5a" * 4096
