"""The hostile-image corpus for VHD (``vpc``) and VDI: real qemu-img images with one
field or fact broken each, run as ``tests/test_hostile.py`` runs the qcow2 corpus (the CLI
under a memory and time limit, the Python API, and ``qemu-img info``/``check``/``convert``
on the same file). We are at least as strict as QEMU: where it refuses to open or read an
image, or ``qemu-img check`` finds it corrupt, we refuse or report; where we read an
image, we read exactly the bytes ``qemu-img convert`` does.

Where we are stricter than QEMU, the case says so: QEMU does not check the dynamic
disk header's checksum, a footer copy that disagrees with the footer, the VDI header
size, or that BAT blocks overlap nothing, and it reads VDI blocks past the end of the
file as zeros.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blkverify_rs as bv
import pytest
import vhd_builder as vb
from conftest import MiB, qemu_img, qemu_io
from test_hostile import TIME_LIMIT, read_at, read_whole, run_bounded_cli, write_at

CORRUPT, FORMAT = bv.CorruptImageError, bv.FormatError


@dataclass(frozen=True)
class Base:
    path: Path
    fmt: str
    expected: Path


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("hostile-vpc-vdi")
    out = {}

    def make(name: str, fmt: str, opts: str, size: int, *writes: str) -> None:
        p = d / f"{name}.{fmt}"
        qemu_img("create", "-q", "-f", fmt, "-o", opts, p, size)
        qemu_io(p, *writes, fmt=fmt)
        raw = d / f"{name}.raw"
        qemu_img("convert", "-f", fmt, "-O", "raw", p, raw)
        out[name] = Base(p, fmt, raw)

    writes = ("write -P 0xab 0 64k", "write -P 0x5c 3M 8k", "write -P 0x6d 5M 4k")
    make("vpc-dynamic", "vpc", "subformat=dynamic,force_size=on", 6 * MiB, *writes)
    make("vpc-fixed", "vpc", "subformat=fixed,force_size=on", 6 * MiB, *writes)
    make("vdi-dynamic", "vdi", "static=off", 6 * MiB, *writes)
    make("vdi-static", "vdi", "static=on", 6 * MiB, *writes)
    return out


# --------------------------------------------------------------------------------------------
# patches
# --------------------------------------------------------------------------------------------


def u32_be(p: Path, at: int) -> int:
    return struct.unpack(">I", read_at(p, at, 4))[0]


def fix_footer(p: Path, at: int) -> None:
    foot = bytearray(read_at(p, at, 512))
    struct.pack_into(">I", foot, 64, vb.vhd_checksum(bytes(foot), 64))
    write_at(p, at, bytes(foot))


def footer(offset: int, value: bytes, where: str = "both", fix: bool = True):
    """Patch the footer at the end (``tail``), its copy at 0 (``head``), or both."""

    def patch(p: Path) -> None:
        places = {"both": [0, p.stat().st_size - 512], "head": [0]}.get(
            where, [p.stat().st_size - 512]
        )
        if read_at(p, 0, 8) != b"conectix":
            places = [p.stat().st_size - 512]  # a fixed disk has only the one
        for at in places:
            write_at(p, at + offset, value)
            if fix:
                fix_footer(p, at)

    return patch


def dyn(offset: int, value: bytes, fix: bool = True):
    """Patch the dynamic disk header (at 512 in qemu-img's images)."""

    def patch(p: Path) -> None:
        write_at(p, 512 + offset, value)
        if fix:
            h = bytearray(read_at(p, 512, 1024))
            struct.pack_into(">I", h, 36, vb.vhd_checksum(bytes(h), 36))
            write_at(p, 512, bytes(h))

    return patch


def bat(index: int, value: int | Callable[[Path], int]):
    def patch(p: Path) -> None:
        table = struct.unpack(">Q", read_at(p, 512 + 16, 8))[0]
        v = value if isinstance(value, int) else value(p)
        write_at(p, table + 4 * index, struct.pack(">I", v))

    return patch


def vdi(offset: int, value: int, width: int = 4):
    return lambda p: write_at(p, offset, value.to_bytes(width, "little"))


def bmap(block: int, value: int):
    def patch(p: Path) -> None:
        at = int.from_bytes(read_at(p, 0x154, 4), "little")
        write_at(p, at + 4 * block, struct.pack("<I", value))

    return patch


def truncate_to(n: int | Callable[[Path], int]):
    return lambda p: os.truncate(p, n if isinstance(n, int) else n(p))


def both(*patches):
    def patch(p: Path) -> None:
        for one in patches:
            one(p)

    return patch


def append(data: bytes):
    def patch(p: Path) -> None:
        with open(p, "ab") as f:
            f.write(data)

    return patch


def size(p: Path) -> int:
    return p.stat().st_size


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    patch: Callable[[Path], None]
    # "open": refused at open (exit 2); "read": opens, reading fails (verify: exit 1);
    # "ok": a strange but valid image read exactly as qemu-img reads it; "any": only the
    # shared rules (truncations).
    expect: str
    match: str = ""
    exc: type = CORRUPT


VPC_CASES = [
    # ---- the footer and its copy
    Case(
        "cookie-head",
        "vpc-dynamic",
        footer(0, b"xonectix", "head", fix=False),
        "open",
        "no copy at 0x0",
    ),
    Case(
        "cookie-both",
        "vpc-dynamic",
        footer(0, b"xonectix", fix=False),
        "open",
        "no VHD footer",
        FORMAT,
    ),
    Case(
        "checksum-head",
        "vpc-dynamic",
        footer(64, b"\0\0\0\1", "head", fix=False),
        "open",
        r"footer at 0x0: checksum",
    ),
    Case("checksum-tail", "vpc-dynamic", footer(64, b"\0\0\0\1", "tail", fix=False), "ok"),
    Case("checksum-fixed", "vpc-fixed", footer(64, b"\0\0\0\1", fix=False), "open", "checksum"),
    Case(
        "tail-differs",
        "vpc-dynamic",
        footer(48, struct.pack(">Q", 4 * MiB), "tail"),
        "open",
        "differ in the current size",
    ),
    Case("tail-missing", "vpc-dynamic", truncate_to(lambda p: size(p) - 512), "ok"),
    Case(
        "version-2",
        "vpc-dynamic",
        footer(12, struct.pack(">I", 0x20000)),
        "open",
        r"version is 2\.0",
        FORMAT,
    ),
    Case("version-minor", "vpc-dynamic", footer(12, struct.pack(">I", 0x10005)), "ok"),
    Case(
        "type-5", "vpc-dynamic", footer(60, struct.pack(">I", 5)), "open", "disk type is 5", FORMAT
    ),
    Case("type-0", "vpc-fixed", footer(60, struct.pack(">I", 0)), "open", "disk type is 0", FORMAT),
    Case(
        "type-fixed-at-head",
        "vpc-dynamic",
        footer(60, struct.pack(">I", 2)),
        "open",
        "says the disk is fixed",
    ),
    Case(
        "fixed-says-dynamic",
        "vpc-fixed",
        footer(60, struct.pack(">I", 3)),
        "open",
        "no copy at 0x0",
    ),
    Case(
        "size-over-2040G",
        "vpc-dynamic",
        footer(48, struct.pack(">Q", (0xFF000001) * 512)),
        "open",
        "2040 GiB",
        FORMAT,
    ),
    Case(
        "size-beyond-bat",
        "vpc-dynamic",
        footer(48, struct.pack(">Q", 100 * MiB)),
        "open",
        "less than the disk size",
    ),
    Case("size-smaller", "vpc-dynamic", footer(48, struct.pack(">Q", 3 * MiB + 1000)), "ok"),
    Case(
        "geometry-creator", "vpc-dynamic", footer(28, b"qemu"), "ok"
    ),  # CHS: 65535/16/255 is "use current size"
    Case(
        "geometry-small",
        "vpc-dynamic",
        both(footer(28, b"vpc "), footer(56, struct.pack(">HBB", 100, 4, 17))),
        "ok",
    ),
    Case(
        "fixed-size-past-data",
        "vpc-fixed",
        footer(48, struct.pack(">Q", 6 * MiB + 512)),
        "open",
        "more than the",
    ),
    Case(
        "data_offset-past-eof",
        "vpc-dynamic",
        footer(16, struct.pack(">Q", 1 << 40)),
        "open",
        "past the end of the file",
    ),
    Case(
        "data_offset-huge",
        "vpc-dynamic",
        footer(16, struct.pack(">Q", (1 << 64) - 1)),
        "open",
        "past the end of the file",
    ),
    Case(
        "data_offset-0", "vpc-dynamic", footer(16, struct.pack(">Q", 0)), "open", "not 'cxsparse'"
    ),
    # ---- the dynamic disk header
    Case("dyn-cookie", "vpc-dynamic", dyn(0, b"cxsparsf"), "open", "not 'cxsparse'"),
    Case(
        "dyn-checksum", "vpc-dynamic", dyn(36, b"\0\0\0\1", fix=False), "open", "header sums to"
    ),  # QEMU: reads it
    Case(
        "dyn-version-2",
        "vpc-dynamic",
        dyn(24, struct.pack(">I", 0x20000)),
        "open",
        r"header version is 2\.0",
        FORMAT,
    ),
    Case("block_size-0", "vpc-dynamic", dyn(32, struct.pack(">I", 0)), "open", "block size is 0"),
    Case(
        "block_size-3000",
        "vpc-dynamic",
        dyn(32, struct.pack(">I", 3000)),
        "open",
        "not a power of two",
    ),
    Case(
        "block_size-512",
        "vpc-dynamic",
        dyn(32, struct.pack(">I", 512)),
        "open",
        "block size is 512",
        FORMAT,
    ),
    Case(
        "block_size-2^31",
        "vpc-dynamic",
        dyn(32, struct.pack(">I", 1 << 31)),
        "open",
        "past the end of the file",
    ),
    Case(
        "block_size-1M",
        "vpc-dynamic",
        dyn(32, struct.pack(">I", 1 << 20)),
        "open",
        "less than the disk size",
    ),
    Case(
        "max_table_entries-0",
        "vpc-dynamic",
        dyn(28, struct.pack(">I", 0)),
        "open",
        "max_table_entries is 0",
    ),
    Case(
        "max_table_entries-limit",
        "vpc-dynamic",
        dyn(28, struct.pack(">I", (32 << 20) // 4 + 1)),
        "open",
        "limit",
    ),
    Case(
        "max_table_entries-huge",
        "vpc-dynamic",
        dyn(28, struct.pack(">I", 0xFFFFFFFF)),
        "open",
        "max_table_entries is 4294967295",
    ),
    Case(
        "max_table_entries-past-eof",
        "vpc-dynamic",
        dyn(28, struct.pack(">I", 1 << 22)),
        "open",
        "BAT at .* past the end",
    ),
    Case(
        "table_offset-past-eof",
        "vpc-dynamic",
        dyn(16, struct.pack(">Q", 1 << 40)),
        "open",
        "BAT at .* past the end",
    ),
    Case(
        "table_offset-huge",
        "vpc-dynamic",
        dyn(16, struct.pack(">Q", (1 << 64) - 4)),
        "open",
        "BAT at .* past the end",
    ),
    Case(
        "table_offset-0",
        "vpc-dynamic",
        dyn(16, struct.pack(">Q", 0)),
        "open",
        "BAT at 0x0 overlaps the footer copy",
    ),
    Case(
        "table_offset-in-header",
        "vpc-dynamic",
        dyn(16, struct.pack(">Q", 1024)),
        "open",
        "overlaps the dynamic disk header",
    ),
    # ---- BAT entries
    Case(
        "bat-past-eof",
        "vpc-dynamic",
        bat(0, 0x100000),
        "open",
        "BAT entry 0 .* past the end of the file",
    ),
    Case(
        "bat-last-sector",
        "vpc-dynamic",
        bat(2, lambda p: size(p) // 512 - 1),
        "open",
        "BAT entry 2 .* past the end",
    ),
    Case(
        "bat-on-header",
        "vpc-dynamic",
        bat(0, 1),
        "open",
        "BAT entry 0 .* on top of the dynamic disk header",
    ),
    Case("bat-on-footer-copy", "vpc-dynamic", bat(0, 0), "open", "on top of the footer copy"),
    Case("bat-on-bat", "vpc-dynamic", bat(0, 3), "open", "on top of the BAT"),
    Case(
        "bat-on-footer",
        "vpc-dynamic",
        bat(2, lambda p: (size(p) - 512 - 2 * MiB) // 512),
        "open",
        "on top of the footer",
    ),
    Case(
        "bat-same-block",
        "vpc-dynamic",
        bat(2, lambda p: u32_be(p, 0x600)),
        "open",
        "BAT entries 0 and 2 .* overlap",
    ),
    Case(
        "bat-overlapping", "vpc-dynamic", bat(2, lambda p: u32_be(p, 0x600) + 8), "open", "overlap"
    ),
    Case("bat-unallocated", "vpc-dynamic", bat(0, 0xFFFFFFFF), "ok"),
    # ---- truncations
    Case("truncated-0", "vpc-dynamic", truncate_to(0), "open", "too short to hold a VHD footer"),
    Case("truncated-511", "vpc-dynamic", truncate_to(511), "open", "too short"),
    Case("truncated-512", "vpc-dynamic", truncate_to(512), "open", "past the end of the file"),
    Case("truncated-1000", "vpc-dynamic", truncate_to(1000), "open", "past the end of the file"),
    Case("truncated-header", "vpc-dynamic", truncate_to(1536), "open", "BAT at .* past the end"),
    Case(
        "truncated-half",
        "vpc-dynamic",
        truncate_to(lambda p: size(p) // 2),
        "open",
        "past the end of the file",
    ),
    Case(
        "truncated-last-block",
        "vpc-dynamic",
        truncate_to(lambda p: size(p) - 513),
        "open",
        "past the end of the file",
    ),
    Case(
        "fixed-truncated-byte",
        "vpc-fixed",
        truncate_to(lambda p: size(p) - 1),
        "open",
        "no VHD footer",
        FORMAT,
    ),
    Case(
        "fixed-truncated-footer",
        "vpc-fixed",
        truncate_to(lambda p: size(p) - 512),
        "open",
        "no VHD footer",
        FORMAT,
    ),
    Case(
        "fixed-extra-sector",
        "vpc-fixed",
        append(bytes(512)),
        "open",
        "no VHD footer",
        FORMAT,
    ),
]

VDI_CASES = [
    # ---- every header field
    Case("signature", "vdi-dynamic", vdi(64, 0xBEDA107E), "open", "not a VDI image", FORMAT),
    Case("version-1.0", "vdi-dynamic", vdi(68, 0x10000), "open", r"version is 1\.0", FORMAT),
    Case("version-2.1", "vdi-dynamic", vdi(68, 0x20001), "open", r"version is 2\.1", FORMAT),
    Case(
        "header_size-small", "vdi-dynamic", vdi(72, 0x100), "open", "header_size is 0x100"
    ),  # QEMU: reads it
    Case("header_size-0x190", "vdi-dynamic", vdi(72, 0x190), "ok"),
    Case("header_size-huge", "vdi-dynamic", vdi(72, 0xFFFFFFFF), "open", "inside the header"),
    Case("image_type-undo", "vdi-dynamic", vdi(76, 3), "open", r"image type is 3 \(undo\)", FORMAT),
    Case("image_type-diff", "vdi-dynamic", vdi(76, 4), "open", "differencing", FORMAT),
    Case("image_type-9", "vdi-dynamic", vdi(76, 9), "open", "image type is 9", FORMAT),
    Case("image_type-static", "vdi-dynamic", vdi(76, 2), "ok"),
    Case(
        "offset_bmap-unaligned",
        "vdi-dynamic",
        vdi(340, 0x208),
        "open",
        "offset_bmap is 0x208",
        FORMAT,
    ),
    Case("offset_bmap-0", "vdi-dynamic", vdi(340, 0), "open", "inside the header"),
    Case(
        "offset_bmap-past-eof",
        "vdi-dynamic",
        vdi(340, 0x7FFFFE00),
        "open",
        "block map .* past the end",
    ),
    Case(
        "offset_data-unaligned",
        "vdi-dynamic",
        vdi(344, 0x404),
        "open",
        "offset_data is 0x404",
        FORMAT,
    ),
    Case("offset_data-in-bmap", "vdi-dynamic", vdi(344, 0x200), "open", "inside the block map"),
    Case(
        "offset_data-past-eof",
        "vdi-dynamic",
        vdi(344, 0x7FFFFE00),
        "read",
        "past the end of the file",
    ),  # QEMU: zeros
    Case("sector_size-4096", "vdi-dynamic", vdi(360, 4096), "open", "sector_size is 4096", FORMAT),
    Case("disk_size-too-big", "vdi-dynamic", vdi(368, 7 * MiB, 8), "open", "hold only"),
    Case("disk_size-huge", "vdi-dynamic", vdi(368, 1 << 63, 8), "open", "hold only"),
    Case("disk_size-odd", "vdi-dynamic", vdi(368, 5 * MiB + 1001, 8), "ok"),
    Case("disk_size-0", "vdi-dynamic", vdi(368, 0, 8), "ok"),
    Case(
        "block_size-2M", "vdi-dynamic", vdi(376, 2 * MiB), "open", "block_size is 2097152", FORMAT
    ),
    Case("block_size-0", "vdi-dynamic", vdi(376, 0), "open", "block_size is 0", FORMAT),
    Case("block_extra", "vdi-dynamic", vdi(380, 512), "open", "block_extra is 512", FORMAT),
    Case(
        "blocks_in_image-0", "vdi-dynamic", vdi(384, 0), "open", "blocks_allocated is 3, more than"
    ),
    Case("blocks_in_image-small", "vdi-dynamic", vdi(384, 3), "open", "hold only"),
    Case("blocks_in_image-limit", "vdi-dynamic", vdi(384, (32 << 20) // 4 + 1), "open", "limit"),
    Case(
        "blocks_in_image-huge",
        "vdi-dynamic",
        vdi(384, 0xFFFFFFFF),
        "open",
        "blocks_in_image is 4294967295",
    ),
    Case(
        "blocks_in_image-past-eof",
        "vdi-dynamic",
        both(vdi(384, 1 << 20), vdi(368, 1 << 40, 8)),
        "open",
        "block map .* past the end",
    ),
    Case("blocks_allocated-more", "vdi-dynamic", vdi(388, 4), "open", "blocks_allocated is 4, but"),
    Case("blocks_allocated-less", "vdi-dynamic", vdi(388, 2), "open", "blocks_allocated is 2, but"),
    Case("blocks_allocated-huge", "vdi-dynamic", vdi(388, 99), "open", "more than blocks_in_image"),
    Case("uuid_link", "vdi-dynamic", vdi(424, 1), "open", "link UUID", FORMAT),
    Case("uuid_parent", "vdi-dynamic", vdi(452, 1), "open", "parent UUID", FORMAT),
    # ---- block map entries
    Case("bmap-beyond-blocks", "vdi-dynamic", bmap(0, 1000), "read", "beyond the image's 6 blocks"),
    Case(
        "bmap-past-eof", "vdi-dynamic", bmap(0, 5), "read", "past the end of the file"
    ),  # QEMU: zeros
    Case("bmap-duplicate", "vdi-dynamic", bmap(3, 0), "open", "both point to data block 0"),
    Case("bmap-discarded", "vdi-dynamic", both(bmap(0, 0xFFFFFFFE), vdi(388, 2)), "ok"),
    Case("bmap-unallocated", "vdi-static", both(bmap(1, 0xFFFFFFFF), vdi(388, 5)), "ok"),
    Case("bmap-swapped", "vdi-static", both(bmap(0, 1), bmap(1, 0)), "ok"),
    # ---- truncations
    Case("truncated-0", "vdi-dynamic", truncate_to(0), "open", "too short"),
    Case("truncated-100", "vdi-dynamic", truncate_to(100), "open", "too short"),
    Case("truncated-511", "vdi-dynamic", truncate_to(511), "open", "too short"),
    Case("truncated-512", "vdi-dynamic", truncate_to(512), "open", "block map .* past the end"),
    Case(
        "truncated-half", "vdi-dynamic", truncate_to(lambda p: size(p) // 2), "read", "past the end"
    ),
    Case(
        "truncated-last-byte",
        "vdi-dynamic",
        truncate_to(lambda p: size(p) - 1),
        "read",
        "past the end",
    ),
    Case("static-truncated", "vdi-static", truncate_to(3 * MiB), "read", "past the end"),
]

CASES = VPC_CASES + VDI_CASES


@dataclass
class QemuView:
    opens: bool  # qemu-img info succeeds
    corrupt: bool  # qemu-img check finds corruption (formats without a check never do)
    raw: bytes | None  # qemu-img convert output, None if it fails


def qemu_view(img: Path, fmt: str, tmp: Path) -> QemuView:
    def q(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=30
        )

    info = q("info", "--output=json", "-f", fmt, img)
    opens = info.returncode == 0
    # A damaged table can make `qemu-img check` print millions of error
    # lines (8.4 million for vdi blocks_in_image-limit): they go to a file,
    # not through a pipe into a Python string, and the check gets a longer
    # limit than the other commands, so a loaded machine does not time it out.
    check_log = tmp / "qemu-check.err"
    with check_log.open("wb") as err:
        check = subprocess.run(
            ["qemu-img", "check", "-f", fmt, str(img)],
            stdout=subprocess.DEVNULL,
            stderr=err,
            timeout=120,
        )
    with check_log.open("rb") as err:
        unsupported = b"does not support checks" in err.read(4096)
    corrupt = not unsupported and check.returncode not in (0, 3)
    raw = None
    if opens and json.loads(info.stdout)["virtual-size"] <= 64 * MiB:
        out = tmp / "qemu.raw"
        if q("convert", "-f", fmt, "-O", "raw", img, out).returncode == 0:
            raw = out.read_bytes()
    return QemuView(opens, corrupt, raw)


@pytest.mark.parametrize("case", CASES, ids=[f"{c.base.split('-')[0]}-{c.id}" for c in CASES])
def test_hostile_image(case: Case, bases, tmp_path: Path) -> None:
    base = bases[case.base]
    img = tmp_path / f"case-{case.id}.{base.fmt}"
    shutil.copyfile(base.path, img)
    case.patch(img)
    damaged = img.read_bytes()
    qemu = qemu_view(img, base.fmt, tmp_path)
    reference = base.expected
    if case.expect == "ok":
        assert qemu.raw is not None, "qemu-img cannot read a case marked ok"
        reference = tmp_path / "reference.raw"
        reference.write_bytes(qemu.raw)

    # 1. The CLI, bounded in memory and time.
    proc, seconds = run_bounded_cli("verify", "-F", base.fmt, reference, img)
    out = proc.stdout + proc.stderr
    assert seconds < TIME_LIMIT, f"verify took {seconds:.1f}s"
    assert "Traceback" not in out and "panicked" not in out, out
    assert proc.returncode in (0, 1, 2), (proc.returncode, out)
    if proc.returncode == 2:
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("blkverify: error:")]
        assert img.name in line, line
    if case.expect == "open":
        assert proc.returncode == 2, out
        assert re.search(case.match, proc.stderr), proc.stderr
    elif case.expect == "read":
        assert proc.returncode == 1, out
        assert "read error in sector" in proc.stdout, out
        assert re.search(case.match, proc.stdout), proc.stdout
    elif case.expect == "ok":
        assert proc.returncode == 0, out

    # 2. The Python API: the exception class, the file and the fact.
    if case.expect == "open":
        with pytest.raises(case.exc) as info:
            bv.open(img, format=base.fmt)
        assert re.search(case.match, str(info.value)), info.value
        assert str(img) in str(info.value)
    elif case.expect == "read":
        with bv.open(img, format=base.fmt) as opened, pytest.raises(case.exc) as info:
            read_whole(opened, opened.size)
        assert re.search(case.match, str(info.value)), info.value
        assert str(img) in str(info.value)
    else:
        try:
            opened = bv.open(img, format=base.fmt)
        except (bv.Error, OSError) as exc:
            assert case.expect == "any", exc
        else:
            with opened:
                ours = read_whole(opened, opened.size)
            assert qemu.raw is not None, "we read an image qemu-img cannot"
            assert ours == qemu.raw
    assert img.read_bytes() == damaged, "reading changed the image"

    # 3. At least as strict as QEMU.
    if not qemu.opens or qemu.raw is None:
        assert proc.returncode != 0, "qemu-img refuses this image; we accepted it"
    if qemu.corrupt:
        assert proc.returncode != 0, "qemu-img check finds this image corrupt; we said nothing"
    if proc.returncode == 0:
        assert qemu.raw is not None and qemu.raw == reference.read_bytes()
