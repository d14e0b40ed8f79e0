"""The VDI reader: static and dynamic images made by qemu-img and qemu-io read exactly
as ``qemu-img convert -O raw`` reads them; unallocated and discarded blocks read as
zeros; a flipped data byte is found at its sector by ``verify`` and by the mirrored
device."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import (
    KiB,
    MiB,
    Resources,
    ZooImage,
    convert_to_raw,
    flip_byte,
    qemu_img,
    qemu_io,
    qemu_map,
    run_cli,
    standard_writes,
)

BMAP_AT = 0x154  # the header's offset_bmap field
ALLOCATED_AT = 0x184  # blocks_allocated


def u32_at(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack("<I", f.read(4))[0]


def put_u32(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<I", value))


def bmap_entry_at(path: Path, block: int) -> int:
    return u32_at(path, BMAP_AT) + 4 * block


def entry(name: str, path: Path) -> ZooImage:
    expected = path.with_suffix(".expected.raw")
    convert_to_raw(path, expected, fmt="vdi")
    size = json.loads(qemu_img("info", "--output=json", path).stdout)["virtual-size"]
    assert expected.stat().st_size == size
    return ZooImage(name, path, "vdi", expected, size)


@pytest.fixture(scope="module")
def vdis(tmp_path_factory) -> dict[str, ZooImage]:
    d = tmp_path_factory.mktemp("vdi")
    res = Resources(d)
    out: dict[str, ZooImage] = {}
    for static in ("on", "off"):
        for size in (6 * MiB, 5 * MiB + 3 * 512):  # whole blocks, and a partial last block
            name = f"static{static}-{size}"
            p = d / f"{name}.vdi"
            qemu_img("create", "-q", "-f", "vdi", "-o", f"static={static}", p, size)
            qemu_io(p, *standard_writes(size, res), "write -z 3M 1M", fmt="vdi")
            out[name] = entry(name, p)
    # converted from raw: blocks written out of order, so data blocks are not in
    # guest order, and zero blocks are left unallocated
    src = d / "source.raw"
    qemu_img("create", "-q", "-f", "raw", src, 8 * MiB)
    qemu_io(src, *standard_writes(8 * MiB, res), fmt="raw")
    p = d / "converted.vdi"
    qemu_img("convert", "-f", "raw", "-O", "vdi", src, p)
    out["converted"] = entry("converted", p)
    p = d / "reversed.vdi"
    qemu_img("create", "-q", "-f", "vdi", p, 4 * MiB)
    qemu_io(
        p, "write -P 0x44 3M 4k", "write -P 0x33 2M 4k", f"write -s {res.rnd[1]} 1M 64k", fmt="vdi"
    )
    out["reversed"] = entry("reversed", p)
    # a discarded block (VirtualBox's compaction marks them 0xfffffffe): zeros
    p = d / "discarded.vdi"
    shutil.copyfile(out["staticoff-6291456"].path, p)
    put_u32(p, bmap_entry_at(p, 0), 0xFFFFFFFE)
    put_u32(p, ALLOCATED_AT, u32_at(p, ALLOCATED_AT) - 1)
    out["discarded"] = entry("discarded", p)
    return out


NAMES = [
    "staticon-6291456",
    "staticon-5244416",
    "staticoff-6291456",
    "staticoff-5244416",
    "converted",
    "reversed",
    "discarded",
]


@pytest.mark.parametrize("name", NAMES)
def test_reads_as_qemu_img_convert(vdis, name):
    e = vdis[name]
    want = e.expected.read_bytes()
    for fmt in (None, "vdi"):
        with bv.open(e.path, format=fmt) as img:
            assert img.format == "vdi"
            assert img.size == e.size
            assert img.read(0, img.size) == want
            for off, n in [(1 * MiB - 777, 1554), (1, 1000), (e.size - 300, 300)]:
                assert img.read(off, n) == want[off : off + n]
    assert bv.verify(e.expected, e.path).identical
    proc = run_cli("verify", "-F", "vdi", e.expected, e.path)
    assert proc.returncode == 0, proc.stderr


def test_map_agrees_with_qemu(vdis):
    for name in ("staticoff-6291456", "converted", "reversed", "staticon-6291456"):
        e = vdis[name]
        data = e.path.read_bytes()
        want = e.expected.read_bytes()
        with bv.open(e.path) as img:
            extents = img.map()
            assert sum(n for _, n, _, _ in extents) == e.size
            for off, n, kind, host in extents:
                if kind == "data":
                    assert data[host : host + n] == want[off : off + n]
                else:
                    assert want[off : off + n] == bytes(n)
            # where qemu-img map gives a host offset, it is ours
            places = [x for x in qemu_map(e.path, fmt="vdi") if "offset" in x]
            assert places
            for x in places:
                for at in range(x["start"], x["start"] + x["length"], 256 * KiB):
                    assert img.locate(at)["host_offset"] == x["offset"] + at - x["start"]


def test_block_kinds(vdis):
    with bv.open(vdis["discarded"].path) as img:
        assert img.locate(0)["kind"] == "zero"
        assert img.locate(0)["tables"] == [{"table": "block map", "index": 0}]
        loc = img.locate(1 * MiB + 5)
        assert loc["kind"] == "data" and loc["unit"] == "block"
        assert loc["tables"] == [{"table": "block map", "index": 1}]
    with bv.open(vdis["reversed"].path) as img:
        assert img.locate(0)["kind"] == "unallocated"
        assert [k for _, _, k, _ in img.map()] == ["unallocated", "data", "data", "data"]


def find_unique(data: bytes, guest: bytes, offset: int, n: int = 32) -> int:
    needle = guest[offset : offset + n]
    host = data.find(needle)
    assert host >= 0 and data.find(needle, host + 1) < 0
    return host


@pytest.mark.parametrize("name", ["staticon-6291456", "converted", "reversed"])
def test_flipped_byte_is_found_at_its_sector(vdis, tmp_path, name):
    e = vdis[name]
    img = tmp_path / e.path.name
    shutil.copyfile(e.path, img)
    want = e.expected.read_bytes()
    guest = 1 * MiB + 1000 if name == "reversed" else 70000 + 1234
    host = find_unique(img.read_bytes(), want, guest)
    flip_byte(img, host)
    rep = bv.verify(e.expected, img)
    [m] = rep.mismatches
    assert (m.sector, m.first_byte) == (guest // 512, guest)
    assert m.mapping["kind"] == "data"
    assert m.mapping["host_offset"] == host
    assert m.mapping["tables"] == [{"table": "block map", "index": guest // MiB}]
    proc = run_cli("verify", e.expected, img)
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512} " in proc.stdout
    assert f"block map index {guest // MiB}" in proc.stdout
    spec = f"blkverify:{e.expected}:{img}"
    proc = run_cli("io", "-c", f"read {guest // MiB * MiB} 1M", spec)
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512}" in proc.stderr
    assert run_cli("io", "-c", f"read {guest // MiB * MiB + 512 * KiB} 512k", spec).returncode == 0


def test_io_read_only_and_batch(vdis, tmp_path):
    e = vdis["staticoff-6291456"]
    before = e.path.read_bytes()
    proc = run_cli("io", "-c", "read -P 0xab 0 64k", "-c", "write 0 512", e.path)
    assert proc.returncode == 1
    assert "read-only" in proc.stderr
    assert "read 65536/65536" in proc.stdout
    assert e.path.read_bytes() == before
    manifest = tmp_path / "pairs.txt"
    manifest.write_text(
        "".join(f"{vdis[n].expected} {vdis[n].path}\n" for n in NAMES)
        + json.dumps({"raw": str(e.expected), "test": str(e.path), "test_format": "vdi"})
        + "\n"
    )
    proc = run_cli("batch", "--json", manifest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(NAMES) + 1
    assert all(r["identical"] and r["test_format"] == "vdi" for r in results)


@pytest.mark.parametrize("name", ["staticoff-5244416", "staticon-6291456", "discarded"])
def test_io_matches_qemu_io(vdis, name):
    """Reads, queries (info, map, alloc) and refused writes print what qemu-io -r prints."""
    from test_io_parity import READ_SCRIPT, assert_same, run_ours, run_qemu_io

    script = [*READ_SCRIPT, "info", "map", "alloc 0 4M", "alloc 1M 64k", "read -P 0 0 512"]
    e = vdis[name]
    theirs = run_qemu_io(e.path, "vdi", script, read_only=True)
    ours = run_ours(e.path, "vdi", script, read_only=True)
    assert_same(ours, theirs, name)
