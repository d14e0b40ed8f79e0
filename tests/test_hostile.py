"""The hostile-image corpus: real qemu-img images with one field or fact broken each.

Every case is run three ways: ``blkverify verify`` under a 1 GiB address-space limit and a
time limit (exit status, one-line error naming the file and the fact, no traceback),
``bv.open`` and a whole-disk read in this process (the exception class and message), and
``qemu-img info``/``check``/``convert`` on the same file. We must be at least as strict as
QEMU: where it refuses to open or read an image, or finds it corrupt, we refuse or report;
where we read an image, we read exactly the bytes ``qemu-img convert`` does.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import (
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_EXTL2,
    MiB,
    compressed_clusters,
    l1_entry_offset,
    l2_entry_offset,
    patch_header,
    qemu_img,
    qemu_io,
    read_header,
)

MEMORY_LIMIT = 1 << 30  # bytes of address space for one CLI run
TIME_LIMIT = 15.0  # seconds for one CLI run (the machine is shared: generous)
COPIED = 1 << 63
OFFSET_MASK = 0x00FFFFFFFFFFFE00

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441


# --------------------------------------------------------------------------------------------
# the healthy images every case starts from
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    path: Path
    expected: Path  # qemu-img convert -O raw of the healthy image
    snapshot_expected: Path | None = None


def _to_raw(img: Path, out: Path, snapshot: str | None = None) -> Path:
    argv = ["convert"]
    if snapshot:
        argv += ["-l", f"snapshot.name={snapshot}"]
    qemu_img(*argv, "-O", "raw", img, out)
    return out


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("hostile-bases")
    out: dict[str, Base] = {}

    def make(name: str, opts: str, *writes: str, size: str = "4M") -> Path:
        p = d / f"{name}.qcow2"
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, p, size)
        qemu_io(p, *writes)
        return p

    standard = ("write -P 0xab 0 64k", "write -c -P 0x11 1M 4k", "write -z 2M 4k")
    p = make("v3", "cluster_size=4k", *standard, "write -P 0x5c 3M 8k")
    out["v3"] = Base(p, _to_raw(p, d / "v3.raw"))
    p = make("v2", "cluster_size=4k,compat=0.10", "write -P 0xab 0 64k", "write -P 0x5c 3M 8k")
    out["v2"] = Base(p, _to_raw(p, d / "v2.raw"))
    p = make(
        "extl2",
        "cluster_size=64k,extended_l2=on",
        "write -P 0xab 0 8k",
        "write -c -P 0x22 1M 64k",
        "write -P 0x5c 3M 4k",
    )
    out["extl2"] = Base(p, _to_raw(p, d / "extl2.raw"))
    p = make("zstd", "cluster_size=4k,compression_type=zstd", *standard)
    out["zstd"] = Base(p, _to_raw(p, d / "zstd.raw"))
    # an overlay in the same directory as its backing file, with a backing format extension
    base = make("backing-base", "cluster_size=4k", "write -P 0x42 0 4M")
    top = d / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", base.name, "-F", "qcow2",
        top, "4M", cwd=d,
    )  # fmt: skip
    qemu_io(top, "write -P 0x17 64k 4k", cwd=d)
    out["top"] = Base(top, _to_raw(top, d / "top.raw"))
    p = make("snap", "cluster_size=4k", "write -P 0xab 0 64k")
    qemu_img("snapshot", "-c", "s1", p)
    qemu_io(p, "write -P 0xcd 0 8k", "write -P 0xef 3M 4k")
    out["snap"] = Base(p, _to_raw(p, d / "snap.raw"), _to_raw(p, d / "snap-s1.raw", "s1"))
    return out


# --------------------------------------------------------------------------------------------
# byte-level helpers
# --------------------------------------------------------------------------------------------


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def u64_at(path: Path, offset: int) -> int:
    return struct.unpack(">Q", read_at(path, offset, 8))[0]


def put_u64(path: Path, offset: int, value: int) -> None:
    write_at(path, offset, struct.pack(">Q", value))


def update_u64(path: Path, offset: int, fn: Callable[[int], int]) -> None:
    put_u64(path, offset, fn(u64_at(path, offset)))


def cluster_size(path: Path) -> int:
    return 1 << read_header(path)["cluster_bits"]


def extensions(path: Path) -> list[tuple[int, int, int]]:
    """(offset, type, length) of each header extension, up to the end marker."""
    hdr = read_header(path)
    data = read_at(path, 0, cluster_size(path))
    at = hdr.get("header_length", 72)
    out = []
    while at + 8 <= len(data):
        ext_type, length = struct.unpack_from(">II", data, at)
        if ext_type == 0:
            break
        out.append((at, ext_type, length))
        at += 8 + (length + 7) // 8 * 8
    return out


def extension(path: Path, wanted: int) -> tuple[int, int]:
    [(at, length)] = [(a, n) for a, t, n in extensions(path) if t == wanted]
    return at, length


def set_backing_name(path: Path, name: bytes) -> None:
    """Rewrite the backing file name in place (the first cluster has room)."""
    hdr = read_header(path)
    offset = hdr["backing_file_offset"]
    write_at(path, offset, name)
    patch_header(path, "backing_file_size", len(name))


def add_extension(path: Path, ext_type: int, payload: bytes) -> None:
    """Append an extension after the last one (moving the end marker)."""
    hdr = read_header(path)
    exts = extensions(path)
    at = exts[-1][0] + 8 + (exts[-1][2] + 7) // 8 * 8 if exts else hdr["header_length"]
    padded = payload + b"\0" * (-len(payload) % 8)
    write_at(path, at, struct.pack(">II", ext_type, len(payload)) + padded + b"\0" * 8)


def snapshot_entry(path: Path) -> int:
    """File offset of the first snapshot table entry."""
    return read_header(path)["snapshots_offset"]


def first_compressed(path: Path) -> tuple[int, int, int]:
    """(file offset of the L2 entry, its value, host offset) of the first compressed cluster."""
    guest, host, _ = compressed_clusters(path)[0]
    entry_at = l2_entry_offset(path, guest)
    return entry_at, u64_at(path, entry_at), host


def ext_l2_compressed_entry(path: Path) -> int:
    """File offset of the extended L2 entry of the compressed cluster at 1 MiB."""
    return l2_entry_offset(path, 1 * MiB)


# --------------------------------------------------------------------------------------------
# the cases
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    patch: Callable[[Path], None]
    # "open": refused at open (exit 2). "read": opens, but reading the disk fails with a
    # CorruptImageError (verify: exit 1, a read error). "ok": a strange but valid image that
    # must read exactly as qemu-img reads it. "any": no fixed answer (truncations): only the
    # shared rules apply.
    expect: str
    match: str = ""  # a regex the error must contain: the field or the fact
    exc: type = bv.CorruptImageError
    snapshot: str | None = None
    fmt: str | None = None
    # Damage that only a writer meets (refcounts): qemu-img check finds it, reads do not,
    # and a writable open must refuse it.
    metadata_only: bool = False
    # qemu-img check complains only of refcounts that disagree with the references; reads
    # (ours and QEMU's) are unaffected.
    refcounts_only: bool = False


def hdr(field: str, value) -> Callable[[Path], None]:
    return lambda p: patch_header(p, field, value)


def hdr_fn(field: str, fn: Callable[[Path, dict], int]) -> Callable[[Path], None]:
    return lambda p: patch_header(p, field, fn(p, read_header(p)))


def incompat(bits: int) -> Callable[[Path], None]:
    return hdr_fn("incompatible_features", lambda p, h: h["incompatible_features"] | bits)


def l1_entry(guest: int, fn: Callable[[int, Path], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at = l1_entry_offset(p, guest)
        put_u64(p, at, fn(u64_at(p, at), p))

    return patch


def l2_entry(guest: int, fn: Callable[[int, Path], int], word: int = 0) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at = l2_entry_offset(p, guest) + 8 * word
        put_u64(p, at, fn(u64_at(p, at), p))

    return patch


def file_len(p: Path) -> int:
    return p.stat().st_size


def compressed_patch(fn: Callable[[int, int, Path], int]) -> Callable[[Path], None]:
    """Replace the first compressed cluster's L2 entry with fn(entry, host, path)."""

    def patch(p: Path) -> None:
        at, entry, host = first_compressed(p)
        put_u64(p, at, fn(entry, host, p))

    return patch


def compressed_payload(make: Callable[[Path, int], bytes]) -> Callable[[Path], None]:
    """Overwrite the first compressed cluster's stream with make(path, cluster_size)."""

    def patch(p: Path) -> None:
        _, _, host = first_compressed(p)
        write_at(p, host, make(p, cluster_size(p)))

    return patch


def raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -12)
    return c.compress(data) + c.flush()


def with_x(cb: int) -> int:
    return 62 - (cb - 8)


def snap_field(offset: int, fmt: str, value: int) -> Callable[[Path], None]:
    return lambda p: write_at(p, snapshot_entry(p) + offset, struct.pack(fmt, value))


def truncate_to(n: int | Callable[[Path], int]) -> Callable[[Path], None]:
    return lambda p: os.truncate(p, n if isinstance(n, int) else n(p))


def ext_patch(wanted: int, fn: Callable[[Path, int, int], None]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at, length = extension(p, wanted)
        fn(p, at, length)

    return patch


def set_ext_len(length: int | Callable[[Path, int], int]) -> Callable[[Path, int, int], None]:
    def fn(p: Path, at: int, _old: int) -> None:
        n = length if isinstance(length, int) else length(p, at)
        write_at(p, at + 4, struct.pack(">I", n))

    return fn


def refcount_table_entry(fn: Callable[[int, Path], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at = read_header(p)["refcount_table_offset"]
        put_u64(p, at, fn(u64_at(p, at), p))

    return patch


def truncated_extension(p: Path) -> None:
    write_at(p, 112, struct.pack(">II", 0x12345678, 4088 - 120))
    write_at(p, 8, struct.pack(">QI", 4092, 4))
    write_at(p, 4092, b"base")


def data_file_ext(name: bytes) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        add_extension(p, EXT_DATA_FILE, name)
        incompat(INCOMPAT_DATA_FILE)(p)

    return patch


CORRUPT, FORMAT = bv.CorruptImageError, bv.FormatError

CASES = [
    # ---- every header field
    Case(
        "magic", "v3", lambda p: write_at(p, 0, b"QFI\0"), "open", "bad magic", FORMAT, fmt="qcow2"
    ),
    Case("version-0", "v3", hdr("version", 0), "open", "version", FORMAT),
    Case("version-1", "v3", hdr("version", 1), "open", r"qcow \(version 1\)", FORMAT),
    Case("version-4", "v3", hdr("version", 4), "open", "version is 4", FORMAT),
    Case(
        "backing_file_offset-past-cluster",
        "v3",
        lambda p: (hdr("backing_file_offset", 0x10000)(p), hdr("backing_file_size", 8)(p)),
        "open",
        "outside the first cluster",
    ),
    Case(
        "backing_file_offset-huge",
        "v3",
        lambda p: (hdr("backing_file_offset", 1 << 63)(p), hdr("backing_file_size", 8)(p)),
        "open",
        "outside the first cluster",
    ),
    Case(
        "backing_file_offset-in-header",
        "v3",
        lambda p: (hdr("backing_file_offset", 8)(p), hdr("backing_file_size", 8)(p)),
        "open",
        "backing_file_offset is 0x8, inside the header",
    ),
    Case(
        "backing_file_size-1024",
        "top",
        hdr("backing_file_size", 1024),
        "open",
        "backing_file_size is 1024",
    ),
    Case(
        "backing_file_size-huge",
        "top",
        hdr("backing_file_size", 0xFFFFFFFF),
        "open",
        "backing_file_size is 4294967295",
    ),
    Case("cluster_bits-8", "v3", hdr("cluster_bits", 8), "open", "cluster_bits is 8"),
    Case("cluster_bits-22", "v3", hdr("cluster_bits", 22), "open", "cluster_bits is 22"),
    Case("cluster_bits-huge", "v3", hdr("cluster_bits", 0xFFFFFFFF), "open", "cluster_bits"),
    Case("size-2^63", "v3", hdr("size", 1 << 63), "open", "header field size"),
    Case("size-beyond-l1", "v3", hdr("size", 1 << 40), "open", "l1_size is 2, too small"),
    Case("crypt_method-aes", "v3", hdr("crypt_method", 1), "open", "crypt_method is 1", FORMAT),
    Case("crypt_method-luks", "v3", hdr("crypt_method", 2), "open", "crypt_method is 2", FORMAT),
    Case("crypt_method-unknown", "v3", hdr("crypt_method", 7), "open", "crypt_method is 7", FORMAT),
    Case("l1_size-0", "v3", hdr("l1_size", 0), "open", "l1_size is 0, too small"),
    Case(
        "l1_size-over-limit",
        "v3",
        hdr("l1_size", (32 << 20) // 8 + 1),
        "open",
        r"l1_size is 4194305, .*limit",
    ),
    Case("l1_size-huge", "v3", hdr("l1_size", 0xFFFFFFFF), "open", "l1_size is 4294967295"),
    Case(
        "l1_size-past-eof",
        "v3",
        hdr("l1_size", 1 << 20),
        "open",
        "L1 table .* past the end of the file",
    ),
    Case(
        "l1_table_offset-0",
        "v3",
        hdr("l1_table_offset", 0),
        "open",
        "L1 table offset is 0, overlapping the header",
    ),
    Case(
        "l1_table_offset-unaligned",
        "v3",
        hdr_fn("l1_table_offset", lambda p, h: h["l1_table_offset"] + 8),
        "open",
        "L1 table offset .* not aligned",
    ),
    Case(
        "l1_table_offset-past-eof",
        "v3",
        hdr("l1_table_offset", 1 << 40),
        "open",
        "L1 table .* past the end of the file",
    ),
    Case(
        "l1_table_offset-wraps",
        "v3",
        hdr("l1_table_offset", 0xFFFF_FFFF_FFFF_F000),
        "open",
        "L1 table .* past the end of the file",
    ),
    Case(
        "l1_table_offset-on-refcount-table",
        "v3",
        hdr_fn("l1_table_offset", lambda p, h: h["refcount_table_offset"]),
        "open",
        "L1 table .* overlaps the refcount table",
    ),
    Case(
        "refcount_table_offset-0",
        "v3",
        hdr("refcount_table_offset", 0),
        "open",
        "refcount table offset is 0, overlapping the header",
    ),
    Case(
        "refcount_table_offset-unaligned",
        "v3",
        hdr_fn("refcount_table_offset", lambda p, h: h["refcount_table_offset"] + 512),
        "open",
        "refcount table offset .* not aligned",
    ),
    Case(
        "refcount_table_offset-past-eof",
        "v3",
        hdr("refcount_table_offset", 1 << 50),
        "open",
        "refcount table .* past the end of the file",
    ),
    Case(
        "refcount_table_offset-on-l1",
        "v3",
        hdr_fn("refcount_table_offset", lambda p, h: h["l1_table_offset"]),
        "open",
        "L1 table .* overlaps the refcount table",
    ),
    Case(
        "refcount_table_clusters-0",
        "v3",
        hdr("refcount_table_clusters", 0),
        "open",
        "refcount_table_clusters is 0",
    ),
    Case(
        "refcount_table_clusters-over-limit",
        "v3",
        hdr("refcount_table_clusters", 2049),
        "open",
        r"refcount_table_clusters is 2049, .*limit",
    ),
    Case(
        "refcount_table_clusters-huge",
        "v3",
        hdr("refcount_table_clusters", 0xFFFFFFFF),
        "open",
        "refcount_table_clusters is 4294967295",
    ),
    Case(
        "refcount_table_clusters-past-eof",
        "v3",
        hdr("refcount_table_clusters", 1000),
        "open",
        "refcount table .* past the end of the file",
    ),
    Case(
        "nb_snapshots-over-limit",
        "snap",
        hdr("nb_snapshots", 65537),
        "open",
        "nb_snapshots is 65537",
    ),
    Case(
        "nb_snapshots-past-eof",
        "snap",
        hdr("nb_snapshots", 65536),
        "open",
        "snapshot table .* past the end of the file",
    ),
    Case("nb_snapshots-more-than-stored", "snap", hdr("nb_snapshots", 3), "any"),
    Case(
        "snapshots_offset-0",
        "snap",
        hdr("snapshots_offset", 0),
        "open",
        "snapshot table offset is 0",
    ),
    Case(
        "snapshots_offset-unaligned",
        "snap",
        hdr_fn("snapshots_offset", lambda p, h: h["snapshots_offset"] + 8),
        "open",
        "snapshot table offset .* not aligned",
    ),
    Case(
        "snapshots_offset-past-eof",
        "snap",
        hdr("snapshots_offset", 1 << 40),
        "open",
        "snapshot table .* past the end of the file",
    ),
    Case(
        "snapshots_offset-on-l1",
        "snap",
        hdr_fn("snapshots_offset", lambda p, h: h["l1_table_offset"]),
        "open",
        "L1 table .* overlaps the snapshot table",
    ),
    Case("incompatible-bit-40", "v3", incompat(1 << 40), "open", "bit 40", FORMAT),
    Case("incompatible-bit-5", "v3", incompat(1 << 5), "open", "bit 5", FORMAT),
    Case(
        "incompatible-data-file-without-name",
        "v3",
        incompat(INCOMPAT_DATA_FILE),
        "open",
        "external data file feature bit is set but no data file name",
    ),
    Case(
        "incompatible-compression-without-type",
        "v3",
        incompat(INCOMPAT_COMPRESSION),
        "open",
        "compression_type is 0 but the compression incompatible feature bit is set",
    ),
    Case(
        "incompatible-extl2-small-clusters",
        "v3",
        incompat(INCOMPAT_EXTL2),
        "open",
        "extended L2 entries need clusters of at least 16 KiB",
    ),
    Case(
        "compatible-unknown-bits",
        "v3",
        hdr_fn("compatible_features", lambda p, h: h["compatible_features"] | 0xF0),
        "ok",
    ),
    Case(
        "autoclear-unknown-bits",
        "v3",
        hdr_fn("autoclear_features", lambda p, h: h["autoclear_features"] | (1 << 40)),
        "ok",
    ),
    Case("refcount_order-7", "v3", hdr("refcount_order", 7), "open", "refcount_order is 7"),
    Case(
        "refcount_order-huge",
        "v3",
        hdr("refcount_order", 0xFFFFFFFF),
        "open",
        "refcount_order is 4294967295",
    ),
    Case("header_length-0", "v3", hdr("header_length", 0), "open", "header_length is 0"),
    Case("header_length-103", "v3", hdr("header_length", 103), "open", "header_length is 103"),
    Case(
        "header_length-over-cluster",
        "v3",
        hdr("header_length", 4097),
        "open",
        "header_length is 4097, larger than a cluster",
    ),
    Case(
        "header_length-huge",
        "v3",
        hdr("header_length", 0xFFFFFFF0),
        "open",
        "header_length is 4294967280",
    ),
    Case(
        "compression_type-2",
        "v3",
        lambda p: (incompat(INCOMPAT_COMPRESSION)(p), write_at(p, 104, b"\2")),
        "open",
        "compression_type is 2",
        FORMAT,
    ),
    Case(
        "compression_type-zstd-without-bit",
        "v3",
        lambda p: write_at(p, 104, b"\1"),
        "open",
        "compression_type is 1 but the compression incompatible feature bit is clear",
    ),
    Case("v2-as-v3", "v2", hdr("version", 3), "open", "header_length is 0"),
    # ---- header extensions
    Case(
        "ext-length-huge",
        "top",
        ext_patch(EXT_BACKING_FORMAT, set_ext_len(0xFFFFFFFF)),
        "open",
        "header extension 0xe2792aca .* has length 4294967295, running past",
    ),
    Case(
        "ext-overlaps-backing-name",
        "top",
        ext_patch(
            EXT_BACKING_FORMAT,
            set_ext_len(lambda p, at: read_header(p)["backing_file_offset"] - at - 7),
        ),
        "open",
        "header extension .* running past the end of the header area",
    ),
    # The area ends at an unaligned backing name, 4 bytes after the last extension's end.
    Case(
        "ext-truncated",
        "v3",
        truncated_extension,
        "open",
        r"header extension at offset 0xff8 is truncated",
    ),
    Case("ext-unknown-type-ignored", "v3", lambda p: add_extension(p, 0x12345678, b"hello"), "ok"),
    Case(
        "ext-backing-format-too-long",
        "top",
        ext_patch(EXT_BACKING_FORMAT, set_ext_len(16)),
        "open",
        "backing format is 16 bytes long",
    ),
    Case(
        "ext-backing-format-unknown",
        "top",
        ext_patch(EXT_BACKING_FORMAT, lambda p, at, n: write_at(p, at + 8, b"qed\0\0")),
        "open",
        "backing format 'qed'",
        FORMAT,
    ),
    Case(
        "ext-backing-format-not-utf8",
        "top",
        ext_patch(EXT_BACKING_FORMAT, lambda p, at, n: write_at(p, at + 8, b"\xff\xfe\xfd")),
        "open",
        "backing format is not valid UTF-8",
    ),
    Case(
        "ext-feature-table-odd-length",
        "v3",
        lambda p: add_extension(p, EXT_FEATURE_TABLE, b"\0\5bit five".ljust(47, b"\0")),
        "ok",
    ),
    Case(
        "ext-crypto-on-plain-image",
        "v3",
        lambda p: add_extension(p, EXT_CRYPTO, bytes(16)),
        "open",
        "encryption header extension",
        FORMAT,
    ),
    Case(
        "ext-data-file-outside",
        "v3",
        data_file_ext(b"/etc/passwd"),
        "open",
        "external data file '/etc/passwd' .* outside the image's directory",
        FORMAT,
    ),
    Case(
        "ext-data-file-missing",
        "v3",
        data_file_ext(b"missing-data.raw"),
        "open",
        "missing-data.raw",
        OSError,
    ),
    Case(
        "ext-data-file-not-utf8",
        "v3",
        data_file_ext(b"\xff\xfe.raw"),
        "open",
        "external data file name is not valid UTF-8",
    ),
    # ---- backing file names
    Case(
        "backing-not-utf8",
        "top",
        lambda p: set_backing_name(p, b"\xffbase.qcow2"),
        "open",
        "backing file name is not valid UTF-8",
    ),
    Case(
        "backing-json",
        "top",
        lambda p: set_backing_name(p, b'json:{"file.filename":"/etc/passwd"}'),
        "open",
        "is not a plain file name",
        FORMAT,
    ),
    Case(
        "backing-nbd",
        "top",
        lambda p: set_backing_name(p, b"nbd://127.0.0.1:10809/x"),
        "open",
        "is not a plain file name",
        FORMAT,
    ),
    Case(
        "backing-nbd-unix",
        "top",
        lambda p: set_backing_name(p, b"nbd+unix:///x?socket=/tmp/nbd.sock"),
        "open",
        "is not a plain file name",
        FORMAT,
    ),
    Case(
        "backing-absolute-outside",
        "top",
        lambda p: set_backing_name(p, b"/etc/passwd"),
        "open",
        "outside the image's directory",
        FORMAT,
    ),
    Case(
        "backing-dotdot-outside",
        "top",
        lambda p: set_backing_name(p, b"../../../../../etc/passwd"),
        "open",
        "outside the image's directory",
        FORMAT,
    ),
    Case(
        "backing-nul-byte",
        "top",
        lambda p: set_backing_name(p, b"backing-base.qcow2\0x"),
        "open",
        "contains a NUL byte",
    ),
    Case(
        "backing-missing",
        "top",
        lambda p: set_backing_name(p, b"no-such-base.qcow2"),
        "open",
        "no-such-base.qcow2",
        OSError,
    ),
    Case(
        "backing-self-loop",
        "top",
        lambda p: set_backing_name(p, p.name.encode()),
        "open",
        "backing chain loops",
    ),
    Case("backing-empty-name", "top", hdr("backing_file_size", 0), "ok"),
    # ---- L1 entries
    Case(
        "l1-reserved-low-bits",
        "v3",
        l1_entry(0, lambda e, p: e | 0x2),
        "read",
        "L1 entry .* has reserved bits set",
    ),
    Case(
        "l1-reserved-high-bits",
        "v3",
        l1_entry(0, lambda e, p: e | (1 << 60)),
        "read",
        "L1 entry .* has reserved bits set",
    ),
    Case(
        "l1-unaligned",
        "v3",
        l1_entry(0, lambda e, p: e + 512),
        "read",
        "L2 table offset .* not aligned",
    ),
    Case(
        "l1-past-eof",
        "v3",
        l1_entry(0, lambda e, p: COPIED | (1 << 40)),
        "read",
        "L2 table at 0x10000000000 lies past the end of the file",
    ),
    Case(
        "l1-on-l1-table",
        "v3",
        l1_entry(0, lambda e, p: COPIED | read_header(p)["l1_table_offset"]),
        "read",
        "L2 table at .* overlaps the L1 table",
    ),
    Case(
        "l1-on-refcount-table",
        "v3",
        l1_entry(0, lambda e, p: COPIED | read_header(p)["refcount_table_offset"]),
        "read",
        "L2 table at .* overlaps the refcount table",
    ),
    # ---- L2 entries
    Case(
        "l2-reserved-low-bits",
        "v3",
        l2_entry(0, lambda e, p: e | 0x4),
        "read",
        "L2 entry .* has reserved bits set",
    ),
    Case(
        "l2-reserved-high-bits",
        "v3",
        l2_entry(0, lambda e, p: e | (1 << 58)),
        "read",
        "L2 entry .* has reserved bits set",
    ),
    Case(
        "l2-unaligned",
        "v3",
        l2_entry(0, lambda e, p: e + 512),
        "read",
        "L2 entry .* not aligned to a cluster",
    ),
    Case(
        "l2-past-eof",
        "v3",
        l2_entry(0, lambda e, p: COPIED | (1 << 40)),
        "read",
        "data cluster at host offset 0x10000000000 lies past the end of the file",
    ),
    Case(
        "l2-zero-unaligned",
        "v3",
        l2_entry(0, lambda e, p: e + 512 | 1),
        "read",
        "not aligned to a cluster",
    ),
    Case(
        "l2-zero-flag-in-v2",
        "v2",
        l2_entry(0, lambda e, p: e | 1),
        "read",
        "zero flag set, which version 2 images do not have",
    ),
    Case(
        "extl2-allocated-and-zero",
        "extl2",
        l2_entry(0, lambda e, p: e | (1 << 32) | 1, word=1),
        "read",
        "marks subcluster 0 both allocated and zero",
    ),
    Case(
        "extl2-zero-flag",
        "extl2",
        l2_entry(0, lambda e, p: e | 1),
        "read",
        "zero flag set, which extended L2 entries reserve",
    ),
    Case(
        "extl2-compressed-with-bitmap",
        "extl2",
        l2_entry(1 * MiB, lambda e, p: 1, word=1),
        "read",
        "non-zero subcluster bitmap",
    ),
    Case(
        "extl2-past-eof",
        "extl2",
        l2_entry(0, lambda e, p: COPIED | (1 << 44)),
        "read",
        "lies past the end of the file",
    ),
    # ---- compressed cluster descriptors
    Case(
        "compressed-past-eof",
        "v3",
        compressed_patch(lambda e, h, p: (e & ~((1 << with_x(12)) - 1)) | (file_len(p) + 10 * MiB)),
        "read",
        "compressed cluster at host offset .* lies past the end of the file",
    ),
    Case(
        "compressed-in-header",
        "v3",
        compressed_patch(lambda e, h, p: (e & ~((1 << with_x(12)) - 1)) | 0x10),
        "read",
        "compressed cluster at host offset 0x10 .*deflate stream",
    ),
    Case(
        "compressed-garbage",
        "v3",
        compressed_payload(lambda p, cs: bytes(range(256)) * 2),
        "read",
        "deflate stream is invalid",
    ),
    Case(
        "compressed-short-stream",
        "v3",
        compressed_payload(lambda p, cs: raw_deflate(b"\x11" * 100)),
        "read",
        "deflate stream holds 100 bytes, not a whole cluster",
    ),
    Case(
        "compressed-long-stream",
        "v3",
        compressed_payload(lambda p, cs: raw_deflate(b"\x11" * (2 * cs))),
        "any",
    ),
    # The stream is whole, so QEMU reads it too; only its refcounts disagree (check_refcounts).
    Case(
        "compressed-size-two-clusters",
        "v3",
        compressed_patch(lambda e, h, p: e | (((1 << 4) - 1) << with_x(12))),
        "ok",
        refcounts_only=True,
    ),
    Case(
        "compressed-zstd-garbage",
        "zstd",
        compressed_payload(lambda p, cs: bytes(range(256)) * 2),
        "read",
        "zstd stream is invalid",
    ),
    # ---- refcount table entries: only writers read refcounts
    Case(
        "refcount-block-past-eof",
        "v3",
        refcount_table_entry(lambda e, p: 1 << 40),
        "ok",
        metadata_only=True,
    ),
    Case(
        "refcount-block-unaligned",
        "v3",
        refcount_table_entry(lambda e, p: e + 512),
        "ok",
        metadata_only=True,
    ),
    Case(
        "refcount-block-reserved-bits",
        "v3",
        refcount_table_entry(lambda e, p: e | 1),
        "ok",
        metadata_only=True,
    ),
    Case(
        "refcount-block-missing",
        "v3",
        refcount_table_entry(lambda e, p: 0),
        "ok",
        metadata_only=True,
    ),
    # ---- the snapshot table
    Case(
        "snapshot-extra-data-huge",
        "snap",
        snap_field(36, ">I", 0xFFFFFFFF),
        "open",
        "extra_data_size is 4294967295",
    ),
    Case("snapshot-id-size-huge", "snap", snap_field(12, ">H", 0xFFFF), "any"),
    Case("snapshot-name-size-huge", "snap", snap_field(14, ">H", 0xFFFF), "any"),
    Case(
        "snapshot-l1-unaligned",
        "snap",
        snap_field(0, ">Q", 0x3008),
        "open",
        "snapshot 's1' L1 table offset 0x3008 is not aligned",
        snapshot="s1",
    ),
    Case(
        "snapshot-l1-past-eof",
        "snap",
        snap_field(0, ">Q", 1 << 40),
        "open",
        "snapshot 's1' L1 table .* past the end of the file",
        snapshot="s1",
    ),
    Case(
        "snapshot-l1-size-huge",
        "snap",
        snap_field(8, ">I", 0xFFFFFFFF),
        "open",
        "snapshot 's1' has l1_size 4294967295",
        snapshot="s1",
    ),
    Case(
        "snapshot-l1-size-0",
        "snap",
        snap_field(8, ">I", 0),
        "open",
        "snapshot 's1' has l1_size 0",
        snapshot="s1",
    ),
    Case(
        "snapshot-disk-size-huge",
        "snap",
        snap_field(40 + 8, ">Q", 1 << 62),
        "open",
        "snapshot 's1' has l1_size 2 for a disk of",
        snapshot="s1",
    ),
]

# ---- truncated files: the header, each table, and the data, cut at many lengths
TRUNCATIONS = [0, 3, 4, 8, 20, 71, 72, 100, 103, 104, 111, 112, 200, 511, 512, 4095, 4096,
               4097, 8192, 12288, 12289, 16384, 20000, 65536]  # fmt: skip
CASES += [Case(f"truncated-{n}", "v3", truncate_to(n), "any", fmt="qcow2") for n in TRUNCATIONS]
CASES += [
    Case("truncated-half", "v3", truncate_to(lambda p: file_len(p) // 2), "any"),
    Case("truncated-last-cluster", "v3", truncate_to(lambda p: file_len(p) - 4096), "any"),
    Case("truncated-last-sector", "v3", truncate_to(lambda p: file_len(p) - 512), "any"),
    Case("truncated-last-byte", "v3", truncate_to(lambda p: file_len(p) - 1), "any"),
    Case(
        "truncated-snapshot-table",
        "snap",
        truncate_to(lambda p: read_header(p)["snapshots_offset"] + 20),
        "open",
        "snapshot table .* past the end of the file",
    ),
    Case("truncated-overlay", "top", truncate_to(8192), "open", "past the end of the file"),
]


# --------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------


def _limits() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def run_bounded_cli(*args) -> tuple[subprocess.CompletedProcess, float]:
    """The CLI under the memory limit; returns the result and the wall time."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "blkverify_rs", *(str(a) for a in args)],
        capture_output=True,
        encoding="utf-8",
        errors="replace",
        check=False,
        timeout=TIME_LIMIT * 4,
        preexec_fn=_limits,
    )
    return proc, time.monotonic() - t0


@dataclass
class QemuView:
    opens: bool  # qemu-img info succeeds
    corrupt: bool  # qemu-img check finds corruption (exit 2) or cannot check
    check_output: str
    raw: bytes | None  # qemu-img convert output, None if it fails (or the disk is huge)


def qemu_view(img: Path, snapshot: str | None, tmp: Path) -> QemuView:
    hung = False

    def q(*args) -> subprocess.CompletedProcess | None:
        nonlocal hung
        if hung:
            return None  # after one hang (a backing loop), the rest would hang too
        try:
            return subprocess.run(
                ["qemu-img", *map(str, args)],
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=8,
            )
        except subprocess.TimeoutExpired:
            hung = True
            return None  # a hang counts as a refusal

    info = q("info", "--output=json", "-f", "qcow2", img)
    opens = info is not None and info.returncode == 0
    check = q("check", "-f", "qcow2", img)
    corrupt = check is None or check.returncode not in (0, 3)  # 3: leaks only
    raw = None
    if opens and info is not None and json.loads(info.stdout)["virtual-size"] <= 64 * MiB:
        out = tmp / "qemu.raw"
        argv = ["convert", "-f", "qcow2"]
        if snapshot:
            argv += ["-l", f"snapshot.name={snapshot}"]
        conv = q(*argv, "-O", "raw", img, out)
        if conv is not None and conv.returncode == 0:
            raw = out.read_bytes()
    return QemuView(opens, corrupt, "" if check is None else check.stdout + check.stderr, raw)


def read_whole(img, size: int) -> bytes:
    chunks = []
    for offset in range(0, size, 1 * MiB):
        chunks.append(img.read(offset, min(1 * MiB, size - offset)))
    return b"".join(chunks)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_image(case: Case, bases, tmp_path: Path) -> None:
    base = bases[case.base]
    # Beside its base, so relative backing names resolve as they do for the base.
    img = base.path.parent / f"case-{case.id}.qcow2"
    shutil.copyfile(base.path, img)
    try:
        _check_case(case, base, img, tmp_path)
    finally:
        img.unlink()


def _check_case(case: Case, base: Base, img: Path, tmp_path: Path) -> None:
    case.patch(img)
    damaged = img.read_bytes()
    expected = base.snapshot_expected if case.snapshot else base.expected
    qemu = qemu_view(img, case.snapshot, tmp_path)
    open_kw = {"format": case.fmt, "snapshot": case.snapshot}
    cli_opts = (["-F", case.fmt] if case.fmt else []) + (
        ["--snapshot", case.snapshot] if case.snapshot else []
    )
    # For images we accept, the reference is what QEMU reads from them.
    reference = expected
    if case.expect == "ok":
        assert qemu.raw is not None, "qemu-img cannot read a case marked ok"
        reference = tmp_path / "reference.raw"
        reference.write_bytes(qemu.raw)

    # 1. The CLI, bounded in memory and time.
    proc, seconds = run_bounded_cli("verify", *cli_opts, reference, img)
    out = proc.stdout + proc.stderr
    assert seconds < TIME_LIMIT, f"verify took {seconds:.1f}s"
    assert "Traceback" not in out and "panicked" not in out, out
    assert proc.returncode in (0, 1, 2), (proc.returncode, out)
    if proc.returncode == 2:
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("blkverify: error:")]
        named = img.name in line or (case.exc is OSError and re.search(case.match, line))
        assert named, line
    if case.expect == "open":
        assert proc.returncode == 2, out
        assert re.search(case.match, proc.stderr), proc.stderr
    elif case.expect == "read":
        assert proc.returncode == 1, out
        assert "read error in sector" in proc.stdout, out
        assert re.search(case.match, proc.stdout), proc.stdout
        assert img.name in proc.stdout
    elif case.expect == "ok":
        assert proc.returncode == 0, out

    # 2. The Python API: the exception class, the file and the fact.
    if case.expect == "open":
        with pytest.raises(case.exc) as info:
            bv.open(img, **open_kw)
        assert re.search(case.match, str(info.value)), info.value
        if case.exc is not OSError:
            assert str(img) in str(info.value)
    elif case.expect == "read":
        with bv.open(img, **open_kw) as opened, pytest.raises(case.exc) as info:
            read_whole(opened, opened.size)
        assert re.search(case.match, str(info.value)), info.value
        assert str(img) in str(info.value)
    else:
        try:
            opened = bv.open(img, **open_kw)
        except (bv.Error, OSError) as exc:
            assert case.expect == "any", exc
            assert str(img) in str(exc) or isinstance(exc, OSError), exc
        else:
            with opened:
                try:
                    ours = read_whole(opened, opened.size)
                except bv.CorruptImageError as exc:
                    assert case.expect == "any", exc
                    assert str(img) in str(exc)
                else:
                    # Whatever we read, QEMU reads too: never a silent wrong answer.
                    assert qemu.raw is not None, "we read an image qemu-img cannot"
                    assert ours == qemu.raw
    assert img.read_bytes() == damaged, "reading changed the image"

    # 3. At least as strict as QEMU.
    if not qemu.opens or (qemu.raw is None and not case.metadata_only):
        assert proc.returncode != 0, "qemu-img refuses this image; we accepted it"
    if case.refcounts_only:
        assert qemu.corrupt and "refcount" in qemu.check_output
    elif qemu.corrupt and not case.metadata_only:
        assert proc.returncode != 0, "qemu-img check finds this image corrupt; we said nothing"
    if proc.returncode == 0:
        assert qemu.raw is not None and qemu.raw == reference.read_bytes()
    if case.metadata_only:
        # qemu-img check finds it; a writer must not trust it either.
        assert qemu.corrupt
        with pytest.raises(bv.CorruptImageError, match="refcount") as info:
            bv.open(img, read_only=False)
        assert str(img) in str(info.value)
        assert img.read_bytes() == damaged, "a refused writable open changed the image"


def test_the_memory_limit_is_enforced() -> None:
    """The corpus's bound is real: a child that allocates 2 GiB under it fails."""
    proc = subprocess.run(
        [sys.executable, "-c", "bytearray(2 << 30)"],
        capture_output=True,
        text=True,
        check=False,
        preexec_fn=_limits,
    )
    assert proc.returncode != 0
    assert "MemoryError" in proc.stderr
