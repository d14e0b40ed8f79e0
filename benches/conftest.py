"""Benchmark images, built once per session with QEMU's tools (make_images.py).

Sizes are tiny by default so CI can prove the benchmarks still run (they run
once, untimed, under --benchmark-disable). Set BLKVERIFY_BENCH_MIB to measure
for real, e.g. ``BLKVERIFY_BENCH_MIB=1024 pytest benches --benchmark-enable``,
and BLKVERIFY_BENCH_DIR to reuse images built by ``make_images.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import bench_table
import make_images
import pytest

BENCH_MIB = int(os.environ.get("BLKVERIFY_BENCH_MIB", "4"))


@pytest.fixture(scope="session")
def bench_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    given = os.environ.get("BLKVERIFY_BENCH_DIR")
    return Path(given) if given else tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="session")
def allocated_pair(bench_dir: Path) -> tuple[Path, Path]:
    """A fully allocated qcow2 (64 KiB clusters) and its raw copy."""
    return make_images.full_pair(bench_dir, 2 * BENCH_MIB)


@pytest.fixture(scope="session")
def vhdx_pair(bench_dir: Path) -> tuple[Path, Path]:
    """The same fully allocated data as a dynamic vhdx (qemu-img convert)."""
    return make_images.vhdx_pair(bench_dir, 2 * BENCH_MIB)


@pytest.fixture(scope="session", params=["zlib", "zstd"])
def compressed_pair(request: pytest.FixtureRequest, bench_dir: Path) -> tuple[Path, Path, str]:
    """OS-like data (the files under /usr), compressed into qcow2."""
    raw, qcow2 = make_images.mixed_pair(bench_dir, BENCH_MIB, request.param)
    return raw, qcow2, request.param


@pytest.fixture(scope="session")
def sparse_pair(bench_dir: Path) -> tuple[Path, Path]:
    """BENCH_MIB of data in 64 runs over a disk 1024 times larger (1 TiB at 1024)."""
    return make_images.sparse_pair(bench_dir, BENCH_MIB)


@pytest.fixture(scope="session", params=["monolithicSparse", "streamOptimized"])
def vmdk_pair(request: pytest.FixtureRequest, bench_dir: Path) -> tuple[Path, Path, str]:
    """2 x BENCH_MIB: random data as monolithicSparse, OS-like data as streamOptimized."""
    if request.param == "monolithicSparse":
        raw, vmdk = make_images.vmdk_sparse_pair(bench_dir, 2 * BENCH_MIB)
    else:
        raw, vmdk = make_images.vmdk_stream_pair(bench_dir, 2 * BENCH_MIB)
    return raw, vmdk, request.param


@pytest.fixture(scope="session")
def qcow2_pair(bench_dir: Path) -> tuple[Path, Path]:
    """Two fully allocated qcow2 images (2 x BENCH_MIB) of the same random disk."""
    return make_images.qcow2_qcow2_pair(bench_dir, 2 * BENCH_MIB)


@pytest.fixture(scope="session")
def blksum(request: pytest.FixtureRequest) -> Path:
    """The real blksum (blkhash 0.11), built from source into pytest's cache once."""
    return Path(bench_table.build_blksum(request.config.cache.mkdir("blksum")))
