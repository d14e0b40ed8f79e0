"""The vhdx reader: images made by qemu-img/qemu-io read as ``qemu-img convert -O raw`` does,
and the cases qemu-img cannot make (differencing disks, 4096-byte sectors, partially present
and unmapped blocks, a log to replay) read as the bytes computed from the specification by
``vhdx_builder``. A flipped byte is found at its exact sector."""

from __future__ import annotations

import hashlib
import json
import random
import shutil

import blkverify_rs as bv
import pytest
import vhdx_builder as vb
from conftest import KiB, MiB, convert_to_raw, qemu_img, qemu_io, run, run_cli

SIZE = 40 * MiB + 3 * 512  # not a multiple of any block size: the last block is partial

WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 1020k 8k",  # across the first 1 MiB block boundary
    "write -P 0x33 9M 3M",  # several blocks
    "write -z 20M 1M",
    "write -P 0x44 33M 512",
    f"write -P 0x55 {SIZE - 1536} 1536",  # the last, partial block
]

MATRIX = [
    (sub, bs, log)
    for sub in ("dynamic", "fixed")
    for bs in ("1M", "8M", "32M", "256M")
    for log in ("1M", "3M")
    if not (sub == "fixed" and bs == "256M" and log == "3M")
]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    d = tmp_path_factory.mktemp("vhdx")
    images = {}
    for sub, bs, log in MATRIX:
        name = f"{sub}-{bs}-{log}"
        img = d / f"{name}.vhdx"
        qemu_img(
            "create",
            "-q",
            "-f",
            "vhdx",
            "-o",
            f"subformat={sub},block_size={bs},log_size={log}",
            img,
            SIZE,
        )
        qemu_io(img, *WRITES, fmt="vhdx")
        raw = d / f"{name}.raw"
        convert_to_raw(img, raw, fmt="vhdx")
        images[name] = (img, raw)
    # qemu-img convert writes its own way (block_state_zero, whole blocks).
    src = d / "src.raw"
    src.write_bytes(random.Random(5).randbytes(3 * MiB) + bytes(5 * MiB) + b"\x01" * MiB)
    for sub in ("dynamic", "fixed"):
        img = d / f"converted-{sub}.vhdx"
        qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", f"subformat={sub}", src, img)
        images[f"converted-{sub}"] = (img, src)
    return images


@pytest.mark.parametrize("name", [f"{s}-{b}-{g}" for s, b, g in MATRIX])
def test_matrix_reads_as_qemu_img_convert(matrix, name):
    img, raw = matrix[name]
    expected = raw.read_bytes()
    with bv.open(img) as opened:
        assert opened.format == "vhdx"
        assert opened.size == len(expected)
        assert opened.read(0, opened.size) == expected
        facts = opened.info()
        assert facts["subformat"] == name.split("-")[0]
        assert int(facts["block_size"]) == int(name.split("-")[1][:-1]) * MiB
        assert int(facts["log_size"]) == int(name.split("-")[2][:-1]) * MiB
        covered = 0
        for off, length, kind, host in opened.map():
            assert off == covered and length > 0
            assert kind in ("data", "zero", "unallocated")
            assert (host is not None) == (kind == "data")
            covered += length
        assert covered == opened.size
    rep = bv.verify(raw, img)
    assert rep.identical and rep.bytes_compared == len(expected)


@pytest.mark.parametrize("name", ["converted-dynamic", "converted-fixed"])
def test_converted_images(matrix, name):
    img, raw = matrix[name]
    assert bv.verify(raw, img).identical
    with bv.open(img, format="vhdx") as opened:
        assert opened.read(0, opened.size) == raw.read_bytes()


def test_cli_verify_and_batch(matrix, tmp_path):
    img, raw = matrix["dynamic-1M-1M"]
    proc = run_cli("verify", "-F", "vhdx", raw, img)
    assert proc.returncode == 0, proc.stderr
    manifest = tmp_path / "pairs.txt"
    manifest.write_text(
        "".join(f"{r} {i}\n" for i, r in (matrix[n] for n in ("fixed-8M-1M", "dynamic-32M-3M")))
    )
    proc = run_cli("batch", "--json", manifest)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["test_format"] for r in rows] == ["vhdx", "vhdx"]
    assert all(r["identical"] for r in rows)


def test_io_reads_like_qemu_io_and_refuses_writes(matrix):
    img, raw = matrix["dynamic-8M-1M"]
    cmds = ["read -P 0x33 9M 3M", "read -P 0 20M 1M", "map", "info", "length"]
    ours = run_cli("io", *(x for c in cmds for x in ("-c", c)), img)
    theirs = run(["qemu-io", "-r", "-f", "vhdx", *(x for c in cmds for x in ("-c", c)), img])
    assert ours.returncode == 0, ours.stderr

    def strip(text):
        return [ln for ln in text.splitlines() if "ops/sec" not in ln]

    assert strip(ours.stdout) == strip(theirs.stdout)
    # A format blkverify cannot write opens read-only: a write fails as under -r.
    before = hashlib.sha256(img.read_bytes()).hexdigest()
    proc = run_cli("io", "-c", "write -P 1 0 4k", img)
    assert proc.returncode == 1
    assert "read-only" in proc.stderr
    proc = run_cli("io", "-c", "write -P 1 0 4k", f"blkverify:{raw}:{img}")
    assert proc.returncode == 1
    assert "read-only" in proc.stderr
    assert hashlib.sha256(img.read_bytes()).hexdigest() == before
    with bv.open(img, read_only=False) as opened:
        assert opened.read_only
        with pytest.raises(OSError):
            opened.write(0, b"x")


# --------------------------------------------------------------------------------------------
# detection: a flipped byte is found at its exact sector
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unique_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("vhdx-flip")
    raw = d / "unique.raw"
    raw.write_bytes(random.Random(11).randbytes(6 * MiB))
    img = d / "unique.vhdx"
    qemu_img("convert", "-f", "raw", "-O", "vhdx", "-o", "block_size=1M", raw, img)
    return img, raw


def test_identical_images_give_no_finding(unique_image):
    img, raw = unique_image
    rep = bv.verify(raw, img, all=True)
    assert rep.identical and not rep.mismatches
    assert run_cli("verify", "--all", raw, img).returncode == 0
    proc = run_cli("io", "-c", "read 0 6M", f"blkverify:{raw}:{img}")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("guest", [0, 512 * 7 + 100, 3 * MiB - 1, 6 * MiB - 1])
def test_flipped_byte_found_at_its_sector(unique_image, tmp_path, guest):
    img, raw = unique_image
    bad = tmp_path / "bad.vhdx"
    shutil.copyfile(img, bad)
    data = bad.read_bytes()
    probe = raw.read_bytes()[guest - guest % 64 : guest - guest % 64 + 64]
    host = data.find(probe)
    assert host > 0 and data.find(probe, host + 1) == -1, "the guest bytes are unique"
    host += guest % 64
    with open(bad, "r+b") as f:
        f.seek(host)
        f.write(bytes([data[host] ^ 0x40]))
    rep = bv.verify(raw, bad, all=True)
    [m] = rep.mismatches
    assert (m.sector, m.offset, m.first_byte) == (guest // 512, guest // 512 * 512, guest)
    assert m.mapping["kind"] == "data" and m.mapping["unit"] == "block"
    assert m.mapping["tables"] == [{"table": "BAT", "index": guest // MiB}]
    assert m.mapping["host_offset"] == host  # of the first differing byte
    proc = run_cli("verify", raw, bad)
    assert proc.returncode == 1
    assert f"mismatch in sector {guest // 512} " in proc.stdout
    proc = run_cli("io", "-c", "read 0 6M", f"blkverify:{raw}:{bad}")
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512}" in proc.stderr


# --------------------------------------------------------------------------------------------
# images qemu-img cannot make, built from the specification
# --------------------------------------------------------------------------------------------


def _states_disk(sector_size: int) -> vb.Disk:
    bs = 1 * MiB
    disk = vb.Disk(size=12 * MiB, block_size=bs, sector_size=sector_size)
    disk.blocks = {
        0: vb.Block(vb.FULLY_PRESENT, vb.pattern(1, bs)),
        1: vb.Block(vb.ZERO),
        2: vb.Block(vb.UNMAPPED, file_offset=0),
        3: vb.Block(vb.UNDEFINED),
        4: vb.Block(vb.FULLY_PRESENT, vb.pattern(4, bs)),
        5: vb.Block(vb.FULLY_PRESENT, vb.pattern(5, bs)),
        11: vb.Block(vb.FULLY_PRESENT, vb.pattern(11, bs)),
    }
    return disk


@pytest.mark.parametrize("sector_size", [512, 4096])
def test_block_states_and_sector_sizes(tmp_path, sector_size):
    disk = _states_disk(sector_size)
    img = tmp_path / "states.vhdx"
    disk.build(img)
    expected = disk.expected()
    raw = tmp_path / "states.raw"
    raw.write_bytes(expected)
    with bv.open(img) as opened:
        assert opened.info()["logical_sector_size"] == str(sector_size)
        assert opened.read(0, opened.size) == expected
        kinds = [(off // MiB, length // MiB, kind) for off, length, kind, _ in opened.map()]
        assert kinds == [
            (0, 1, "data"),
            (1, 1, "zero"),
            (2, 2, "unallocated"),
            (4, 2, "data"),  # blocks 4 and 5 lie next to each other in the file
            (6, 5, "unallocated"),
            (11, 1, "data"),
        ]
    assert bv.verify(raw, img).identical
    if sector_size == 512:
        # QEMU reads what it can of these too (it has no 4096-byte sector support).
        theirs = tmp_path / "theirs.raw"
        convert_to_raw(img, theirs, fmt="vhdx")
        assert theirs.read_bytes() == expected


def _parent(tmp_path, name="parent.vhdx", size=12 * MiB):
    parent = tmp_path / name
    qemu_img("create", "-q", "-f", "vhdx", "-o", "block_size=1M", parent, size)
    qemu_io(parent, "write -P 0xa1 0 12M", fmt="vhdx")
    parent_raw = tmp_path / "parent.raw"
    convert_to_raw(parent, parent_raw, fmt="vhdx")
    return parent, parent_raw.read_bytes()


def _child(parent_path, relative: str, sector_size=512, **locator) -> vb.Disk:
    bs = 1 * MiB
    dwg = vb.current_header(parent_path)["data_write_guid"]
    pairs = {"parent_linkage": vb.guid_text(dwg), "relative_path": relative, **locator}
    disk = vb.Disk(size=12 * MiB, block_size=bs, sector_size=sector_size, parent=pairs)
    per_block = bs // sector_size
    disk.blocks = {
        0: vb.Block(vb.FULLY_PRESENT, vb.pattern(100, bs)),
        1: vb.Block(
            vb.PARTIALLY_PRESENT,
            vb.pattern(101, bs),
            frozenset({0, 1, 2, 9, per_block - 1} | set(range(40, 80))),
        ),
        2: vb.Block(vb.ZERO),
        3: vb.Block(vb.UNMAPPED),
        5: vb.Block(vb.PARTIALLY_PRESENT, vb.pattern(105, bs), frozenset(range(0, per_block, 2))),
    }
    return disk


def test_differencing_disk_reads_parent_with_child_over_it(tmp_path):
    parent, parent_bytes = _parent(tmp_path)
    child = _child(parent, "parent.vhdx")
    img = tmp_path / "child.vhdx"
    child.build(img)
    expected = child.expected(parent_bytes)
    assert expected != parent_bytes
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    with bv.open(img) as opened:
        assert opened.info()["subformat"] == "differencing"
        assert opened.info()["backing_file"] == "parent.vhdx"
        assert opened.read(0, opened.size) == expected
        # Partially present: sector by sector, data or the parent's.
        loc = opened.locate(1 * MiB + 3 * 512)
        assert loc["kind"] == "backing" and loc["backing_depth"] == 1
        assert loc["tables"] == [{"table": "BAT", "index": 1}]
        assert loc["file"].endswith("parent.vhdx")
        assert opened.locate(1 * MiB + 9 * 512)["kind"] == "data"
        assert opened.locate(4 * MiB)["kind"] == "backing"
        assert opened.locate(2 * MiB)["kind"] == "zero"
    assert bv.verify(raw, img).identical
    assert run_cli("verify", raw, img).returncode == 0
    # Without the parent, its part reads as zeros.
    with bv.open(img, backing=False) as opened:
        assert opened.read(0, opened.size) == child.expected(bytes(child.size))
    # QEMU cannot read differencing vhdx at all.
    qemu = run(["qemu-img", "convert", "-O", "raw", img, tmp_path / "q.raw"], check=False)
    assert qemu.returncode != 0


def test_differencing_chain_with_4096_byte_sectors(tmp_path):
    base = vb.Disk(size=12 * MiB, sector_size=4096)
    base.blocks = {n: vb.Block(vb.FULLY_PRESENT, vb.pattern(200 + n, MiB)) for n in range(12)}
    sub = tmp_path / "sub"
    sub.mkdir()
    base.build(sub / "base.vhdx")
    mid = _child(sub / "base.vhdx", "base.vhdx", sector_size=4096)
    mid.build(sub / "mid.vhdx")
    top = _child(sub / "mid.vhdx", "sub\\mid.vhdx", sector_size=4096)
    top.blocks = {7: vb.Block(vb.PARTIALLY_PRESENT, vb.pattern(300, MiB), frozenset({1, 255}))}
    top.build(tmp_path / "top.vhdx")
    expected = top.expected(mid.expected(base.expected()))
    with bv.open(tmp_path / "top.vhdx") as opened:
        assert opened.read(0, opened.size) == expected
        loc = opened.locate(0)
        assert loc["kind"] == "backing" and loc["backing_depth"] == 1
        loc = opened.locate(4 * MiB)
        assert loc["backing_depth"] == 2 and loc["file"].endswith("base.vhdx")


def test_differencing_parent_checks(tmp_path):
    parent, _ = _parent(tmp_path)
    img = tmp_path / "child.vhdx"
    # A parent whose DataWriteGuid is not the linkage: it changed since.
    bad = _child(parent, "parent.vhdx")
    bad.parent["parent_linkage"] = vb.guid_text(bytes(range(16)))
    bad.build(img)
    with pytest.raises(bv.CorruptImageError, match="parent_linkage"):
        bv.open(img)
    # A missing parent is named.
    _child(parent, "gone.vhdx").build(img)
    err = run_cli("verify", "-F", "vhdx", tmp_path / "parent.raw", img)
    assert err.returncode == 2 and "gone.vhdx" in err.stderr
    # Only relative paths are followed; Windows paths are named in the refusal.
    locator = _child(parent, "x")
    del locator.parent["relative_path"]
    locator.parent["absolute_win32_path"] = "\\\\?\\C:\\vms\\parent.vhdx"
    locator.build(img)
    with pytest.raises(bv.FormatError, match="absolute_win32_path"):
        bv.open(img)
    with bv.open(img, backing=False) as opened:
        assert opened.size == 12 * MiB
    # A parent outside the image's tree obeys the backing policy.
    (tmp_path / "inner").mkdir()
    _child(parent, "..\\parent.vhdx").build(tmp_path / "inner" / "child.vhdx")
    with pytest.raises(bv.FormatError, match="outside"):
        bv.open(tmp_path / "inner" / "child.vhdx")
    with bv.open(tmp_path / "inner" / "child.vhdx", allow_backing_anywhere=True) as opened:
        assert opened.locate(4 * MiB)["kind"] == "backing"


# --------------------------------------------------------------------------------------------
# the log: replayed in memory, the file never written
# --------------------------------------------------------------------------------------------


def _dirty(tmp_path, wrap: bool):
    """A dynamic disk whose BAT on disk is stale (garbage): the log restores it."""
    disk = vb.Disk(size=16 * MiB)
    disk.blocks = {
        0: vb.Block(vb.FULLY_PRESENT, vb.pattern(1, MiB)),
        3: vb.Block(vb.FULLY_PRESENT, vb.pattern(3, MiB)),
        9: vb.Block(vb.ZERO),
    }
    disk.log_guid = bytes(range(1, 17))
    img = tmp_path / "dirty.vhdx"
    layout = disk.build(img)
    bat_page = layout["true_bytes"][layout["bat_offset"] : layout["bat_offset"] + 4 * KiB]
    # What a crash left: a BAT page saying blocks are elsewhere (junk), to be zeroed and
    # then rewritten by the log.
    stale = bytearray(4 * KiB)
    for i in range(16):
        stale[8 * i : 8 * i + 8] = (vb.FULLY_PRESENT | (1 << 20)).to_bytes(8, "little")
    log_size = disk.log_size
    first = log_size - 4 * KiB if wrap else 0
    second = 0 if wrap else 4 * KiB
    entries = [
        # An older, complete sequence under the same LogGuid: must not be replayed.
        vb.LogEntry(
            position=64 * KiB,
            sequence=5,
            tail=64 * KiB,
            writes={layout["bat_offset"]: bytes(stale)},
        ),
        # Under another LogGuid: never valid.
        vb.LogEntry(
            position=128 * KiB,
            sequence=50,
            tail=128 * KiB,
            writes={layout["bat_offset"]: bytes(stale)},
            log_guid=bytes(16 * [9]),
        ),
        vb.LogEntry(
            position=first,
            sequence=10,
            tail=first,
            zeros=[
                (layout["bat_offset"], 4 * KiB),
                (layout["metadata_offset"] + MiB - 8 * KiB, 8 * KiB),
            ],
        ),
        vb.LogEntry(
            position=second, sequence=11, tail=first, writes={layout["bat_offset"]: bat_page}
        ),
    ]
    layout = disk.build(img, entries, stale_pages={layout["bat_offset"]: bytes(stale)})
    return disk, img, layout


@pytest.mark.parametrize("wrap", [False, True])
def test_log_is_replayed_in_memory(tmp_path, wrap):
    disk, img, _ = _dirty(tmp_path, wrap)
    expected = disk.expected()
    before = img.read_bytes()
    raw = tmp_path / "expected.raw"
    raw.write_bytes(expected)
    with bv.open(img) as opened:
        assert opened.info()["log"].startswith("replayed in memory (2 entries, head sequence 11)")
        assert opened.read(0, opened.size) == expected
    assert bv.verify(raw, img).identical
    assert run_cli("verify", raw, img).returncode == 0
    assert img.read_bytes() == before, "the file is never written"
    # QEMU refuses to read it read-only; replaying on a copy gives the same bytes.
    assert run(["qemu-img", "info", img], check=False).returncode != 0
    if not wrap:
        copy = tmp_path / "copy.vhdx"
        shutil.copyfile(img, copy)
        run(["qemu-img", "check", "-r", "all", "-f", "vhdx", copy], check=False)
        theirs = tmp_path / "theirs.raw"
        convert_to_raw(copy, theirs, fmt="vhdx")
        assert theirs.read_bytes() == expected


def test_log_without_a_valid_sequence_is_refused(tmp_path):
    _, img, layout = _dirty(tmp_path, wrap=False)
    # Break the checksum of the newest entry: the sequence 10-11 is incomplete, and entry
    # 10 alone names itself as tail: a valid sequence of one, which does not rebuild the BAT.
    data = bytearray(img.read_bytes())
    data[layout["log_offset"] + 4 * KiB + 100] ^= 1
    img.write_bytes(bytes(data))
    with bv.open(img) as opened:
        assert "head sequence 10" in opened.info()["log"]
    # Break every entry under the header's LogGuid: nothing to replay, which the
    # specification calls corrupt.
    for pos in (0, 64 * KiB):
        data[layout["log_offset"] + pos + 100] ^= 1
    img.write_bytes(bytes(data))
    with pytest.raises(bv.CorruptImageError, match="log"):
        bv.open(img)
    proc = run_cli("verify", img, img)
    assert proc.returncode == 2 and "log" in proc.stderr
