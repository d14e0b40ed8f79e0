"""Shared fixtures for the blkverify-rs test suite.

All test images are made with the real QEMU tools (``qemu-img``/``qemu-io``); the expected guest
contents of every image is what ``qemu-img convert -O raw`` produces for it.  Hand-made bytes are
only used to damage real images (see :func:`patch_header`).
"""

from __future__ import annotations

import json
import random
import resource
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

KiB = 1024
MiB = 1024 * KiB

T = TypeVar("T")

QCOW2_MAGIC = b"QFI\xfb"

# Incompatible feature bits of the qcow2 header.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4


# --------------------------------------------------------------------------------------------
# subprocess helpers
# --------------------------------------------------------------------------------------------


def _no_core() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run(cmd, cwd=None, check=True) -> subprocess.CompletedProcess:
    """Run ``cmd`` (a list) without a shell; raise with the output if it fails and ``check``."""
    argv = [str(c) for c in cmd]
    proc = subprocess.run(
        argv,
        cwd=None if cwd is None else str(cwd),
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_no_core,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"command failed ({proc.returncode}): {argv}\nstdout:\n{proc.stdout}\n"
            f"stderr:\n{proc.stderr}"
        )
    return proc


def run_cli(*args) -> subprocess.CompletedProcess:
    """Run the blkverify CLI as ``python -m blkverify_rs ARGS``."""
    return subprocess.run(
        [sys.executable, "-m", "blkverify_rs", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def qemu_img(*args, cwd=None) -> subprocess.CompletedProcess:
    return run(["qemu-img", *args], cwd=cwd)


def qemu_io(
    img, *cmds: str, fmt: str = "qcow2", cwd=None, check=True
) -> subprocess.CompletedProcess:
    argv: list = ["qemu-io", "-f", fmt]
    for c in cmds:
        argv += ["-c", c]
    argv.append(img)
    proc = run(argv, cwd=cwd, check=check)
    if check and ("failed" in proc.stdout or "failed" in proc.stderr):
        raise RuntimeError(f"qemu-io reported a failure: {argv}\n{proc.stdout}\n{proc.stderr}")
    return proc


def qemu_map(img, fmt: str | None = None, cwd=None) -> list:
    argv: list = ["map", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    argv.append(img)
    return json.loads(qemu_img(*argv, cwd=cwd).stdout)


def convert_to_raw(img, out, fmt: str | None = None, snapshot: str | None = None) -> None:
    argv: list = ["convert"]
    if fmt:
        argv += ["-f", fmt]
    if snapshot is not None:
        key = "snapshot.id" if snapshot.isdigit() else "snapshot.name"
        argv += ["-l", f"{key}={snapshot}"]
    argv += ["-O", "raw", img, out]
    qemu_img(*argv)


# --------------------------------------------------------------------------------------------
# qcow2 header / metadata helpers (for damaging real images and for locating clusters)
# --------------------------------------------------------------------------------------------

HEADER_FIELDS = {
    # name: (struct format, offset)
    "magic": ("4s", 0),
    "version": (">I", 4),
    "backing_file_offset": (">Q", 8),
    "backing_file_size": (">I", 16),
    "cluster_bits": (">I", 20),
    "size": (">Q", 24),
    "crypt_method": (">I", 32),
    "l1_size": (">I", 36),
    "l1_table_offset": (">Q", 40),
    "refcount_table_offset": (">Q", 48),
    "refcount_table_clusters": (">I", 56),
    "nb_snapshots": (">I", 60),
    "snapshots_offset": (">Q", 64),
    "incompatible_features": (">Q", 72),
    "compatible_features": (">Q", 80),
    "autoclear_features": (">Q", 88),
    "refcount_order": (">I", 96),
    "header_length": (">I", 100),
}


def read_header(path) -> dict:
    data = Path(path).read_bytes()[:112]
    hdr = {}
    for name, (fmt, off) in HEADER_FIELDS.items():
        if off + struct.calcsize(fmt) <= len(data):
            hdr[name] = struct.unpack_from(fmt, data, off)[0]
    if hdr.get("version") == 2:  # the v2 header ends at byte 72
        hdr = {k: v for k, v in hdr.items() if HEADER_FIELDS[k][1] < 72}
        hdr["incompatible_features"] = 0
    return hdr


def patch_header(path, field: str, value) -> None:
    fmt, off = HEADER_FIELDS[field]
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(struct.pack(fmt, value))


def flip_byte(path, offset: int, mask: int = 0xFF) -> None:
    """XOR the byte at ``offset`` of ``path`` with ``mask`` (in place)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        assert len(b) == 1, f"offset {offset} is past the end of {path}"
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def l2_geometry(path) -> tuple:
    """Return (cluster_size, l2_entries, extended_l2) of a qcow2 image."""
    hdr = read_header(path)
    cs = 1 << hdr["cluster_bits"]
    ext = bool(hdr["incompatible_features"] & INCOMPAT_EXTL2)
    return cs, cs // (16 if ext else 8), ext


def expected_indices(path, guest_offset: int) -> dict:
    """The L1/L2/subcluster indices qcow2 uses for ``guest_offset``."""
    cs, n, ext = l2_geometry(path)
    cluster = guest_offset // cs
    return {
        "l1_index": cluster // n,
        "l2_index": cluster % n,
        "subcluster": (guest_offset % cs) // (cs // 32) if ext else None,
    }


def compressed_clusters(path) -> list:
    """List (guest_offset, host_offset, max_len) for every compressed cluster of a qcow2 image.

    Walks the L1/L2 tables of a real image (standard, non-extended L2 entries only).
    """
    hdr = read_header(path)
    cb = hdr["cluster_bits"]
    cs = 1 << cb
    ext = bool(hdr["incompatible_features"] & INCOMPAT_EXTL2)
    assert not ext
    n = cs // 8
    x = 62 - (cb - 8)
    data = Path(path).read_bytes()
    l1_off = hdr["l1_table_offset"]
    out = []
    for i in range(hdr["l1_size"]):
        l1e = struct.unpack_from(">Q", data, l1_off + 8 * i)[0]
        l2_off = l1e & 0x00FFFFFFFFFFFE00
        if not l2_off:
            continue
        for j in range(n):
            e = struct.unpack_from(">Q", data, l2_off + 8 * j)[0]
            if e & (1 << 62):
                host = e & ((1 << x) - 1)
                nsect = ((e >> x) & ((1 << (62 - x)) - 1)) + 1
                out.append(((i * n + j) * cs, host, nsect * 512 - (host % 512)))
    return out


def l1_entry_offset(path, guest_offset: int) -> int:
    """File offset of the L1 entry that maps ``guest_offset``."""
    hdr = read_header(path)
    _cs, n, _ext = l2_geometry(path)
    return hdr["l1_table_offset"] + 8 * (guest_offset // (1 << hdr["cluster_bits"]) // n)


def l2_entry_offset(path, guest_offset: int) -> int:
    """File offset of the (first 64 bits of the) L2 entry that maps ``guest_offset``."""
    cs, n, ext = l2_geometry(path)
    with open(path, "rb") as f:
        f.seek(l1_entry_offset(path, guest_offset))
        l2_off = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
    assert l2_off, f"no L2 table for {guest_offset} in {path}"
    return l2_off + (16 if ext else 8) * ((guest_offset // cs) % n)


# --------------------------------------------------------------------------------------------
# the image zoo
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooImage:
    name: str
    path: Path  # the image under test
    fmt: str  # "raw" or "qcow2"
    expected: Path  # `qemu-img convert -O raw` of ``path`` (at ``snapshot``)
    size: int  # virtual size
    snapshot: str | None = None
    data_file: Path | None = None  # external data file (qcow2 data_file=...)
    chain: tuple = ()  # backing files, depth 1, 2, ...

    @property
    def dir(self) -> Path:
        return self.path.parent

    def relocated(self, new_dir: Path) -> ZooImage:
        """The same entry with its image files (not the reference) moved to ``new_dir``."""

        def move(p):
            if p is None:
                return None
            return new_dir / p.name if p.parent == self.dir else p

        return ZooImage(
            name=self.name,
            path=move(self.path),
            fmt=self.fmt,
            expected=self.expected,  # the reference is never modified in place: share it
            size=self.size,
            snapshot=self.snapshot,
            data_file=move(self.data_file),
            chain=tuple(move(p) for p in self.chain),
        )


class Resources:
    """Seeded data files used as ``qemu-io write -s`` sources."""

    def __init__(self, root: Path):
        self.root = root
        rng = random.Random(0xB1C)
        self.rnd = []
        for i in range(4):
            p = root / f"random{i}.bin"
            p.write_bytes(rng.randbytes(160 * KiB))
            self.rnd.append(p)
        words = [
            b"qcow2",
            b"cluster",
            b"sector",
            b"refcount",
            b"backing",
            b"snapshot",
            b"the",
            b"of",
            b"and",
            b"block",
            b"\n",
        ]
        text = b" ".join(rng.choice(words) for _ in range(200_000))
        self.text = root / "text.bin"
        self.text.write_bytes(text[: 1 * MiB])


def standard_writes(size: int, res: Resources) -> list:
    """qemu-io commands: aligned and unaligned writes of patterns and random data, with holes."""
    half = size // 2
    return [
        "write -P 0xab 0 64k",
        f"write -s {res.rnd[0]} 70000 70001",
        f"write -P 0xcd {256 * KiB + 1000} 5000",
        f"write -P 0x42 {1 * MiB - 100} 200",
        f"write -s {res.rnd[1]} {half + 7} 100000",
        f"write -s {res.rnd[2]} {2 * MiB - 777} 1554",
        f"write -P 0x17 {half + 300 * KiB} 512",
        f"write -P 0xee {size - 3000} 3000",
    ]


def _new_qcow2(d: Path, name: str, size, *opts: str, backing=None, backing_fmt=None) -> Path:
    argv: list = ["create", "-f", "qcow2"]
    if opts:
        argv += ["-o", ",".join(opts)]
    if backing is not None:
        argv += ["-b", backing, "-F", backing_fmt]
    argv += [name, size]
    qemu_img(*argv, cwd=d)
    return d / name


def _entry(name, path, fmt, size, snapshot=None, data_file=None, chain=()) -> ZooImage:
    expected = path.parent / f"{path.name}.{snapshot or 'current'}.expected.raw"
    convert_to_raw(path, expected, fmt=fmt, snapshot=snapshot)
    assert expected.stat().st_size == size
    return ZooImage(name, path, fmt, expected, size, snapshot, data_file, tuple(chain))


def build_raw(d: Path, res: Resources) -> dict:
    size = 4 * MiB
    p = d / "plain.raw"
    qemu_img("create", "-f", "raw", p, size)
    qemu_io(p, *standard_writes(size, res), "write -P 0x00 128k 4k", fmt="raw")
    return {"raw": _entry("raw", p, "raw", size)}


def build_raw_sparse(d: Path, res: Resources) -> dict:
    size = 8 * MiB
    p = d / "sparse.raw"
    qemu_img("create", "-f", "raw", p, size)
    qemu_io(
        p,
        "write -P 0x01 0 512",
        f"write -s {res.rnd[3]} {3 * MiB + 3} 1000",
        f"write -P 0x7f {size - 512} 512",
        fmt="raw",
    )
    return {"raw_sparse": _entry("raw_sparse", p, "raw", size)}


def _qcow2_with_writes(d, res, name, size, *opts, extra=()) -> dict:
    p = _new_qcow2(d, f"{name}.qcow2", size, *opts)
    qemu_io(p, *standard_writes(size, res), *extra)
    return {name: _entry(name, p, "qcow2", size)}


def build_c512(d, res):
    return _qcow2_with_writes(d, res, "qcow2_c512", 2 * MiB + 64 * KiB, "cluster_size=512")


def build_c4k(d, res):
    return _qcow2_with_writes(d, res, "qcow2_c4k", 4 * MiB, "cluster_size=4k")


def build_c64k(d, res):
    return _qcow2_with_writes(d, res, "qcow2_c64k", 4 * MiB, "cluster_size=64k")


def build_c2m(d, res):
    return _qcow2_with_writes(
        d, res, "qcow2_c2m", 16 * MiB, "cluster_size=2M", extra=[f"write -P 0x2a {9 * MiB} 4k"]
    )


def build_v2(d, res):
    return _qcow2_with_writes(d, res, "qcow2_v2", 4 * MiB, "compat=0.10", "cluster_size=4k")


def build_refcount1(d, res):
    return _qcow2_with_writes(d, res, "qcow2_refcount1", 4 * MiB, "refcount_bits=1")


def build_refcount64(d, res):
    return _qcow2_with_writes(d, res, "qcow2_refcount64", 4 * MiB, "refcount_bits=64")


def build_zero_plain(d, res):
    # write -z on never-allocated clusters: zero clusters without a host offset
    return _qcow2_with_writes(
        d,
        res,
        "qcow2_zero_plain",
        4 * MiB,
        "cluster_size=4k",
        extra=[f"write -z {3 * MiB} 64k", f"write -z {3 * MiB + 128 * KiB} 4k"],
    )


def build_zero_alloc(d, res):
    # data first, then write -z without -u: zero flag on a cluster that keeps its host offset
    return _qcow2_with_writes(
        d,
        res,
        "qcow2_zero_alloc",
        4 * MiB,
        "cluster_size=4k",
        extra=[
            f"write -P 0x99 {3 * MiB} 64k",
            f"write -z {3 * MiB} 32k",
            "write -z 8k 4k",
        ],
    )


def _mixed_source(d: Path, res: Resources) -> Path:
    src = d / "mixed-source.raw"
    qemu_img("create", "-f", "raw", src, 4 * MiB)
    qemu_io(
        src,
        f"write -s {res.text} 0 {1 * MiB}",
        f"write -s {res.rnd[0]} {1 * MiB} {160 * KiB}",
        "write -P 0x5c 1280k 256k",
        f"write -s {res.text} {2 * MiB + 100} 300000",
        f"write -s {res.rnd[1]} {3 * MiB + 5} 70000",
        f"write -P 0x01 {4 * MiB - 4 * KiB} 4k",
        fmt="raw",
    )
    return src


def _build_compressed(d, res, name, ctype):
    src = _mixed_source(d, res)
    p = d / f"{name}.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", f"compression_type={ctype}", src, p)
    return {name: _entry(name, p, "qcow2", 4 * MiB)}


def build_zlib(d, res):
    return _build_compressed(d, res, "qcow2_zlib", "zlib")


def build_zstd(d, res):
    return _build_compressed(d, res, "qcow2_zstd", "zstd")


def build_zlib_c512(d, res):
    # 512-byte clusters: the compressed descriptor has a 1-bit sector count
    src = _mixed_source(d, res)
    p = d / "qcow2_zlib_c512.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", src, p)
    return {"qcow2_zlib_c512": _entry("qcow2_zlib_c512", p, "qcow2", 4 * MiB)}


def build_zstd_c2m(d, res):
    # 2 MiB clusters: widest compressed sector-count field
    src = _mixed_source(d, res)
    p = d / "qcow2_zstd_c2m.qcow2"
    qemu_img(
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        "cluster_size=2M,compression_type=zstd",
        src,
        p,
    )
    return {"qcow2_zstd_c2m": _entry("qcow2_zstd_c2m", p, "qcow2", 4 * MiB)}


def build_zlib_extl2(d, res):
    src = _mixed_source(d, res)
    p = d / "qcow2_zlib_extl2.qcow2"
    qemu_img(
        "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "extended_l2=on,cluster_size=32k", src, p
    )
    # normal and zero subclusters next to the compressed clusters
    qemu_io(p, f"write -P 0x6e {3 * MiB + 1 * KiB} 1k", f"write -z {1 * MiB + 2 * KiB} 1k")
    return {"qcow2_zlib_extl2": _entry("qcow2_zlib_extl2", p, "qcow2", 4 * MiB)}


def build_chain_compressed(d, res):
    src = _mixed_source(d, res)
    base = d / "compressed-base.qcow2"
    qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4k", src, base)
    top = _new_qcow2(d, "over-compressed.qcow2", 4 * MiB, backing=base.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x7a 100000 5000", f"write -z {2 * MiB} 64k")
    return {
        "chain_over_compressed": _entry(
            "chain_over_compressed", top, "qcow2", 4 * MiB, chain=[base]
        )
    }


def build_extl2_c16k(d, res):
    # the smallest extended-L2 cluster size: 512-byte subclusters
    return _qcow2_with_writes(
        d,
        res,
        "qcow2_extl2_c16k",
        4 * MiB,
        "extended_l2=on",
        "cluster_size=16k",
        extra=[f"write -z {256 * KiB + 1000} 3000", f"write -P 0x1d {3 * MiB + 1536} 512"],
    )


def build_chain_v2(d, res):
    size = 4 * MiB
    base = _new_qcow2(d, "v2-base.qcow2", size, "compat=0.10")
    qemu_io(base, *standard_writes(size, res))
    top = _new_qcow2(d, "v2-top.qcow2", size, "compat=0.10", backing=base.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x2b 300k 100k", f"write -P 0x2c {size - 1000} 1000")
    return {"chain_v2": _entry("chain_v2", top, "qcow2", size, chain=[base])}


def build_bitmap(d, res):
    # a persistent dirty bitmap: bitmaps header extension + autoclear bit
    size = 4 * MiB
    p = _new_qcow2(d, "bitmap.qcow2", size)
    qemu_img("bitmap", "--add", p, "bitmap0")
    qemu_io(p, *standard_writes(size, res))
    assert read_header(p)["autoclear_features"] & 1
    return {"qcow2_bitmap": _entry("qcow2_bitmap", p, "qcow2", size)}


def build_prealloc(d, res):
    size = 4 * MiB
    p = _new_qcow2(d, "prealloc.qcow2", size, "preallocation=metadata", "cluster_size=16k")
    qemu_io(p, *standard_writes(size, res))
    return {"qcow2_prealloc_metadata": _entry("qcow2_prealloc_metadata", p, "qcow2", size)}


def build_write_c(d, res):
    return _qcow2_with_writes(
        d,
        res,
        "qcow2_write_c",
        4 * MiB,
        "cluster_size=64k",
        extra=[
            f"write -c -s {res.text} {3 * MiB} 64k",
            f"write -c -P 0x3c {3 * MiB + 64 * KiB} 64k",
            # partial overwrite of a compressed cluster turns it into a normal one
            f"write -c -s {res.text} {3 * MiB + 192 * KiB} 64k",
            f"write -P 0x4d {3 * MiB + 200 * KiB} 1000",
        ],
    )


def build_extl2(d, res):
    return _qcow2_with_writes(
        d,
        res,
        "qcow2_extl2",
        4 * MiB,
        "extended_l2=on",
        "cluster_size=64k",
        extra=[
            f"write -P 0x61 {3 * MiB + 2 * KiB} 2k",
            f"write -s {res.rnd[3]} {3 * MiB + 8 * KiB} 4k",
            f"write -P 0x62 {3 * MiB + 30 * KiB} 2k",
            f"write -z {3 * MiB + 8 * KiB} 2k",
            f"write -z {3 * MiB + 64 * KiB} 2k",
        ],
    )


def build_extl2_backing(d, res):
    size = 2 * MiB
    base = _new_qcow2(d, "extl2-base.qcow2", size)
    qemu_io(base, f"write -s {res.rnd[0]} 0 160k", "write -P 0x3b 160k 1888k")
    top = _new_qcow2(
        d,
        "extl2-top.qcow2",
        size,
        "extended_l2=on",
        "cluster_size=64k",
        backing=base.name,
        backing_fmt="qcow2",
    )
    qemu_io(
        top,
        "write -P 0x01 2k 2k",
        f"write -s {res.rnd[2]} 8k 4k",
        "write -z 16k 2k",
        "write -P 0x03 64k 6k",
        "write -z 70k 2k",
        "write -P 0x05 130000 3000",
        f"write -z {1 * MiB} 64k",
        f"write -P 0x06 {1 * MiB + 4 * KiB} 2k",
    )
    return {"qcow2_extl2_backing": _entry("qcow2_extl2_backing", top, "qcow2", size, chain=[base])}


def build_chain_raw(d, res):
    size = 4 * MiB
    base = d / "base.raw"
    qemu_img("create", "-f", "raw", base, size)
    qemu_io(base, *standard_writes(size, res), fmt="raw")
    top = _new_qcow2(d, "over-raw.qcow2", size, backing=base.name, backing_fmt="raw")
    qemu_io(top, "write -P 0x10 32k 8k", f"write -s {res.rnd[3]} {2 * MiB - 5000} 10000")
    return {"chain_over_raw": _entry("chain_over_raw", top, "qcow2", size, chain=[base])}


def build_chain_3(d, res):
    size = 4 * MiB
    base = _new_qcow2(d, "base.qcow2", size, "cluster_size=4k")
    qemu_io(base, *standard_writes(size, res))
    mid = _new_qcow2(d, "mid.qcow2", size, backing=base.name, backing_fmt="qcow2")
    qemu_io(mid, "write -P 0x21 60k 10k", f"write -s {res.rnd[2]} {1 * MiB + 1} 5000")
    top = _new_qcow2(
        d, "top.qcow2", size, "cluster_size=512", backing=mid.name, backing_fmt="qcow2"
    )
    qemu_io(top, "write -P 0x31 62k 1k", f"write -z {1 * MiB} 1k", f"write -P 0x32 {3 * MiB} 3k")
    return {"chain_3level": _entry("chain_3level", top, "qcow2", size, chain=[mid, base])}


def build_chain_abs(d, res):
    size = 2 * MiB
    base = _new_qcow2(d, "abs-base.qcow2", size)
    qemu_io(base, f"write -s {res.rnd[1]} 0 150k", "write -P 0x44 1M 64k")
    top = _new_qcow2(d, "abs-top.qcow2", size, backing=base.resolve(), backing_fmt="qcow2")
    qemu_io(top, "write -P 0x45 100k 4k")
    return {"chain_absolute": _entry("chain_absolute", top, "qcow2", size, chain=[base])}


def build_chain_longer(d, res):
    base = _new_qcow2(d, "short-base.qcow2", 1 * MiB)
    qemu_io(base, "write -P 0x51 0 1M")
    top = _new_qcow2(d, "long-top.qcow2", 3 * MiB, backing=base.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x52 900k 200k", f"write -P 0x53 {2 * MiB} 4k")
    return {
        "chain_overlay_longer": _entry("chain_overlay_longer", top, "qcow2", 3 * MiB, chain=[base])
    }


def build_chain_shorter(d, res):
    base = _new_qcow2(d, "long-base.qcow2", 3 * MiB)
    qemu_io(base, "write -P 0x61 0 3M")
    top = _new_qcow2(d, "short-top.qcow2", 1 * MiB, backing=base.name, backing_fmt="qcow2")
    qemu_io(top, "write -P 0x62 512k 4k")
    return {
        "chain_overlay_shorter": _entry(
            "chain_overlay_shorter", top, "qcow2", 1 * MiB, chain=[base]
        )
    }


def build_chain_unaligned_backing(d, res):
    # a raw backing file whose end falls inside an overlay cluster
    bsize = 1 * MiB + 1536
    base = d / "odd-base.raw"
    qemu_img("create", "-f", "raw", base, bsize)
    assert base.stat().st_size == bsize
    qemu_io(base, f"write -s {res.rnd[1]} {bsize - 70000} 70000", "write -P 0x0f 0 4k", fmt="raw")
    out = {}
    for name, cmds in [
        ("chain_unaligned_backing_end", ["write -P 0x1e 4k 4k"]),
        ("chain_unaligned_backing_cow", [f"write -P 0x2e {1 * MiB + 1000} 1000"]),
    ]:
        top = _new_qcow2(d, f"{name}.qcow2", 2 * MiB, backing=base.name, backing_fmt="raw")
        qemu_io(top, *cmds)
        out[name] = _entry(name, top, "qcow2", 2 * MiB, chain=[base])
    return out


def _build_data_file(d, res, name, raw_flag):
    size = 4 * MiB
    # QEMU 10.0 resolves a relative data_file name against its working directory, not the
    # image's directory, so store an absolute name (copy_entry re-points copies with amend).
    opts = [f"data_file={(d / name).resolve()}.data"]
    if raw_flag:
        opts.append("data_file_raw=on")
    p = _new_qcow2(d, f"{name}.qcow2", size, *opts)
    qemu_io(p, *standard_writes(size, res))
    data = d / f"{name}.data"
    assert data.exists()
    return {name: _entry(name, p, "qcow2", size, data_file=data)}


def build_data_file(d, res):
    return _build_data_file(d, res, "qcow2_data_file", False)


def build_data_file_raw(d, res):
    return _build_data_file(d, res, "qcow2_data_file_raw", True)


def build_snapshots(d, res):
    size = 4 * MiB
    p = _new_qcow2(d, "snap.qcow2", size)
    qemu_io(p, *standard_writes(size, res))
    qemu_img("snapshot", "-c", "snap1", p)
    qemu_io(
        p,
        "write -P 0x71 0 100k",
        f"write -z {2 * MiB - 1024} 2k",
        f"write -s {res.rnd[3]} {3 * MiB} 8000",
    )
    return {
        "snapshot_current": _entry("snapshot_current", p, "qcow2", size),
        "snapshot_by_name": _entry("snapshot_by_name", p, "qcow2", size, snapshot="snap1"),
        "snapshot_by_id": _entry("snapshot_by_id", p, "qcow2", size, snapshot="1"),
    }


def build_dirty(d, res):
    size = 1 * MiB
    p = _new_qcow2(d, "dirty.qcow2", size, "lazy_refcounts=on")
    qemu_io(p, "write -P 0x33 128k 4k")
    # `abort` kills qemu-io without a clean close, leaving the dirty bit set
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "abort", p], check=False)
    assert read_header(p)["incompatible_features"] & INCOMPAT_DIRTY
    entry = _entry("qcow2_dirty", p, "qcow2", size)
    # the oracle opened it read-only: still dirty
    assert read_header(p)["incompatible_features"] & INCOMPAT_DIRTY
    return {"qcow2_dirty": entry}


BUILDERS: list = [
    build_raw,
    build_raw_sparse,
    build_c512,
    build_c4k,
    build_c64k,
    build_c2m,
    build_v2,
    build_refcount1,
    build_refcount64,
    build_zero_plain,
    build_zero_alloc,
    build_zlib,
    build_zstd,
    build_write_c,
    build_zlib_c512,
    build_zstd_c2m,
    build_zlib_extl2,
    build_chain_compressed,
    build_extl2_c16k,
    build_chain_v2,
    build_bitmap,
    build_prealloc,
    build_extl2,
    build_extl2_backing,
    build_chain_raw,
    build_chain_3,
    build_chain_abs,
    build_chain_longer,
    build_chain_shorter,
    build_chain_unaligned_backing,
    build_data_file,
    build_data_file_raw,
    build_snapshots,
    build_dirty,
]

ZOO_NAMES = [
    "raw",
    "raw_sparse",
    "qcow2_c512",
    "qcow2_c4k",
    "qcow2_c64k",
    "qcow2_c2m",
    "qcow2_v2",
    "qcow2_refcount1",
    "qcow2_refcount64",
    "qcow2_zero_plain",
    "qcow2_zero_alloc",
    "qcow2_zlib",
    "qcow2_zstd",
    "qcow2_write_c",
    "qcow2_zlib_c512",
    "qcow2_zstd_c2m",
    "qcow2_zlib_extl2",
    "chain_over_compressed",
    "qcow2_extl2_c16k",
    "chain_v2",
    "qcow2_bitmap",
    "qcow2_prealloc_metadata",
    "qcow2_extl2",
    "qcow2_extl2_backing",
    "chain_over_raw",
    "chain_3level",
    "chain_absolute",
    "chain_overlay_longer",
    "chain_overlay_shorter",
    "chain_unaligned_backing_end",
    "chain_unaligned_backing_cow",
    "qcow2_data_file",
    "qcow2_data_file_raw",
    "snapshot_current",
    "snapshot_by_name",
    "snapshot_by_id",
    "qcow2_dirty",
]

QCOW2_NAMES = [n for n in ZOO_NAMES if not n.startswith("raw")]


def build_zoo(root: Path) -> dict:
    res_dir = root / "resources"
    res_dir.mkdir()
    res = Resources(res_dir)
    zoo: dict = {}
    for builder in BUILDERS:
        d = root / builder.__name__.replace("build_", "")
        d.mkdir()
        zoo.update(builder(d, res))
    return zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> dict:
    """name -> ZooImage for every image kind; built once per session."""
    return build_zoo(tmp_path_factory.mktemp("zoo"))


@pytest.fixture(params=ZOO_NAMES)
def zoo_image(request, zoo) -> ZooImage:
    return zoo[request.param]


@pytest.fixture(scope="session")
def resources(tmp_path_factory) -> Resources:
    return Resources(tmp_path_factory.mktemp("resources"))


def copy_entry(entry: ZooImage, dest: Path) -> ZooImage:
    """Copy the image files of ``entry`` (image, backing files, data file) to ``dest``."""
    target = dest / entry.dir.name
    shutil.copytree(entry.dir, target, ignore=shutil.ignore_patterns("*.expected.raw"))
    new = entry.relocated(target)
    if new.data_file is not None:
        qemu_img("amend", "-o", f"data_file={new.data_file.resolve()}", new.path)
    backing = backing_file_name(new.path) if new.fmt == "qcow2" else None
    if backing is not None and Path(backing).is_absolute() and Path(backing).parent == entry.dir:
        fmt = "raw" if backing.endswith(".raw") else "qcow2"
        qemu_img("rebase", "-u", "-b", target / Path(backing).name, "-F", fmt, new.path)
    return new


def backing_file_name(path) -> str | None:
    hdr = read_header(path)
    if not hdr.get("backing_file_offset"):
        return None
    with open(path, "rb") as f:
        f.seek(hdr["backing_file_offset"])
        return f.read(hdr["backing_file_size"]).decode()


GiB = 1024 * MiB

# guest writes of the big sparse image: (offset, length)
BIG_WRITES = [(4 * GiB - 512, 1024), (5 * GiB - 5, 70000), (6 * GiB - 4096, 4096)]


@pytest.fixture(scope="session")
def big_sparse(tmp_path_factory, resources) -> ZooImage:
    """A 6 GiB qcow2 (4k clusters) with a little data above 4 GiB, and its sparse raw."""
    d = tmp_path_factory.mktemp("big")
    p = _new_qcow2(d, "big.qcow2", 6 * GiB, "cluster_size=4k")
    (o1, l1), (o2, l2), (o3, l3) = BIG_WRITES
    qemu_io(
        p,
        f"write -P 0x11 {o1} {l1}",
        f"write -s {resources.rnd[0]} {o2} {l2}",
        f"write -P 0x22 {o3} {l3}",
    )
    entry = _entry("big_sparse", p, "qcow2", 6 * GiB)
    assert entry.expected.stat().st_blocks * 512 < 16 * MiB  # the oracle output is sparse
    return entry


def read_range(path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


# --------------------------------------------------------------------------------------------
# the test guest (tests/guest.py)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def guest_boot():
    """The guest's kernel and initramfs, built once per session (scripts/guest/build.sh).

    The kernel is fetched once into target/guest (git-ignored) and kept there.
    """
    from guest import build_guest

    return build_guest(Path(__file__).resolve().parent.parent / "target" / "guest")


@contextmanager
def stopped_at_teardown(
    make: Callable[..., T], stop: Callable[[T], None]
) -> Iterator[Callable[..., T]]:
    """The body of a fixture that starts servers: yields ``start``, which makes one
    with ``make(*args, **kwargs)`` and keeps it; at teardown each one is stopped with
    ``stop`` (by PID), the rest too when stopping one fails."""
    started: list[T] = []

    def start(*args, **kwargs) -> T:
        server = make(*args, **kwargs)
        started.append(server)
        return server

    yield start
    failed: BaseException | None = None
    for server in started:
        try:
            stop(server)
        except BaseException as e:  # stop the others first, then report it
            failed = failed or e
    if failed is not None:
        raise failed


@pytest.fixture
def bug_server():
    """Start planted-bug NBD servers (tests/bug_server.py); each is stopped by PID at teardown.

    Usage: ``server = bug_server(image, bugs=[("lost-write", 3)])``.
    """
    from bug_server import BugServer

    with stopped_at_teardown(BugServer, BugServer.stop) as start:
        yield start


@pytest.fixture
def serve():
    """Start ``blkverify serve`` processes (test_serve's ``ServeProc``); each is
    killed by PID at teardown if the test left it running."""
    from test_serve import ServeProc

    with stopped_at_teardown(ServeProc, ServeProc.kill) as start:
        yield start
