"""The hostile-vmdk corpus: real qemu-img disks with one field or fact broken each.

Run as the qcow2 corpus is (tests/test_hostile.py): ``blkverify verify`` under a 1 GiB
address-space limit and a time limit, ``bv.open`` and a whole-disk read in this process,
and ``qemu-img info``/``check``/``convert`` on the same disk. We must be at least as
strict as QEMU: where it refuses a disk or fails a read, we refuse or report; where we
read a disk, we read exactly the bytes ``qemu-img convert`` does. We are often stricter
(QEMU skips extent lines it does not understand, reads tables past the end of the file
as zeros, and checks neither the newline bytes nor grain markers); each such case says
what we refuse.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, qemu_img, qemu_io
from test_hostile import TIME_LIMIT, read_whole, run_bounded_cli
from vmdk_images import (
    GD_AT_END,
    SECTOR,
    descriptor_text,
    edit_descriptor,
    effective_header,
    grain_directory,
    grain_marker,
    grains,
    gte_offset,
    header,
    patch_header,
    read_at,
    set_embedded_descriptor,
    to_footer_layout,
    write_at,
)

CORRUPT, FORMAT = bv.CorruptImageError, bv.FormatError


@dataclass(frozen=True)
class Base:
    path: Path
    expected: Path


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("hostile-vmdk")
    out: dict[str, Base] = {}

    def expected(img: Path) -> Path:
        raw = d / f"{img.stem}.raw"
        qemu_img("convert", "-f", "vmdk", "-O", "raw", img.name, raw, cwd=d)
        return raw

    def create(name: str, opts: str, *writes: str, size: str = "4M") -> Path:
        img = d / f"{name}.vmdk"
        qemu_img("create", "-q", "-f", "vmdk", "-o", opts, img.name, size, cwd=d)
        if writes:
            qemu_io(img.name, *writes, fmt="vmdk", cwd=d)
        return img

    writes = ("write -P 0xab 0 128k", "write -P 0x5c 1M 64k", "write -P 0x77 4032k 64k")
    for name, opts in [
        ("sparse", "subformat=monolithicSparse"),
        ("zg", "subformat=monolithicSparse,zeroed_grain=on"),
        ("flat", "subformat=monolithicFlat"),
        ("split", "subformat=twoGbMaxExtentSparse"),
    ]:
        img = create(name, opts, *writes)
        out[name] = Base(img, expected(img))
    qemu_io(out["zg"].path, "write -z 2M 128k", fmt="vmdk")
    out["zg"] = Base(out["zg"].path, expected(out["zg"].path))
    source = d / "source.raw"
    qemu_img("create", "-q", "-f", "raw", source, "4M")
    qemu_io(source, "write -P 0x11 0 1M", "write -P 0x22 3M 64k", fmt="raw")
    stream = d / "stream.vmdk"
    qemu_img("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", source, stream)
    out["stream"] = Base(stream, expected(stream))
    footer = d / "footer.vmdk"
    to_footer_layout(stream, footer)
    out["footer"] = Base(footer, expected(footer))
    base = create("parent", "subformat=monolithicSparse", "write -P 0x42 0 4M")
    qemu_img("create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", "top.vmdk", cwd=d)
    qemu_io("top.vmdk", "write -P 0x17 64k 64k", fmt="vmdk", cwd=d)
    out["top"] = Base(d / "top.vmdk", expected(d / "top.vmdk"))
    return out


# --------------------------------------------------------------------------------------------
# damage
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    patch: Callable[[Path], None]
    # As in test_hostile: "open" refused at open (exit 2), "read" opens but reading
    # fails (verify: exit 1, a read error), "ok" must read as qemu-img reads it, "any"
    # only the shared rules.
    expect: str
    match: str = ""
    exc: type = CORRUPT


def hdr(field: str, value) -> Callable[[Path], None]:
    return lambda p: patch_header(p, field, value)


def hdr_fn(field: str, fn: Callable[[dict], int]) -> Callable[[Path], None]:
    return lambda p: patch_header(p, field, fn(header(p)))


def footer_field(field: str, value) -> Callable[[Path], None]:
    return lambda p: patch_header(p, field, value, at=p.stat().st_size - 2 * SECTOR)


def gd_entry(index: int, fn: Callable[[int, Path], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at = effective_header(p)["gd_offset"] * SECTOR + 4 * index
        write_at(p, at, struct.pack("<I", fn(grain_directory(p)[index], p)))

    return patch


def gte(guest: int, fn: Callable[[int, Path], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at = gte_offset(p, guest)
        old = struct.unpack("<I", read_at(p, at, 4))[0]
        write_at(p, at, struct.pack("<I", fn(old, p)))

    return patch


def marker(index: int, fn: Callable[[int, int, int, Path], bytes]) -> Callable[[Path], None]:
    """Rewrite the bytes at the grain marker of the index-th compressed grain with
    fn(lba, size, sector, path)."""

    def patch(p: Path) -> None:
        _, sector = grains(p)[index]
        lba, size = grain_marker(p, sector)
        write_at(p, sector * SECTOR, fn(lba, size, sector, p))

    return patch


def stream_of(data: bytes, lba: int) -> bytes:
    packed = zlib.compress(data)
    return struct.pack("<QI", lba, len(packed)) + packed


def desc(old: str, new: str) -> Callable[[Path], None]:
    return lambda p: edit_descriptor(p, old, new)


def desc_text(fn: Callable[[str], str]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        text = descriptor_text(p)
        if read_at(p, 0, 4) == b"KDMV":
            set_embedded_descriptor(p, fn(text))
        else:
            p.write_text(fn(text))

    return patch


def file_len(p: Path) -> int:
    return p.stat().st_size


def truncate_to(n: int | Callable[[Path], int]) -> Callable[[Path], None]:
    import os

    return lambda p: os.truncate(p, n if isinstance(n, int) else n(p))


def extent_copy(fn: Callable[[Path], None]) -> Callable[[Path], None]:
    """Damage a copy of the split disk's extent, and point the case's descriptor at it."""

    def patch(p: Path) -> None:
        original = p.parent / "split-s001.vmdk"
        copy = p.parent / f"{p.stem}-s001.vmdk"
        shutil.copyfile(original, copy)
        fn(copy)
        edit_descriptor(p, '"split-s001.vmdk"', f'"{copy.name}"')

    return patch


CASES = [
    # ---- the sparse header, field by field
    Case("magic-cowd", "sparse", lambda p: write_at(p, 0, b"COWD"), "open", r"COWD", FORMAT),
    Case("version-0", "sparse", hdr("version", 0), "open", "version is 0", FORMAT),
    Case("version-4", "sparse", hdr("version", 4), "open", "version is 4", FORMAT),
    Case("version-3-ok", "sparse", hdr("version", 3), "ok"),
    Case(
        "flags-compressed-without-algorithm",
        "sparse",
        hdr_fn("flags", lambda h: h["flags"] | 1 << 16),
        "open",
        "compressed-grains flag",
    ),
    Case("flags-unknown-bits", "sparse", hdr_fn("flags", lambda h: h["flags"] | 1 << 9), "ok"),
    Case(
        "compress-algorithm-2",
        "sparse",
        hdr("compress_algorithm", 2),
        "open",
        "compressAlgorithm is 2",
        FORMAT,
    ),
    Case(
        "stream-without-markers",
        "stream",
        hdr_fn("flags", lambda h: h["flags"] & ~(1 << 17)),
        "open",
        "without grain markers",
        FORMAT,
    ),
    Case("check-bytes", "sparse", hdr("check_bytes", b"\n \n\n"), "open", "text-mode"),
    Case("unclean-shutdown", "sparse", hdr("unclean_shutdown", 1), "ok"),
    Case("capacity-0", "sparse", hdr("capacity", 0), "open", "capacity is 0"),
    Case(
        "capacity-huge",
        "sparse",
        hdr("capacity", 1 << 62),
        "open",
        "capacity is 4611686018427387904 sectors, more bytes than 64 bits can count",
    ),
    Case(
        "capacity-needs-big-gd",
        "sparse",
        hdr("capacity", 1 << 40),
        "open",
        r"grain directory of 67108864 bytes \(the limit",
    ),
    Case(
        "capacity-double",
        "sparse",
        hdr_fn("capacity", lambda h: 2 * h["capacity"]),
        "open",
        "embedded descriptor's extent .* says a SPARSE extent of 16384 sectors",
    ),
    Case("grain-size-0", "sparse", hdr("grain_size", 0), "open", "grainSize is 0"),
    Case("grain-size-3", "sparse", hdr("grain_size", 3), "open", "grainSize is 3 sectors"),
    Case(
        "grain-size-4096",
        "sparse",
        hdr("grain_size", 4096),
        "open",
        "grainSize is 4096 sectors, larger",
        FORMAT,
    ),
    Case("grain-size-huge", "sparse", hdr("grain_size", 1 << 63), "open", "grainSize is", FORMAT),
    Case("gtes-0", "sparse", hdr("gtes_per_gt", 0), "open", "numGTEsPerGT is 0"),
    Case("gtes-513", "sparse", hdr("gtes_per_gt", 513), "open", "numGTEsPerGT is 513"),
    Case("gtes-4", "sparse", hdr("gtes_per_gt", 4), "any"),
    Case("gd-offset-0", "sparse", hdr("gd_offset", 0), "open", "grain directory is at sector 0"),
    Case(
        "gd-offset-past-eof",
        "sparse",
        hdr("gd_offset", 1 << 30),
        "open",
        "grain directory at 0x8000000000 .* past the end of the file",
    ),
    Case("gd-offset-huge", "sparse", hdr("gd_offset", 1 << 62), "open", "past any file"),
    Case(
        "gd-at-end-without-footer",
        "sparse",
        hdr("gd_offset", GD_AT_END),
        "open",
        "gdOffset is 0xffffffffffffffff .* not a footer marker",
    ),
    Case(
        "rgd-offset-past-eof",
        "sparse",
        hdr("rgd_offset", 1 << 30),
        "open",
        "redundant grain directory .* past the end of the file",
    ),
    Case("rgd-offset-0", "sparse", hdr("rgd_offset", 0), "ok"),
    Case("overhead-huge", "sparse", hdr("overhead", 1 << 40), "open", "overHead is"),
    Case(
        "descriptor-offset-past-eof",
        "sparse",
        hdr("descriptor_offset", 1 << 30),
        "open",
        "embedded descriptor at .* past the end of the file",
    ),
    Case(
        "descriptor-size-huge",
        "sparse",
        hdr("descriptor_size", 1 << 40),
        "open",
        "descriptorSize is 1099511627776",
    ),
    Case("descriptor-offset-0", "sparse", hdr("descriptor_offset", 0), "open", "no embedded"),
    # ---- grain directory and grain table entries
    Case(
        "gd-entry-past-eof",
        "sparse",
        gd_entry(0, lambda e, p: 1 << 30),
        "read",
        "GD index 0: grain table at 0x8000000000 lies past the end of the file",
    ),
    Case(
        "gd-entry-on-gd",
        "sparse",
        gd_entry(0, lambda e, p: header(p)["gd_offset"]),
        "read",
        "grain table at .* overlaps the grain directory",
    ),
    Case("gd-entry-0", "sparse", gd_entry(0, lambda e, p: 0), "ok"),
    Case("gd-entry-redundant-copy", "sparse", gd_entry(0, lambda e, p: e - 4 - 1), "any"),
    Case(
        "gte-past-eof",
        "sparse",
        gte(0, lambda e, p: 0x7FFFFFFF),
        "read",
        "GD index 0, GT index 0: grain at host offset 0xfffffffe00 lies past the end of the file",
    ),
    Case(
        "gte-in-metadata",
        "sparse",
        gte(0, lambda e, p: 2),
        "read",
        "grain at sector 0x2 lies inside the metadata area",
    ),
    Case(
        "gte-1-without-zeroed-grain",
        "sparse",
        gte(0, lambda e, p: 1),
        "read",
        "grain at sector 0x1 lies inside the metadata area",
    ),
    Case("gte-1-zeroed-grain", "zg", gte(0, lambda e, p: 1), "ok"),
    Case("gte-shifted", "sparse", gte(0, lambda e, p: e + 1), "ok"),
    Case("gte-same-grain-twice", "sparse", gte(1 * MiB, lambda e, p: grains(p)[0][1]), "ok"),
    Case(
        "gte-last-grain-cut",
        "sparse",
        truncate_to(lambda p: file_len(p) - 4096),
        "read",
        "lies past the end of the file",
    ),
    # ---- compressed grains and their markers
    Case(
        "marker-lba",
        "stream",
        marker(3, lambda lba, size, s, p: struct.pack("<Q", lba + 128)),
        "read",
        "grain marker says sector 0x",
    ),
    Case(
        "marker-size-0",
        "stream",
        marker(3, lambda lba, size, s, p: struct.pack("<QI", lba, 0)),
        "read",
        "the stream is 0 bytes",
    ),
    Case(
        "marker-size-huge",
        "stream",
        marker(3, lambda lba, size, s, p: struct.pack("<QI", lba, 0xFFFFFFFF)),
        "read",
        "the stream is 4294967295 bytes",
    ),
    Case(
        "marker-size-past-eof",
        "stream",
        marker(-1, lambda lba, size, s, p: struct.pack("<QI", lba, 100000)),
        "read",
        "100000-byte stream runs past the end of the file",
    ),
    Case(
        "stream-garbage",
        "stream",
        marker(3, lambda lba, size, s, p: struct.pack("<QI", lba, size) + bytes(range(200))),
        "read",
        "zlib stream is invalid",
    ),
    Case(
        "stream-checksum",
        "stream",
        marker(
            3,
            lambda lba, size, s, p: (
                struct.pack("<QI", lba, size)
                + read_at(p, s * SECTOR + 12, size - 1)
                + bytes([read_at(p, s * SECTOR + 11 + size, 1)[0] ^ 1])
            ),
        ),
        "read",
        "zlib stream is invalid",
    ),
    Case(
        "stream-short",
        "stream",
        marker(3, lambda lba, size, s, p: stream_of(b"\x11" * 100, lba)),
        "read",
        "zlib stream holds 100 bytes, not a whole grain",
    ),
    Case(
        "stream-long",
        "stream",
        marker(3, lambda lba, size, s, p: stream_of(b"\x11" * 131072, lba)),
        "read",
        "zlib stream holds more than a grain",
    ),
    Case(
        "compressed-gte-past-eof",
        "stream",
        gte(0, lambda e, p: 0x7FFFFFFF),
        "read",
        "compressed grain at host offset 0xfffffffe00 lies past the end of the file",
    ),
    Case(
        "compressed-gte-in-metadata",
        "stream",
        gte(0, lambda e, p: 3),
        "read",
        "inside the metadata area",
    ),
    # ---- the footer of a stream-optimized disk
    Case("footer-ok", "footer", lambda p: None, "ok"),
    Case(
        "footer-marker-type",
        "footer",
        lambda p: write_at(p, file_len(p) - 3 * SECTOR + 12, struct.pack("<I", 2)),
        "open",
        "not a footer marker",
    ),
    Case(
        "footer-eos-marker",
        "footer",
        lambda p: write_at(p, file_len(p) - SECTOR, b"\x01"),
        "open",
        "not an end-of-stream marker",
    ),
    Case(
        "footer-magic",
        "footer",
        lambda p: write_at(p, file_len(p) - 2 * SECTOR, b"XXXX"),
        "open",
        "footer does not start with the magic",
    ),
    Case(
        "footer-capacity",
        "footer",
        footer_field("capacity", 16384),
        "open",
        "the header says capacity 8192, the footer says 16384",
    ),
    Case(
        "footer-gd-at-end",
        "footer",
        footer_field("gd_offset", GD_AT_END),
        "open",
        "footer's gdOffset is 0xffffffffffffffff too",
    ),
    Case(
        "footer-gd-past-eof",
        "footer",
        footer_field("gd_offset", 1 << 30),
        "open",
        "footer: the grain directory at .* past the end of the file",
    ),
    Case(
        "footer-grain-size",
        "footer",
        footer_field("grain_size", 3),
        "open",
        "the header says grainSize 128, the footer says 3",
    ),
    Case(
        "footer-missing",
        "footer",
        truncate_to(lambda p: file_len(p) - 3 * SECTOR),
        "open",
        "gdOffset is 0xffffffffffffffff",
    ),
    Case(
        "footer-unaligned-file",
        "footer",
        lambda p: write_at(p, file_len(p), b"x"),
        "open",
        "not a whole number of sectors",
    ),
    # ---- descriptors: createType
    *[
        Case(
            f"create-type-{t}",
            "flat",
            desc('createType="monolithicFlat"', f'createType="{t}"'),
            "open",
            f"createType '{t}' is not supported",
            FORMAT,
        )
        for t in ("custom", "fullDevice", "partitionedDevice", "vmfs", "vmfsSparse", "seSparse")
    ],
    Case(
        "create-type-missing",
        "flat",
        desc('createType="monolithicFlat"', ""),
        "open",
        "no createType",
    ),
    Case(
        "create-type-monolithic-sparse-file",
        "flat",
        desc('createType="monolithicFlat"', 'createType="monolithicSparse"'),
        "open",
        "a separate descriptor file cannot describe one",
        FORMAT,
    ),
    Case(
        "embedded-create-type-flat",
        "sparse",
        desc('createType="monolithicSparse"', 'createType="monolithicFlat"'),
        "open",
        "embedded descriptor says createType monolithicFlat",
    ),
    Case(
        "embedded-create-type-stream",
        "sparse",
        desc('createType="monolithicSparse"', 'createType="streamOptimized"'),
        "open",
        "grains are not compressed",
    ),
    Case(
        "embedded-create-type-custom",
        "sparse",
        desc('createType="monolithicSparse"', 'createType="custom"'),
        "open",
        "createType 'custom' is not supported",
        FORMAT,
    ),
    Case(
        "embedded-two-extents",
        "sparse",
        desc_text(
            lambda t: t.replace('SPARSE "sparse.vmdk"', 'SPARSE "sparse.vmdk"\nRW 8 FLAT "x" 0')
        ),
        "open",
        "lists 2 extents",
    ),
    # ---- descriptors: extent lines
    *[
        Case(
            f"extent-type-{t}",
            "flat",
            desc(" FLAT ", f" {t} "),
            "open",
            f"unsupported vmdk extent type {t}",
            FORMAT,
        )
        for t in ("VMFSSPARSE", "VMFS", "SESPARSE", "VMFSRDM", "VMFSRAW", "ZERO", "flat")
    ],
    Case(
        "extent-access-noaccess",
        "flat",
        desc("RW ", "NOACCESS "),
        "open",
        "extent access NOACCESS",
        FORMAT,
    ),
    Case("extent-none", "flat", desc("RW 8192 FLAT", "#"), "open", "lists no extents"),
    Case("extent-size-0", "flat", desc("RW 8192", "RW 0"), "open", "not a positive number"),
    Case(
        "extent-size-huge",
        "flat",
        desc("RW 8192", "RW 99999999999999999999"),
        "open",
        "not a positive number",
    ),
    Case(
        "extent-size-overflow",
        "flat",
        desc_text(
            lambda t: t.replace("RW 8192 FLAT", "RW 36028797018963967 FLAT", 1).replace(
                '" 0\n', '" 0\nRW 36028797018963967 FLAT "flat-flat.vmdk" 0\n', 1
            )
        ),
        "open",
        "more bytes than 64 bits",
    ),
    Case("extent-flat-too-long", "flat", desc("RW 8192", "RW 8193"), "open", "needs bytes"),
    Case(
        "extent-flat-offset-huge",
        "flat",
        desc('-flat.vmdk" 0', '-flat.vmdk" 18014398509481983'),
        "open",
        "needs bytes",
    ),
    Case(
        "extent-flat-no-offset",
        "flat",
        desc('-flat.vmdk" 0', '-flat.vmdk"'),
        "open",
        "needs the offset",
    ),
    Case("extent-flat-offset-ok", "flat", desc("RW 8192", "RW 8191"), "ok"),
    Case(
        "extent-sparse-offset",
        "split",
        desc('s001.vmdk"', 's001.vmdk" 0'),
        "open",
        "takes no offset",
    ),
    Case(
        "extent-sparse-size",
        "split",
        desc("RW 8192", "RW 8000"),
        "open",
        "the descriptor says 8000 sectors, but the extent's header says its capacity is 8192",
    ),
    Case(
        "extent-sparse-is-flat-data",
        "split",
        desc('SPARSE "split-s001.vmdk"', 'SPARSE "flat-flat.vmdk"'),
        "open",
        "must start with the magic KDMV",
    ),
    Case(
        "extent-missing",
        "flat",
        desc('"flat-flat.vmdk"', '"no-such-flat.vmdk"'),
        "open",
        "no-such-flat.vmdk",
        OSError,
    ),
    Case(
        "extent-absolute-outside",
        "flat",
        desc('"flat-flat.vmdk"', '"/etc/passwd"'),
        "open",
        "extent '/etc/passwd' .* outside the image's directory",
        FORMAT,
    ),
    Case(
        "extent-dotdot-outside",
        "flat",
        desc('"flat-flat.vmdk"', '"../../../../../etc/passwd"'),
        "open",
        "outside the image's directory",
        FORMAT,
    ),
    Case(
        "extent-no-quotes",
        "flat",
        desc('"flat-flat.vmdk"', "flat-flat.vmdk"),
        "open",
        "not in double quotes",
    ),
    Case(
        "extent-header-damaged",
        "split",
        extent_copy(hdr("grain_size", 3)),
        "open",
        "grainSize is 3 sectors",
    ),
    Case(
        "extent-gte-past-eof",
        "split",
        extent_copy(gte(0, lambda e, p: 0x7FFFFFFF)),
        "read",
        "lies past the end of the file",
    ),
    # ---- descriptors: keys and text
    Case("cid-missing", "flat", desc_text(lambda t: re.sub(r"\nCID=\w+", "", t)), "open", "no CID"),
    Case(
        "cid-bad",
        "flat",
        desc_text(lambda t: re.sub(r"\nCID=\w+", "\nCID=xyz", t)),
        "open",
        "CID 'xyz'",
    ),
    Case(
        "cid-twice",
        "flat",
        desc_text(lambda t: re.sub(r"\nCID=", "\nCID=1\nCID=", t)),
        "open",
        "CID is given twice",
    ),
    Case("parent-cid-missing", "flat", desc("parentCID=ffffffff\n", ""), "open", "no parentCID"),
    Case("version-7", "flat", desc("version=1", "version=7"), "open", "version is '7'", FORMAT),
    Case(
        "garbage-line",
        "flat",
        desc("version=1", "version=1\nhello world"),
        "open",
        "neither a KEY=VALUE",
    ),
    Case(
        "not-utf8",
        "flat",
        lambda p: write_at(p, p.read_bytes().index(b"# Extent"), b"\xff\xfe"),
        "open",
        "descriptor line 7: not valid UTF-8",
    ),
    Case(
        "unmatched-quote",
        "flat",
        desc('createType="monolithicFlat"', 'createType="monolithicFlat'),
        "open",
        "unmatched quote",
    ),
    Case(
        "descriptor-file-huge",
        "flat",
        lambda p: p.write_text(descriptor_text(p) + "#" * (1 << 20) + "\n"),
        "open",
        "a descriptor is at most",
    ),
    Case(
        "unknown-keys-ignored",
        "flat",
        desc("version=1", 'version=1\nuuid.image="x"\nchangeTrackPath="y"'),
        "ok",
    ),
    # ---- differencing disks
    Case(
        "parent-cid-mismatch",
        "top",
        desc_text(lambda t: re.sub(r"parentCID=\w+", "parentCID=12345678", t)),
        "open",
        "parentCID is 12345678, but the parent 'parent.vmdk' has CID",
    ),
    Case(
        "parent-cid-none",
        "top",
        desc_text(lambda t: re.sub(r"parentCID=\w+", "parentCID=ffffffff", t)),
        "open",
        "parentCID is ffffffff",
    ),
    Case(
        "parent-missing",
        "top",
        desc('"parent.vmdk"', '"no-such-parent.vmdk"'),
        "open",
        "no-such-parent.vmdk",
        OSError,
    ),
    Case(
        "parent-outside",
        "top",
        desc('"parent.vmdk"', '"/etc/passwd"'),
        "open",
        "outside the image's directory",
        FORMAT,
    ),
    Case(
        "parent-json",
        "top",
        desc('"parent.vmdk"', '"json:{}"'),
        "open",
        "not a plain file name",
        FORMAT,
    ),
    Case(
        "parent-self",
        "top",
        lambda p: edit_descriptor(p, '"parent.vmdk"', f'"{p.name}"'),
        "open",
        "backing chain loops",
    ),
    Case(
        "parent-hint-empty",
        "top",
        desc('"parent.vmdk"', '""'),
        "open",
        "parentFileNameHint is empty",
    ),
]

# ---- truncated files
CASES += [
    Case(f"truncated-sparse-{n}", "sparse", truncate_to(n), "any")
    for n in (4, 100, 511, 512, 1024, 10240, 11264, 65536, 300000)
]
CASES += [
    Case("truncated-sparse-half", "sparse", truncate_to(lambda p: file_len(p) // 2), "any"),
    Case("truncated-stream-half", "stream", truncate_to(lambda p: file_len(p) // 2), "any"),
    Case("truncated-stream-last", "stream", truncate_to(lambda p: file_len(p) - 100), "any"),
    Case("truncated-footer-half", "footer", truncate_to(lambda p: file_len(p) // 2), "any"),
    Case("truncated-flat-descriptor", "flat", truncate_to(100), "any"),
    Case("truncated-top", "top", truncate_to(4096), "any"),
]


# --------------------------------------------------------------------------------------------
# running a case
# --------------------------------------------------------------------------------------------


@dataclass
class QemuView:
    opens: bool
    corrupt: bool
    raw: bytes | None


def qemu_view(img: Path, tmp: Path) -> QemuView:
    def q(*args) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["qemu-img", *map(str, args)],
                capture_output=True,
                encoding="utf-8",
                errors="replace",
                timeout=8,
                cwd=img.parent,
            )
        except subprocess.TimeoutExpired:
            return None

    info = q("info", "--output=json", "-f", "vmdk", img.name)
    opens = info is not None and info.returncode == 0
    check = q("check", "-f", "vmdk", img.name)
    corrupt = check is None or check.returncode not in (0, 3)
    raw = None
    if opens and info is not None and json.loads(info.stdout)["virtual-size"] <= 64 * MiB:
        out = tmp / "qemu.raw"
        conv = q("convert", "-f", "vmdk", "-O", "raw", img.name, out)
        if conv is not None and conv.returncode == 0:
            raw = out.read_bytes()
    return QemuView(opens, corrupt, raw)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_vmdk(case: Case, bases, tmp_path: Path) -> None:
    base = bases[case.base]
    # Beside its base, so that the names it holds resolve as the base's do.
    img = base.path.parent / f"case-{case.id}.vmdk"
    shutil.copyfile(base.path, img)
    try:
        _check_case(case, base, img, tmp_path)
    finally:
        for leftover in base.path.parent.glob(f"case-{case.id}*"):
            leftover.unlink()


def _check_case(case: Case, base: Base, img: Path, tmp_path: Path) -> None:
    case.patch(img)
    damaged = img.read_bytes()
    qemu = qemu_view(img, tmp_path)
    reference = base.expected
    if case.expect == "ok":
        assert qemu.raw is not None, "qemu-img cannot read a case marked ok"
        reference = tmp_path / "reference.raw"
        reference.write_bytes(qemu.raw)

    # 1. The CLI, bounded in memory and time.
    proc, seconds = run_bounded_cli("verify", reference, img)
    out = proc.stdout + proc.stderr
    assert seconds < TIME_LIMIT, f"verify took {seconds:.1f}s"
    assert "Traceback" not in out and "panicked" not in out, out
    assert proc.returncode in (0, 1, 2), (proc.returncode, out)
    if proc.returncode == 2:
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("blkverify: error:")]
        named = img.stem in line or (case.exc is OSError and re.search(case.match, line))
        assert named, line
    if case.expect == "open":
        assert proc.returncode == 2, out
        assert re.search(case.match, proc.stderr), proc.stderr
    elif case.expect == "read":
        assert proc.returncode == 1, out
        assert "read error in sector" in proc.stdout, out
        assert re.search(case.match, proc.stdout), proc.stdout
        assert img.stem in proc.stdout
    elif case.expect == "ok":
        assert proc.returncode == 0, out

    # 2. The Python API: the exception class, the file and the fact.
    if case.expect == "open":
        with pytest.raises(case.exc) as info:
            bv.open(img)
        assert re.search(case.match, str(info.value)), info.value
        if case.exc is not OSError:
            assert img.stem in str(info.value)
    elif case.expect == "read":
        with bv.open(img) as opened, pytest.raises(case.exc) as info:
            read_whole(opened, opened.size)
        assert re.search(case.match, str(info.value)), info.value
        assert img.stem in str(info.value)
    else:
        try:
            opened = bv.open(img)
        except (bv.Error, OSError) as exc:
            assert case.expect == "any", exc
        else:
            with opened:
                try:
                    ours = read_whole(opened, opened.size)
                except bv.CorruptImageError as exc:
                    assert case.expect == "any", exc
                    assert img.stem in str(exc)
                else:
                    # Whatever we read, QEMU reads too: never a silent wrong answer.
                    assert qemu.raw is not None, "we read a disk qemu-img cannot"
                    assert ours == qemu.raw
    assert img.read_bytes() == damaged, "reading changed the disk"

    # 3. At least as strict as QEMU.
    if not qemu.opens or qemu.raw is None:
        assert proc.returncode != 0, "qemu-img refuses this disk; we accepted it"
    if qemu.corrupt:
        assert proc.returncode != 0, "qemu-img check finds this disk corrupt; we said nothing"
    if proc.returncode == 0:
        assert qemu.raw is not None and qemu.raw == reference.read_bytes()
