"""The vmdk reader against QEMU: every subformat qemu-img makes reads back as
``qemu-img convert -O raw`` does; a flipped byte is found at its exact sector by
``verify`` and by ``io`` through ``blkverify:RAW:TEST``; differencing disks follow the
backing policy; writes are refused as under ``-r``."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, qemu_img, qemu_io, run, run_cli
from vmdk_images import (
    SECTOR,
    Disk,
    build_chain,
    build_disks,
    edit_descriptor,
    flip,
    grain_marker,
    grains,
    host_location,
)


@pytest.fixture(scope="session")
def disks(tmp_path_factory) -> dict[str, Disk]:
    return build_disks(tmp_path_factory.mktemp("vmdk"))


DISKS = [
    "sparse",
    "sparse-zg",
    "flat",
    "split-sparse",
    "split-flat",
    "conv-sparse",
    "stream",
    "stream-footer",
]


@pytest.mark.parametrize("name", DISKS)
def test_reads_as_qemu_reads(disks, name):
    disk = disks[name]
    expected = disk.expected
    with bv.open(disk.path) as img:
        assert img.format == "vmdk"
        assert img.size == expected.stat().st_size
        if not disk.big:
            assert img.read(0, img.size) == expected.read_bytes()
        # Unaligned reads across grains and (split disks) extents.
        with open(expected, "rb") as f:
            for offset, length in [(1000, 70000), (img.size - 5000, 5000), (2047 * MiB - 3, 9)]:
                if offset + length <= img.size:
                    f.seek(offset)
                    assert img.read(offset, length) == f.read(length), (offset, length)
        covered = sum(length for _, length, _, _ in img.map())
        assert covered == img.size
    rep = bv.verify(expected, disk.path, all=True)
    assert rep.identical, rep.mismatches[:3]
    assert rep.test_format == "vmdk"
    proc = run_cli("verify", expected, disk.path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# Guest offsets of data each disk has (see vmdk_images.standard_writes / BIG_WRITES).
FLIP_AT = {
    "sparse": 1200 * 1024 + 777,
    "sparse-zg": 100 * 1024 + 5,
    "flat": 1200 * 1024 + 777,
    "split-sparse": 2048 * MiB + 12345,  # in the second extent
    "split-flat": 2048 * MiB + 12345,
    "conv-sparse": 2 * MiB + 4321,
}


@pytest.mark.parametrize("name", sorted(FLIP_AT))
def test_flipped_byte_is_found_at_its_sector(disks, name):
    disk = disks[name]
    guest = FLIP_AT[name]
    file, host = host_location(disk.path, guest)
    flip(file, host)
    try:
        proc = run_cli("verify", "--json", disk.expected, disk.path)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        report = json.loads(proc.stdout)
        [m] = report["mismatches"]
        assert (m["sector"], m["first_byte"], m["length"]) == (guest // SECTOR, guest, SECTOR)
        mapping = m["mapping"]
        assert mapping["kind"] == "data"
        assert mapping["host_offset"] == host
        assert Path(mapping["file"]).resolve() == file.resolve()
        tables = [t["table"] for t in mapping["tables"]]
        sparse = "flat" not in name
        split = name.startswith("split") or name == "flat"
        assert tables == (["extent"] if split else []) + (["GD", "GT"] if sparse else [])
        assert mapping["unit"] == ("grain" if sparse else "extent")
        human = run_cli("verify", disk.expected, disk.path)
        assert human.returncode == 1
        where = f"grain at host offset {host:#x} in {mapping['file']}"
        if sparse:
            assert "vmdk metadata: " in human.stdout and where in human.stdout, human.stdout
        # The mirrored device finds it too, at the same sector.
        start = guest // (64 * 1024) * (64 * 1024)
        spec = f"blkverify:{disk.expected}:{disk.path}"
        io = run_cli("io", "-c", f"read {start} 64k", spec)
        assert io.returncode == 1
        assert f"contents mismatch in sector {guest // SECTOR}" in io.stderr, io.stderr
    finally:
        flip(file, host)
    assert run_cli("verify", disk.expected, disk.path).returncode == 0


@pytest.mark.parametrize("name", ["stream", "stream-footer"])
def test_flipped_byte_in_a_compressed_grain_is_a_finding(disks, name, tmp_path):
    disk = disks[name]
    img = tmp_path / disk.path.name
    shutil.copyfile(disk.path, img)
    guest, sector = grains(img)[5]
    _, size = grain_marker(img, sector)
    flip(img, sector * SECTOR + 12 + size // 2)
    proc = run_cli("verify", "--json", "--all", disk.expected, img)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [m] = json.loads(proc.stdout)["mismatches"]
    assert guest <= m["offset"] < guest + 64 * 1024
    if m.get("error"):
        assert "compressed grain" in m["error"] and img.name in m["error"]
    else:
        assert m["mapping"]["kind"] == "compressed"
    io = run_cli("io", "-c", f"read {guest} 64k", f"blkverify:{disk.expected}:{img}")
    assert io.returncode == 1
    assert "mismatch" in io.stderr, io.stderr


def test_compressed_grain_mapping_names_its_tables(disks):
    disk = disks["stream"]
    with bv.open(disk.path) as img:
        where = img.locate(3 * MiB + 100)
        kinds = {kind for _, _, kind, _ in img.map()}
    assert kinds <= {"compressed", "unallocated"} and "compressed" in kinds
    assert where["kind"] == "compressed" and where["unit"] == "grain"
    assert where["tables"] == [{"table": "GD", "index": 0}, {"table": "GT", "index": 48}]


def test_zero_grains_map_as_zero(disks):
    with bv.open(disks["sparse-zg"].path) as img:
        assert img.locate(1 * MiB + 5)["kind"] == "zero"
        assert img.locate(3 * MiB)["kind"] == "unallocated"
    with bv.open(disks["sparse"].path) as img:
        assert img.locate(1 * MiB + 5)["kind"] == "data"  # zeros written as data


# --------------------------------------------------------------------------------------------
# io: a format we cannot write opens as if -r were given
# --------------------------------------------------------------------------------------------


def test_io_writes_fail_as_under_read_only(disks):
    disk = disks["sparse"]
    before = disk.path.read_bytes()
    for spec in (str(disk.path), f"blkverify:{disk.expected}:{disk.path}"):
        ours = run_cli("io", "-c", "write -P 0x99 0 4k", spec)
        as_r = run_cli("io", "-r", "-c", "write -P 0x99 0 4k", spec)
        assert ours.returncode == as_r.returncode == 1
        assert ours.stderr == as_r.stderr == "qemu-io: Block node is read-only\n"
        read = run_cli("io", "-c", "read -P 0x11 0 64k", spec)
        assert read.returncode == 0, read.stderr
    with bv.open(disk.path, read_only=False) as img:
        assert img.read_only
        with pytest.raises(OSError):
            img.write(0, b"x")
    assert disk.path.read_bytes() == before


@pytest.mark.parametrize("name", ["sparse", "flat", "split-sparse", "stream-footer"])
@pytest.mark.parametrize("cmd", ["info", "map", "alloc 0 2M", "read -v 1200k 32"])
def test_io_matches_qemu_io(disks, name, cmd):
    disk = disks[name]
    ours = run(
        [sys.executable, "-m", "blkverify_rs", "io", "-c", cmd, disk.path.name],
        cwd=disk.path.parent,
        check=False,
    )
    theirs = run(["qemu-io", "-r", "-c", cmd, disk.path.name], cwd=disk.path.parent)
    strip = lambda s: [ln for ln in s.splitlines() if "ops/sec" not in ln]  # noqa: E731
    assert strip(ours.stdout) == strip(theirs.stdout), ours.stderr


# --------------------------------------------------------------------------------------------
# differencing disks
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> list[Path]:
    return build_chain(tmp_path_factory.mktemp("vmdk-chain"))


def copy_chain(chain: list[Path], dest: Path) -> list[Path]:
    return [Path(shutil.copy(p, dest / p.name)) for p in chain]


def test_chain_reads_as_qemu_reads(chain, tmp_path):
    top = chain[0]
    expected = tmp_path / "top.raw"
    qemu_img("convert", "-O", "raw", top, expected)
    with bv.open(top) as img:
        assert img.read(0, img.size) == expected.read_bytes()
        assert img.locate(0)["kind"] == "backing"
        assert img.locate(0)["backing_depth"] == 2
        assert img.locate(64 * 1024)["backing_depth"] == 1
        assert img.info()["backing_file"] == "mid.vmdk"
    assert bv.verify(expected, top).identical
    # Without backing files, unallocated grains read as zeros, with a warning.
    proc = run_cli("verify", "--no-backing", expected, top)
    assert proc.returncode == 1 and "backing" in proc.stderr


def test_chain_depth_limit(chain):
    proc = run_cli("verify", "--max-backing-depth", "1", chain[2], chain[0])
    assert proc.returncode == 2 and "deeper than 1" in proc.stderr, proc.stderr
    with pytest.raises(bv.FormatError, match="deeper than 1"):
        bv.open(chain[0], max_backing_depth=1)


def test_parent_changed_after_the_child_was_made(chain, tmp_path):
    top, mid, _ = copy_chain(chain, tmp_path)
    qemu_io(mid, "write -P 0x77 0 4k", fmt="vmdk")  # QEMU gives mid a new CID
    with pytest.raises(bv.CorruptImageError, match=r"parentCID .* has CID") as info:
        bv.open(top)
    assert "top.vmdk" in str(info.value)
    # QEMU reads the grains the child has, and fails on those that reach the parent.
    assert qemu_io(top, "read 128k 64k", fmt="vmdk", check=False).returncode == 0
    fails = run(["qemu-io", "-r", "-c", "read 0 4k", top], check=False)
    assert "failed" in fails.stdout + fails.stderr


def test_parent_loop_is_refused(chain, tmp_path):
    top, mid, _ = copy_chain(chain, tmp_path)
    edit_descriptor(mid, 'parentFileNameHint="base.vmdk"', 'parentFileNameHint="top.vmdk"')
    with pytest.raises(bv.CorruptImageError, match="loops"):
        bv.open(top)
    proc = run_cli("verify", chain[2], top)
    assert proc.returncode == 2 and "loops" in proc.stderr


def test_parent_outside_the_tree_needs_permission(chain, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    top, _, _ = copy_chain(chain, tmp_path)
    moved = Path(shutil.move(top, inner / "top.vmdk"))
    edit_descriptor(moved, 'parentFileNameHint="mid.vmdk"', 'parentFileNameHint="../mid.vmdk"')
    with pytest.raises(bv.FormatError, match="outside the image's directory"):
        bv.open(moved)
    with bv.open(moved, allow_backing_anywhere=True) as img:
        assert img.read(0, 4) == b"\x01" * 4
    expected = tmp_path / "expected.raw"
    qemu_img("convert", "-O", "raw", moved, expected)
    assert run_cli("verify", expected, moved).returncode == 2
    assert run_cli("verify", "--allow-backing-anywhere", expected, moved).returncode == 0


def test_extent_outside_the_tree_needs_permission(disks, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    disk = disks["flat"]
    flat_file = next(p for p in disk.files if p.name.endswith("-flat.vmdk"))
    desc = inner / "flat.vmdk"
    shutil.copyfile(disk.path, desc)
    edit_descriptor(desc, '"flat-flat.vmdk"', f'"{flat_file}"')
    with pytest.raises(bv.FormatError, match=r"extent .* outside the image's directory"):
        bv.open(desc)
    proc = run_cli("verify", disk.expected, desc)
    assert proc.returncode == 2 and "--allow-backing-anywhere" in proc.stderr
    assert run_cli("verify", "--allow-backing-anywhere", disk.expected, desc).returncode == 0


def test_an_extent_opened_alone_is_refused(disks):
    extent = next(p for p in disks["split-sparse"].files if p.name.endswith("-s001.vmdk"))
    with pytest.raises(bv.CorruptImageError, match="no embedded descriptor"):
        bv.open(extent)


def test_raw_reference_may_compare_vmdk_bytes(disks):
    # -f raw still reads a vmdk file's bytes as they are.
    disk = disks["sparse"]
    rep = bv.verify(disk.path, disk.path, raw_format="raw", test_format="raw")
    assert rep.identical and rep.test_format == "raw"


def test_rdonly_extents_read_like_rw(disks):
    # VMware marks extents of read-only disks RDONLY; QEMU skips such lines (and
    # so reads a shorter disk); we read them as RW extents.
    disk = disks["flat"]
    desc = disk.path.parent / "flat-rdonly.vmdk"
    shutil.copyfile(disk.path, desc)
    try:
        edit_descriptor(desc, "RW ", "RDONLY ")
        with bv.open(desc) as img:
            assert img.read(0, img.size) == disk.expected.read_bytes()
    finally:
        desc.unlink()


def test_a_descriptor_rewritten_with_a_shorter_cid_reads_as_qemu_reads_it(disks, tmp_path):
    # QEMU rewrites the CID in place on a disk's first write ("CID=%x"): a CID with
    # fewer hex digits ends the text at an earlier NUL and leaves the old text's
    # last bytes behind it. QEMU reads the text up to the NUL; so must we (this
    # made the suite fail now and then, whenever qemu-io drew a CID below 2^24).
    disk = disks["flat"]
    desc = disk.path.parent / "flat-short-cid.vmdk"
    text = disk.path.read_bytes().split(b"\0", 1)[0]
    start = text.index(b"\nCID=") + len(b"\nCID=")
    end = text.index(b"\n", start)
    short = text[:start] + b"1a2b" + text[end:]
    assert len(short) <= len(text) - 2
    desc.write_bytes(short + b"\0" + text[len(short) + 1 :] + b"\0" * 64)
    try:
        data = desc.read_bytes()
        assert any(data[data.index(b"\0") :])  # old text behind the NUL
        want = tmp_path / "want.raw"
        qemu_img("convert", "-f", "vmdk", "-O", "raw", desc, want)
        with bv.open(desc) as img:
            assert img.read(0, img.size) == want.read_bytes() == disk.expected.read_bytes()
        assert run_cli("verify", disk.expected, desc).returncode == 0
    finally:
        desc.unlink()
