"""Benchmark images, built once per session with QEMU's tools.

Sizes are tiny by default so CI can prove the benchmarks still run (they run
once, untimed, under --benchmark-disable). Set BLKVERIFY_BENCH_MIB to measure
for real, e.g. ``BLKVERIFY_BENCH_MIB=2048 pytest benches --benchmark-enable``.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

BENCH_MIB = int(os.environ.get("BLKVERIFY_BENCH_MIB", "8"))


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, stdout=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def allocated_pair(bench_dir: Path) -> tuple[Path, Path]:
    """A fully allocated qcow2 (64 KiB clusters) and its raw copy."""
    raw = bench_dir / "full.raw"
    with open(raw, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(BENCH_MIB):
            f.write(block)
    qcow2 = bench_dir / "full.qcow2"
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2))
    return raw, qcow2


@pytest.fixture(scope="session", params=["zlib", "zstd"])
def compressed_pair(request: pytest.FixtureRequest, bench_dir: Path) -> tuple[Path, Path, str]:
    """OS-like data (text, code, zeros, random), compressed into qcow2."""
    raw = bench_dir / "mixed.raw"
    if not raw.exists():
        text = b"".join(b"line %d of a config file: key=value\n" % i for i in range(30000))
        with open(raw, "wb") as f:
            for i in range(BENCH_MIB):
                kind = i % 4
                if kind == 0:
                    f.write(os.urandom(1 << 20))
                elif kind == 3:
                    f.write(bytes(1 << 20))
                else:
                    f.write((text * 2)[: 1 << 20])
    ctype = request.param
    qcow2 = bench_dir / f"mixed-{ctype}.qcow2"
    sh(
        "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
        "-o", f"compression_type={ctype}", str(raw), str(qcow2),
    )  # fmt: skip
    return raw, qcow2, ctype
