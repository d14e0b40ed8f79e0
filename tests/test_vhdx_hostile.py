"""The vhdx hostile-image corpus: real qemu-img images (and, where QEMU cannot make or read
them, images built from the specification) with one field or fact broken each.

Each case runs as the qcow2 corpus does (tests/test_hostile.py): ``blkverify verify`` under a
1 GiB address-space and a time limit (exit status, one line naming the file and the fact),
``bv.open`` and a whole-disk read in this process, and ``qemu-img info``/``convert`` on the
same file: where QEMU refuses to open or read an image we refuse or report; where we read
it, we read exactly the bytes ``qemu-img convert`` does.
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
import vhdx_builder as vb
from conftest import KiB, MiB, qemu_img, qemu_io
from test_hostile import TIME_LIMIT, read_whole, run_bounded_cli

HEADERS = (64 * KiB, 128 * KiB)
REGION_TABLES = (192 * KiB, 256 * KiB)


@dataclass(frozen=True)
class Base:
    path: Path
    expected: Path
    qemu_reads: bool  # QEMU reads it (qemu-img made it, no parent, no dirty log)


@pytest.fixture(scope="session")
def bases(tmp_path_factory) -> dict[str, Base]:
    d = tmp_path_factory.mktemp("vhdx-hostile")
    out = {}
    for name, opts in (("dynamic", "subformat=dynamic"), ("fixed", "subformat=fixed")):
        img = d / f"{name}.vhdx"
        qemu_img("create", "-q", "-f", "vhdx", "-o", f"{opts},block_size=1M", img, 8 * MiB)
        qemu_io(
            img, "write -P 0x11 0 64k", "write -P 0x22 3M 1M", "write -P 0x33 7M 1M", fmt="vhdx"
        )
        raw = d / f"{name}.raw"
        qemu_img("convert", "-f", "vhdx", "-O", "raw", img, raw)
        out[name] = Base(img, raw, True)
    # A differencing disk over the dynamic one (QEMU cannot read it).
    dwg = vb.current_header(out["dynamic"].path)["data_write_guid"]
    child = vb.Disk(
        size=8 * MiB,
        parent={"parent_linkage": vb.guid_text(dwg), "relative_path": "dynamic.vhdx"},
    )
    child.blocks = {
        1: vb.Block(vb.FULLY_PRESENT, vb.pattern(1, MiB)),
        3: vb.Block(vb.PARTIALLY_PRESENT, vb.pattern(3, MiB), frozenset(range(0, 2048, 3))),
    }
    child.build(d / "diff.vhdx")
    raw = d / "diff.raw"
    raw.write_bytes(child.expected(out["dynamic"].expected.read_bytes()))
    out["diff"] = Base(d / "diff.vhdx", raw, False)
    # A dirty log: one entry rewriting the BAT page that a crash left zeroed.
    dirty = vb.Disk(size=8 * MiB, log_guid=bytes(range(1, 17)))
    dirty.blocks = {2: vb.Block(vb.FULLY_PRESENT, vb.pattern(2, MiB))}
    layout = dirty.build(d / "dirty.vhdx")
    page = layout["true_bytes"][layout["bat_offset"] : layout["bat_offset"] + 4 * KiB]
    entry = vb.LogEntry(position=0, sequence=3, tail=0, writes={layout["bat_offset"]: page})
    dirty.build(d / "dirty.vhdx", [entry], stale_pages={layout["bat_offset"]: bytes(4 * KiB)})
    raw = d / "dirty.raw"
    raw.write_bytes(dirty.expected())
    out["dirty"] = Base(d / "dirty.vhdx", raw, False)
    return out


# --------------------------------------------------------------------------------------------
# where things are, and how to break them
# --------------------------------------------------------------------------------------------


def read_at(p: Path, offset: int, n: int) -> bytes:
    with open(p, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_at(p: Path, offset: int, data: bytes) -> None:
    with open(p, "r+b") as f:
        f.seek(offset)
        f.write(data)


def reseal(p: Path, offset: int, length: int) -> None:
    """Recompute the CRC-32C of the structure at ``offset`` (its checksum at +4)."""
    buf = bytearray(read_at(p, offset, length))
    write_at(p, offset, bytes(vb.with_checksum(buf)))


def header_field(fmt: str, at: int, value, which=(0, 1)) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        for i in which:
            write_at(p, HEADERS[i] + at, struct.pack(fmt, value))
            reseal(p, HEADERS[i], 4 * KiB)

    return patch


def break_headers(*which: int) -> Callable[[Path], None]:
    return lambda p: [write_at(p, HEADERS[i] + 100, b"\xff") for i in which]


def region_patch(fn: Callable[[bytearray], None], copies=(0, 1)) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        for i in copies:
            buf = bytearray(read_at(p, REGION_TABLES[i], 64 * KiB))
            fn(buf)
            write_at(p, REGION_TABLES[i], bytes(vb.with_checksum(buf)))

    return patch


def region_entry(guid: bytes, fmt: str, at: int, value) -> Callable[[bytearray], None]:
    def fn(buf: bytearray) -> None:
        for i in range(struct.unpack_from("<I", buf, 8)[0]):
            if buf[16 + 32 * i : 32 + 32 * i] == guid:
                struct.pack_into(fmt, buf, 16 + 32 * i + at, value)

    return fn


def bat_on_metadata(buf: bytearray) -> None:
    at = {bytes(buf[16 + 32 * i : 32 + 32 * i]): 16 + 32 * i for i in range(2)}
    metadata = struct.unpack_from("<Q", buf, at[vb.METADATA_GUID] + 16)[0]
    struct.pack_into("<Q", buf, at[vb.BAT_GUID] + 16, metadata)


def metadata_offset(p: Path) -> int:
    rt = read_at(p, REGION_TABLES[0], 64 * KiB)
    for i in range(struct.unpack_from("<I", rt, 8)[0]):
        if rt[16 + 32 * i : 32 + 32 * i] == vb.METADATA_GUID:
            return struct.unpack_from("<Q", rt, 16 + 32 * i + 16)[0]
    raise AssertionError("no metadata region")


def item_entry(p: Path, guid: bytes) -> int:
    """File offset of the metadata table entry of item ``guid``."""
    base = metadata_offset(p)
    table = read_at(p, base, 64 * KiB)
    for i in range(struct.unpack_from("<H", table, 10)[0]):
        if table[32 + 32 * i : 48 + 32 * i] == guid:
            return base + 32 + 32 * i
    raise AssertionError("no such item")


def item_data(p: Path, guid: bytes) -> int:
    entry = item_entry(p, guid)
    return metadata_offset(p) + struct.unpack("<I", read_at(p, entry + 16, 4))[0]


def item_value(guid: bytes, fmt: str, value, at: int = 0) -> Callable[[Path], None]:
    return lambda p: write_at(p, item_data(p, guid) + at, struct.pack(fmt, value))


def item_field(guid: bytes, fmt: str, at: int, value) -> Callable[[Path], None]:
    return lambda p: write_at(p, item_entry(p, guid) + at, struct.pack(fmt, value))


def rename_item(guid: bytes, flags: int) -> Callable[[Path], None]:
    """Give item ``guid`` an unknown GUID and these flags (4: required)."""

    def patch(p: Path) -> None:
        entry = item_entry(p, guid)
        write_at(p, entry, bytes(range(16)))
        write_at(p, entry + 24, struct.pack("<I", flags))

    return patch


def bat_entry(index: int, fn: Callable[[int, Path], int]) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        at = vb.bat_location(p)[0] + 8 * index
        old = struct.unpack("<Q", read_at(p, at, 8))[0]
        write_at(p, at, struct.pack("<Q", fn(old, p)))

    return patch


def truncate_to(n: int | Callable[[Path], int]) -> Callable[[Path], None]:
    return lambda p: os.truncate(p, n(p) if callable(n) else n)


def log_entry_field(fmt: str, at: int, value) -> Callable[[Path], None]:
    def patch(p: Path) -> None:
        log = vb.current_header(p)["log_offset"]
        write_at(p, log + at, struct.pack(fmt, value))
        length = struct.unpack("<I", read_at(p, log + 8, 4))[0]
        reseal(p, log, length)

    return patch


def combine(*patches: Callable[[Path], None]) -> Callable[[Path], None]:
    return lambda p: [fn(p) for fn in patches]


@dataclass(frozen=True)
class Case:
    id: str
    base: str
    patch: Callable[[Path], None]
    # "open": refused at open (exit 2); "read": opens, but reading fails with a
    # CorruptImageError (verify: a read error, exit 1); "ok": reads exactly as qemu-img does
    # (or, for bases QEMU cannot read, as the healthy image's expected bytes); "differs":
    # reads without error, but other bytes than the healthy image's.
    expect: str
    match: str = ""
    exc: type = bv.CorruptImageError
    # Why we accept an image QEMU refuses, when we do on purpose.
    looser_than_qemu: str = ""


def state(s: int) -> Callable[[int, Path], int]:
    return lambda old, p: (old & ~7) | s


CASES = [
    # ---- headers ---------------------------------------------------------------------------
    Case("header1-broken", "dynamic", break_headers(0), "ok"),
    Case("header2-broken", "dynamic", break_headers(1), "ok"),
    Case("both-headers-broken", "dynamic", break_headers(0, 1), "open", "no valid header"),
    Case("header-signature", "dynamic", header_field("4s", 0, b"HEAD"), "open", "signature"),
    Case("header-version-2", "dynamic", header_field("<H", 66, 2), "open", "Version is 2"),
    Case(
        "equal-sequence-numbers",
        "dynamic",
        combine(header_field("<Q", 8, 5), header_field("<Q", 16, 1, which=(0,))),
        "open",
        "SequenceNumber",
    ),
    Case(
        "log-offset-unaligned", "dynamic", header_field("<Q", 72, MiB + 4096), "open", "LogOffset"
    ),
    Case("log-offset-zero", "dynamic", header_field("<Q", 72, 0), "open", "LogOffset"),
    Case("log-length-unaligned", "dynamic", header_field("<I", 68, 4096), "open", "LogLength"),
    Case(
        "log-version-1", "dynamic", header_field("<H", 64, 1), "open", "LogVersion", bv.FormatError
    ),
    Case(
        "log-guid-empty-log",
        "dynamic",
        header_field("16s", 48, bytes(range(16))),
        "open",
        "no valid, complete entry sequence",
    ),
    Case(
        "log-overlaps-bat",
        "dynamic",
        lambda p: header_field("<Q", 72, vb.bat_location(p)[0])(p),
        "open",
        "overlaps the log",
    ),
    # ---- region table ----------------------------------------------------------------------
    Case(
        "region-table-1-broken",
        "dynamic",
        lambda p: write_at(p, REGION_TABLES[0] + 100, b"\xff"),
        "ok",
        looser_than_qemu="the second copy of the region table is there to be used",
    ),
    Case(
        "region-tables-broken",
        "dynamic",
        lambda p: [write_at(p, t + 100, b"\xff") for t in REGION_TABLES],
        "open",
        "no valid region table",
    ),
    Case(
        "region-count",
        "dynamic",
        region_patch(lambda b: struct.pack_into("<I", b, 8, 2048)),
        "open",
        "EntryCount",
    ),
    Case(
        "bat-region-unaligned",
        "dynamic",
        region_patch(region_entry(vb.BAT_GUID, "<Q", 16, 3 * MiB + 512)),
        "open",
        "FileOffset",
    ),
    Case(
        "bat-region-in-header",
        "dynamic",
        region_patch(region_entry(vb.BAT_GUID, "<Q", 16, 0)),
        "open",
        "FileOffset",
    ),
    Case(
        "bat-region-past-eof",
        "dynamic",
        region_patch(region_entry(vb.BAT_GUID, "<Q", 16, 1 << 40)),
        "open",
        "past the end",
    ),
    Case(
        "bat-region-too-small",
        "dynamic",
        region_patch(region_entry(vb.BAT_GUID, "<I", 24, 0)),
        "open",
        "BAT region",
    ),
    Case("bat-region-on-metadata", "dynamic", region_patch(bat_on_metadata), "open", "overlaps"),
    Case(
        "unknown-required-region",
        "dynamic",
        region_patch(
            lambda b: (
                struct.pack_into("<I", b, 8, 3),
                b.__setitem__(slice(80, 96), bytes(range(16))),
                struct.pack_into("<QII", b, 96, 1 << 30, MiB, 1),
            )
        ),
        "open",
        "required region",
        bv.FormatError,
    ),
    Case(
        "no-metadata-region",
        "dynamic",
        region_patch(
            lambda b: [
                b.__setitem__(slice(16 + 32 * i, 32 + 32 * i), bytes(range(16)))
                for i in range(2)
                if b[16 + 32 * i : 32 + 32 * i] == vb.METADATA_GUID
            ]
        ),
        "open",
        "no metadata region",
    ),
    # ---- metadata --------------------------------------------------------------------------
    Case(
        "metadata-signature",
        "dynamic",
        lambda p: write_at(p, metadata_offset(p), b"METADATA"),
        "open",
        "signature",
    ),
    Case(
        "metadata-count",
        "dynamic",
        lambda p: write_at(p, metadata_offset(p) + 10, struct.pack("<H", 4000)),
        "open",
        "EntryCount",
    ),
    Case(
        "block-size-3M",
        "dynamic",
        item_value(vb.FILE_PARAMETERS, "<I", 3 * MiB),
        "open",
        "BlockSize",
    ),
    Case(
        "block-size-512M",
        "dynamic",
        item_value(vb.FILE_PARAMETERS, "<I", 512 * MiB),
        "open",
        "BlockSize",
    ),
    Case(
        "block-size-64k",
        "dynamic",
        item_value(vb.FILE_PARAMETERS, "<I", 64 * KiB),
        "open",
        "BlockSize",
    ),
    Case(
        "param-reserved-bits",
        "dynamic",
        item_value(vb.FILE_PARAMETERS, "<I", 1 << 7, at=4),
        "open",
        "reserved",
        bv.FormatError,
    ),
    Case(
        "has-parent-without-locator",
        "dynamic",
        item_value(vb.FILE_PARAMETERS, "<I", 2, at=4),
        "open",
        "Parent Locator",
    ),
    Case(
        "logical-sector-1024",
        "dynamic",
        item_value(vb.LOGICAL_SECTOR_SIZE, "<I", 1024),
        "open",
        "Logical Sector Size",
    ),
    Case(
        "physical-sector-0",
        "dynamic",
        item_value(vb.PHYSICAL_SECTOR_SIZE, "<I", 0),
        "open",
        "Physical Sector Size",
    ),
    Case(
        "disk-size-unaligned",
        "dynamic",
        item_value(vb.VIRTUAL_DISK_SIZE, "<Q", 8 * MiB + 1),
        "open",
        "Virtual Disk Size",
    ),
    Case(
        "disk-size-huge",
        "dynamic",
        item_value(vb.VIRTUAL_DISK_SIZE, "<Q", 1 << 60),
        "open",
        "Virtual Disk Size",
    ),
    Case(
        "disk-size-needs-more-bat",
        "dynamic",
        item_value(vb.VIRTUAL_DISK_SIZE, "<Q", 1 << 40),
        "open",
        "BAT region",
    ),
    Case(
        "item-past-region",
        "dynamic",
        item_field(vb.VIRTUAL_DISK_SIZE, "<I", 16, 0xFFFFC),
        "open",
        "lies outside",
    ),
    Case("item-too-long", "dynamic", item_field(vb.PAGE_83, "<I", 20, 2 * MiB), "open", "1 MiB"),
    Case("item-missing", "dynamic", rename_item(vb.PAGE_83, 0), "open", "missing"),
    Case(
        "unknown-required-item",
        "dynamic",
        rename_item(vb.PAGE_83, 4),
        "open",
        "required item",
        bv.FormatError,
    ),
    Case(
        "item-duplicated",
        "dynamic",
        lambda p: write_at(p, item_entry(p, vb.PAGE_83), vb.VIRTUAL_DISK_SIZE),
        "open",
        "twice",
    ),
    Case(
        "items-overlap",
        "dynamic",
        lambda p: write_at(
            p,
            item_entry(p, vb.PAGE_83) + 16,
            read_at(p, item_entry(p, vb.VIRTUAL_DISK_SIZE) + 16, 4),
        ),
        "open",
        "overlaps",
    ),
    # ---- BAT entries -----------------------------------------------------------------------
    Case("bat-state-4", "dynamic", bat_entry(3, state(4)), "read", "state 4"),
    Case("bat-partial-no-parent", "dynamic", bat_entry(3, state(7)), "read", "partially present"),
    Case(
        "bat-past-eof",
        "dynamic",
        bat_entry(3, lambda old, p: (old & 0xFFFFF) | (64 << 20)),
        "read",
        "past the end",
    ),
    Case("bat-in-header", "dynamic", bat_entry(3, lambda old, p: 6), "read", "header section"),
    Case(
        "bat-reserved-bits", "dynamic", bat_entry(3, lambda old, p: old | 0x100), "read", "reserved"
    ),
    Case(
        "bat-on-bat",
        "dynamic",
        bat_entry(3, lambda old, p: 6 | vb.bat_location(p)[0]),
        "open",
        "overlaps the BAT",
    ),
    Case(
        "bat-on-log",
        "dynamic",
        bat_entry(3, lambda old, p: 6 | vb.current_header(p)["log_offset"]),
        "open",
        "overlaps the log",
    ),
    Case("bat-unmapped", "dynamic", bat_entry(3, state(3)), "ok"),
    Case("bat-unmapped-v095", "dynamic", bat_entry(3, state(5)), "ok"),
    Case("bat-undefined", "dynamic", bat_entry(3, state(1)), "ok"),
    Case("fixed-bat-zero-state", "fixed", bat_entry(7, state(2)), "ok"),
    # ---- truncation ------------------------------------------------------------------------
    Case("truncated-100", "dynamic", truncate_to(100), "open", "header section"),
    Case("truncated-header-section", "dynamic", truncate_to(MiB - 1), "open", "header section"),
    Case(
        "truncated-before-bat",
        "dynamic",
        truncate_to(lambda p: vb.bat_location(p)[0]),
        "open",
        "past the end",
    ),
    Case(
        "truncated-last-block",
        "fixed",
        truncate_to(lambda p: p.stat().st_size - MiB // 2),
        "read",
        "past the end",
    ),
    # ---- a log to replay -------------------------------------------------------------------
    Case("dirty-log-ok", "dirty", lambda p: None, "ok"),
    Case(
        "dirty-log-checksum",
        "dirty",
        lambda p: write_at(p, vb.current_header(p)["log_offset"] + 5000, b"\xff"),
        "open",
        "no valid, complete entry sequence",
    ),
    Case(
        "dirty-log-flushed-offset",
        "dirty",
        log_entry_field("<Q", 48, 1 << 40),
        "open",
        "truncated",
    ),
    Case(
        "dirty-log-other-guid",
        "dirty",
        log_entry_field("16s", 32, bytes(16)),
        "open",
        "no valid",
    ),
    # A zero descriptor over a petabyte: an interval, never an allocation or a hang.
    Case(
        "dirty-log-zero-huge",
        "dirty",
        combine(
            log_entry_field("4s", 64, b"zero"),
            log_entry_field("<Q", 72, 1 << 50),
            log_entry_field("<Q", 80, 3 * MiB),
        ),
        "differs",
    ),
    # ---- a differencing disk's parent locator ----------------------------------------------
    Case("diff-ok", "diff", lambda p: None, "ok"),
    Case(
        "diff-locator-type",
        "diff",
        item_value(vb.PARENT_LOCATOR, "16s", bytes(16)),
        "open",
        "locator type",
        bv.FormatError,
    ),
    Case(
        "diff-locator-key-past-item",
        "diff",
        item_value(vb.PARENT_LOCATOR, "<I", 1 << 20, at=20),
        "open",
        "parent locator",
    ),
    Case(
        "diff-locator-count",
        "diff",
        item_value(vb.PARENT_LOCATOR, "<H", 60000, at=18),
        "open",
        "parent locator",
    ),
    Case(
        "diff-partial-bitmap-gone",
        "diff",
        bat_entry(4096, lambda old, p: 0),
        "read",
        "sector bitmap",
    ),
    Case(
        "diff-linkage-mismatch",
        "diff",
        lambda p: _bump_linkage(p),
        "open",
        "parent_linkage",
    ),
    Case(
        "diff-parent-missing",
        "diff",
        lambda p: _replace_in_locator(p, "dynamic.vhdx", "dynamic.vhdy"),
        "open",
        "dynamic.vhdy",
        OSError,
    ),
]


def _replace_in_locator(p: Path, old: str, new: str) -> None:
    """Replace text in the parent locator item in place (same length)."""
    assert len(old) == len(new)
    at = item_data(p, vb.PARENT_LOCATOR)
    item = read_at(p, at, 4096)
    i = item.index(old.encode("utf-16-le"))
    write_at(p, at + i, new.encode("utf-16-le"))


def _bump_linkage(p: Path) -> None:
    at = item_data(p, vb.PARENT_LOCATOR)
    item = read_at(p, at, 4096)
    i = item.index("{".encode("utf-16-le")) + 2
    digit = chr(item[i])
    write_at(p, at + i, b"1" if digit != "1" else b"2")


def qemu_reads(img: Path, tmp: Path) -> tuple[bool, bytes | None]:
    """Whether qemu-img opens the image, and what convert reads from it."""

    def q(*args):
        try:
            return subprocess.run(
                ["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=8
            )
        except subprocess.TimeoutExpired:
            return None

    info = q("info", "--output=json", "-f", "vhdx", img)
    if info is None or info.returncode != 0:
        return False, None
    if json.loads(info.stdout)["virtual-size"] > 64 * MiB:
        return True, None
    out = tmp / "qemu.raw"
    conv = q("convert", "-f", "vhdx", "-O", "raw", img, out)
    return True, (out.read_bytes() if conv is not None and conv.returncode == 0 else None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_vhdx(case: Case, bases, tmp_path: Path) -> None:
    base = bases[case.base]
    img = base.path.parent / f"case-{case.id}.vhdx"
    shutil.copyfile(base.path, img)
    try:
        _check(case, base, img, tmp_path)
    finally:
        img.unlink()


def _check(case: Case, base: Base, img: Path, tmp_path: Path) -> None:
    case.patch(img)
    damaged = img.read_bytes()
    qemu_opens, qemu_raw = qemu_reads(img, tmp_path) if base.qemu_reads else (False, None)
    reference = base.expected
    if case.expect == "ok" and base.qemu_reads and not case.looser_than_qemu:
        assert qemu_raw is not None, "qemu-img cannot read a case marked ok"
        reference = tmp_path / "reference.raw"
        reference.write_bytes(qemu_raw)

    # 1. The CLI, bounded in memory and time.
    proc, seconds = run_bounded_cli("verify", "-F", "vhdx", reference, img)
    out = proc.stdout + proc.stderr
    assert seconds < TIME_LIMIT, f"verify took {seconds:.1f}s"
    assert "Traceback" not in out and "panicked" not in out, out
    assert proc.returncode in (0, 1, 2), (proc.returncode, out)
    if case.expect == "open":
        assert proc.returncode == 2, out
        [line] = [ln for ln in proc.stderr.splitlines() if ln.startswith("blkverify: error:")]
        assert img.name in line, line
        assert re.search(case.match, line), line
    elif case.expect == "read":
        assert proc.returncode == 1, out
        assert "read error in sector" in proc.stdout, out
        assert img.name in proc.stdout
    elif case.expect == "differs":
        assert proc.returncode == 1, out
        assert "read error" not in proc.stdout, out
    else:
        assert proc.returncode == 0, out

    # 2. The Python API: the exception class, the file and the fact.
    if case.expect == "open":
        with pytest.raises(case.exc) as info:
            bv.open(img, format="vhdx")
        assert re.search(case.match, str(info.value)), info.value
        assert str(img) in str(info.value)
    elif case.expect == "read":
        with bv.open(img) as opened, pytest.raises(case.exc) as info:
            read_whole(opened, opened.size)
        assert re.search(case.match, str(info.value)), info.value
        assert str(img) in str(info.value)
    else:
        with bv.open(img) as opened:
            ours = read_whole(opened, opened.size)
        assert (ours == reference.read_bytes()) == (case.expect == "ok")
    assert img.read_bytes() == damaged, "reading changed the image"

    # 3. At least as strict as QEMU (for images it can read at all).
    if base.qemu_reads and not case.looser_than_qemu:
        if not qemu_opens or qemu_raw is None:
            assert proc.returncode != 0, "qemu-img refuses this image; we accepted it"
    if case.looser_than_qemu:
        assert not qemu_opens, "the case no longer needs its exception"
