"""The VHD reader (``-f vpc``): images made by qemu-img and qemu-io read exactly as
``qemu-img convert -O raw`` reads them, the disk size follows QEMU's rule, fixed VHDs
are probed by their footer, and a flipped data byte is found at its sector by ``verify``
and by the mirrored device. Differencing VHDs, which qemu-img cannot make, are built
from the specification (``vhd_builder``) and checked against independently computed
bytes: the parent's data with the child's sectors laid over it."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import blkverify_rs as bv
import pytest
import vhd_builder as vb
from conftest import (
    KiB,
    MiB,
    Resources,
    ZooImage,
    convert_to_raw,
    flip_byte,
    qemu_img,
    qemu_io,
    run_cli,
    standard_writes,
)


def qemu_size(path: Path, fmt: str = "vpc") -> int:
    out = qemu_img("info", "--output=json", "-f", fmt, path).stdout
    return json.loads(out)["virtual-size"]


def make_vpc(d: Path, name: str, size: int, subformat: str, force: bool, *writes: str) -> Path:
    p = d / f"{name}.vhd"
    opts = f"subformat={subformat},force_size={'on' if force else 'off'}"
    qemu_img("create", "-q", "-f", "vpc", "-o", opts, p, size)
    if writes:
        qemu_io(p, *writes, fmt="vpc")
    return p


def entry(name: str, path: Path) -> ZooImage:
    expected = path.with_suffix(".expected.raw")
    convert_to_raw(path, expected, fmt="vpc")
    size = expected.stat().st_size
    assert size == qemu_size(path)
    return ZooImage(name, path, "vpc", expected, size)


@pytest.fixture(scope="module")
def vhds(tmp_path_factory) -> dict[str, ZooImage]:
    d = tmp_path_factory.mktemp("vpc")
    res = Resources(d)
    out: dict[str, ZooImage] = {}
    size = 6 * MiB + 3 * 512  # not a CHS size: force_size decides
    writes = [*standard_writes(size, res), f"write -P 0x5d {2 * MiB - 2 * KiB} 4k"]
    for sub in ("fixed", "dynamic"):
        for force in (False, True):
            name = f"{sub}-force{'on' if force else 'off'}"
            real = qemu_size(make_vpc(d, f"probe-{name}", size, sub, force))
            out[name] = entry(
                name, make_vpc(d, name, size, sub, force, *standard_writes(real, res))
            )
    # converted from a raw file with data, holes and a zero run: sparse blocks
    src = d / "source.raw"
    qemu_img("create", "-q", "-f", "raw", src, 12 * MiB)
    qemu_io(src, *writes, f"write -s {res.rnd[3]} {10 * MiB} 100k", fmt="raw")
    for sub in ("dynamic", "fixed"):
        p = d / f"converted-{sub}.vhd"
        qemu_img("convert", "-f", "raw", "-O", "vpc", "-o", f"subformat={sub}", src, p)
        out[f"converted-{sub}"] = entry(f"converted-{sub}", p)
    # Hyper-V's and Azure's creator applications: the size is the footer's current size
    for app in (b"win ", b"wa\0\0"):
        name = f"creator-{app.decode().strip(chr(0)).strip()}"
        p = d / f"{name}.vhd"
        shutil.copyfile(out["dynamic-forceoff"].path, p)
        set_footer(p, 28, app)
        set_footer(p, 48, struct.pack(">Q", 5 * MiB + 512))
        out[name] = entry(name, p)
    return out


def set_footer(path: Path, offset: int, value: bytes) -> None:
    """Patch the footer (and its copy, in sparse disks) and fix the checksums."""
    data = bytearray(path.read_bytes())
    places = [len(data) - 512] + ([0] if data[:8] == b"conectix" else [])
    for at in places:
        foot = bytearray(data[at : at + 512])
        foot[offset : offset + len(value)] = value
        struct.pack_into(">I", foot, 64, vb.vhd_checksum(bytes(foot), 64))
        data[at : at + 512] = foot
    path.write_bytes(bytes(data))


NAMES = [
    "fixed-forceoff",
    "fixed-forceon",
    "dynamic-forceoff",
    "dynamic-forceon",
    "converted-dynamic",
    "converted-fixed",
    "creator-win",
    "creator-wa",
]


@pytest.mark.parametrize("name", NAMES)
def test_reads_as_qemu_img_convert(vhds, name):
    e = vhds[name]
    want = e.expected.read_bytes()
    for fmt in (None, "vpc"):  # probed (fixed VHDs by their footer) and named
        with bv.open(e.path, format=fmt) as img:
            assert img.format == "vpc"
            assert img.size == e.size
            assert img.read(0, img.size) == want
            # unaligned reads across block and sector boundaries
            for off, n in [(2 * MiB - 777, 1554), (1, 1000), (e.size - 300, 300)]:
                assert img.read(off, n) == want[off : off + n]
    rep = bv.verify(e.expected, e.path)
    assert rep.identical, rep.mismatches
    proc = run_cli("verify", "-F", "vpc", e.expected, e.path)
    assert proc.returncode == 0, proc.stderr


def test_the_disk_size_rule(vhds):
    requested = 6 * MiB + 3 * 512
    # force_size=on: the current size, exactly; off: the CHS geometry's size, which
    # qemu-img rounds the request up to.
    for sub in ("fixed", "dynamic"):
        on, off = vhds[f"{sub}-forceon"], vhds[f"{sub}-forceoff"]
        assert on.size == requested
        assert off.size != requested and off.size >= requested
        with bv.open(on.path) as img:
            assert img.info()["size_from"] == "current_size"
            assert img.info()["creator_app"] == "qem2"
        with bv.open(off.path) as img:
            assert img.info()["size_from"] == "geometry"
            c, h, s = map(int, img.info()["geometry"].split("/"))
            assert img.size == c * h * s * 512
    for name in ("creator-win", "creator-wa"):
        assert vhds[name].size == 5 * MiB + 512  # the current size, not the geometry


def test_map_matches_the_file(vhds):
    for name in ("dynamic-forceoff", "converted-dynamic", "converted-fixed"):
        e = vhds[name]
        data = e.path.read_bytes()
        want = e.expected.read_bytes()
        with bv.open(e.path) as img:
            extents = img.map()
            assert sum(n for _, n, _, _ in extents) == img.size
            kinds = {k for _, _, k, _ in extents}
            assert "data" in kinds
            for off, n, kind, host in extents:
                if kind == "data":
                    assert data[host : host + n] == want[off : off + n]
                else:
                    assert want[off : off + n] == bytes(n)


def test_sparse_blocks_are_unallocated(vhds):
    e = vhds["converted-dynamic"]
    with bv.open(e.path) as img:
        kinds = {kind for _, _, kind, _ in img.map()}
        loc = img.locate(9 * MiB)
    assert "unallocated" in kinds
    assert loc["kind"] == "unallocated"
    assert loc["tables"] == [{"table": "BAT", "index": 4}]
    assert loc["unit"] == "block"


def test_fixed_vhd_is_probed_by_its_footer(vhds, tmp_path):
    e = vhds["fixed-forceoff"]
    # QEMU probes it as raw: its only footer is at the end of the file
    info = json.loads(qemu_img("info", "--output=json", e.path).stdout)
    assert info["format"] == "raw"
    assert bv.open(e.path).format == "vpc"
    # a raw file whose last sector only starts like a footer stays raw
    fake = tmp_path / "fake.raw"
    data = bytearray(e.path.read_bytes())
    data[-512 + 100] ^= 0xFF  # the checksum no longer matches
    fake.write_bytes(bytes(data))
    with bv.open(fake) as img:
        assert img.format == "raw"
        assert img.size == len(data)
    with pytest.raises(bv.CorruptImageError, match="checksum"):
        bv.open(fake, format="vpc")


def find_unique(data: bytes, guest: bytes, offset: int, n: int = 32) -> int:
    """The host offset of the guest bytes at ``offset`` (which must occur once)."""
    needle = guest[offset : offset + n]
    host = data.find(needle)
    assert host >= 0 and data.find(needle, host + 1) < 0
    return host


@pytest.mark.parametrize("name", ["converted-dynamic", "converted-fixed", "dynamic-forceon"])
def test_flipped_byte_is_found_at_its_sector(vhds, tmp_path, name):
    e = vhds[name]
    img = tmp_path / e.path.name
    shutil.copyfile(e.path, img)
    want = e.expected.read_bytes()
    guest = 70000 + 1234  # inside random data (standard_writes)
    host = find_unique(img.read_bytes(), want, guest)
    flip_byte(img, host)
    rep = bv.verify(e.expected, img)
    [m] = rep.mismatches
    assert m.sector == guest // 512
    assert m.first_byte == guest
    assert m.mapping["kind"] == "data"
    assert m.mapping["host_offset"] == host
    if "fixed" in name:
        assert m.mapping["tables"] == []
    else:
        assert m.mapping["tables"] == [{"table": "BAT", "index": 0}]
        assert m.mapping["unit"] == "block"
    proc = run_cli("verify", e.expected, img)
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512} " in proc.stdout
    assert "BAT index 0" in proc.stdout or "fixed" in name
    proc = run_cli("io", "-c", "read 64k 64k", f"blkverify:{e.expected}:{img}")
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512}" in proc.stderr
    proc = run_cli("io", "-c", "read 0 64k", "-c", "read 72k 8k", f"blkverify:{e.expected}:{img}")
    assert proc.returncode == 0, proc.stderr


def test_io_reads_and_refuses_writes(vhds):
    e = vhds["dynamic-forceoff"]
    before = e.path.read_bytes()
    proc = run_cli("io", "-c", "read -P 0xab 0 64k", e.path)
    assert proc.returncode == 0, proc.stderr
    # vpc cannot be written here: it opens as if -r were given
    for argv in (["-f", "vpc"], []):
        proc = run_cli("io", *argv, "-c", "write -P 1 0 512", e.path)
        assert proc.returncode == 1
        assert "read-only" in proc.stderr
    proc = run_cli("io", "-c", "write -P 1 0 512", f"blkverify:{e.expected}:{e.path}")
    assert proc.returncode == 1
    assert "read-only" in proc.stderr
    with bv.open(e.path, read_only=False) as img:
        assert img.read_only
        with pytest.raises(OSError):
            img.write(0, b"x" * 512)
    assert e.path.read_bytes() == before


def test_batch(vhds, tmp_path):
    manifest = tmp_path / "pairs.txt"
    lines = [f"{vhds[n].expected} {vhds[n].path}" for n in NAMES[:4]]
    lines.append(
        json.dumps(
            {
                "raw": str(vhds[NAMES[4]].expected),
                "test": str(vhds[NAMES[4]].path),
                "test_format": "vpc",
            }
        )
    )
    manifest.write_text("\n".join(lines) + "\n")
    proc = run_cli("batch", "--json", manifest)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["test_format"] for r in results] == ["vpc"] * 5
    assert all(r["identical"] for r in results)


# --------------------------------------------------------------------------------------------
# differencing VHDs, built from the specification
# --------------------------------------------------------------------------------------------

BS = 2 * MiB


def block(present: set[int], seed: int) -> vb.Block:
    """A block whose every sector holds distinct bytes (sector number and seed)."""
    data = b"".join(struct.pack(">II", seed, s) * 64 for s in range(BS // 512))
    return vb.Block(present, data)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A parent made by qemu-img (dynamic, with data) and differencing children."""
    d = tmp_path_factory.mktemp("vpc-diff")
    res = Resources(d)
    size = 6 * MiB
    parent = d / "parent.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=dynamic,force_size=on", parent, size)
    qemu_io(parent, *standard_writes(size, res), "write -P 0x77 4M 2M", fmt="vpc")
    parent_raw = d / "parent.raw"
    convert_to_raw(parent, parent_raw, fmt="vpc")
    return d, parent, parent_raw.read_bytes()


def child(parent: Path, *locators: vb.Locator, name: str = "", **kw) -> vb.Vhd:
    return vb.Vhd(
        size=kw.pop("size", 6 * MiB),
        disk_type=vb.DIFFERENCING,
        parent_id=vb.read_unique_id(parent),
        parent_name=name,
        locators=list(locators),
        blocks=kw.pop(
            "blocks",
            {
                0: block(set(range(0, 4096, 3)), 1),  # every third sector
                2: block({0, 1, 2, 4095}, 2),  # a few, in a block the parent has data in
                1: block(set(), 3),  # allocated, but every bit clear
            },
        ),
        **kw,
    )


def test_differencing_reads_parent_under_child(family):
    d, parent, parent_data = family
    c = child(parent, vb.Locator(b"W2ru", vb.w2(".\\parent.vhd")), name="parent.vhd")
    path = d / "child.vhd"
    c.write(path)
    want = c.expected(parent_data)
    expected = d / "child.expected.raw"
    expected.write_bytes(want)
    assert want != parent_data and want[: 6 * MiB] != bytes(6 * MiB)
    with bv.open(path) as img:
        assert img.format == "vpc"
        assert img.size == 6 * MiB
        assert img.read(0, img.size) == want
        assert img.info()["backing_file"] == "./parent.vhd"
        # a sector the bitmap leaves to the parent, inside an allocated block
        loc = img.locate(512)
        assert loc["kind"] == "backing"
        assert loc["tables"] == [{"table": "BAT", "index": 0}, {"table": "bitmap", "index": 1}]
        assert os.path.samefile(loc["file"], parent)
        assert img.locate(0)["kind"] == "data"
        assert img.locate(3 * MiB)["kind"] == "backing"  # an unallocated block
    rep = bv.verify(expected, path)
    assert rep.identical, rep.mismatches
    assert run_cli("verify", expected, path).returncode == 0
    # without the parent: its sectors read as zeros, and verify says so
    with bv.open(path, backing=False) as img:
        assert img.read(0, img.size) == c.expected(None)
    proc = run_cli("verify", "--no-backing", "--json", expected, path)
    assert proc.returncode == 1
    assert "was not opened" in json.loads(proc.stdout)["warnings"][0]


def test_flipped_child_byte_is_found(family, tmp_path):
    _d, parent, parent_data = family
    c = child(parent, vb.Locator(b"W2ru", vb.w2("parent.vhd")))
    shutil.copyfile(parent, tmp_path / "parent.vhd")
    path = tmp_path / "child.vhd"
    c.write(path)
    expected = tmp_path / "expected.raw"
    expected.write_bytes(c.expected(parent_data))
    guest = 2 * BS + 4095 * 512 + 17  # the last sector of block 2: stored in the child
    host = find_unique(path.read_bytes(), expected.read_bytes(), guest - 17, 512) + 17
    flip_byte(path, host)
    [m] = bv.verify(expected, path).mismatches
    assert (m.sector, m.first_byte) == (guest // 512, guest)
    assert m.mapping["tables"] == [{"table": "BAT", "index": 2}]
    assert m.mapping["host_offset"] == host
    proc = run_cli("io", "-c", f"read {2 * BS} {BS}", f"blkverify:{expected}:{path}")
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512}" in proc.stderr


@pytest.mark.parametrize(
    "how",
    ["W2ku-absolute", "MacX", "parent-name", "after-unusable", "relative-subdir"],
)
def test_parent_locators(family, tmp_path, how):
    _d, parent, parent_data = family
    here = tmp_path / "disks"
    here.mkdir()
    where = here / "base" if how == "relative-subdir" else here
    where.mkdir(exist_ok=True)
    target = where / "the parent.vhd"
    shutil.copyfile(parent, target)
    locators = {
        "W2ku-absolute": [vb.Locator(b"W2ku", vb.w2(str(target)))],
        "MacX": [vb.Locator(b"MacX", f"file://localhost{target}".replace(" ", "%20").encode())],
        "parent-name": [],
        "after-unusable": [
            vb.Locator(b"W2ru", vb.w2(".\\missing.vhd")),
            vb.Locator(b"W2ku", vb.w2("C:\\vms\\the parent.vhd")),
            vb.Locator(b"Mac ", b"\0" * 64),
            vb.Locator(b"W2ru", vb.w2(".\\the parent.vhd")),
        ],
        "relative-subdir": [vb.Locator(b"W2ru", vb.w2("base\\the parent.vhd"))],
    }[how]
    c = child(target, *locators, name="the parent.vhd" if how == "parent-name" else "")
    path = here / "child.vhd"
    c.write(path)
    with bv.open(path) as img:
        assert img.read(0, img.size) == c.expected(parent_data)


def test_grandchild_chain(family, tmp_path):
    _d, parent, parent_data = family
    shutil.copyfile(parent, tmp_path / "parent.vhd")
    mid = child(parent, vb.Locator(b"W2ru", vb.w2(".\\parent.vhd")))
    mid.write(tmp_path / "mid.vhd")
    top = child(
        tmp_path / "mid.vhd",
        vb.Locator(b"W2ru", vb.w2(".\\mid.vhd")),
        blocks={0: block({1, 2, 3}, 9), 2: block(set(range(2048)), 10)},
    )
    top.write(tmp_path / "top.vhd")
    want = top.expected(mid.expected(parent_data))
    with bv.open(tmp_path / "top.vhd") as img:
        assert img.read(0, img.size) == want
        assert img.locate(512 * 6)["backing_depth"] == 1  # stored in mid
        assert img.locate(512 * 5)["backing_depth"] == 2  # in neither: from the parent
        assert img.locate(3 * MiB)["backing_depth"] == 2


def test_parent_problems(family, tmp_path):
    _d, parent, parent_data = family
    # not found: every locator tried is named
    c = child(
        parent, vb.Locator(b"W2ru", vb.w2(".\\gone.vhd")), vb.Locator(b"W2ku", vb.w2("D:\\x.vhd"))
    )
    path = tmp_path / "orphan.vhd"
    c.write(path)
    with pytest.raises(FileNotFoundError) as info:
        bv.open(path)
    assert "W2ru locator '.\\gone.vhd'" in str(info.value)
    assert "a Windows drive path" in str(info.value)
    proc = run_cli("verify", parent, path)
    assert proc.returncode == 2 and "gone.vhd" in proc.stderr and "Traceback" not in proc.stderr
    with bv.open(path, backing=False) as img:  # --no-backing reads it without a parent
        assert img.read(0, img.size) == c.expected(None)
    # the wrong parent: its unique id is not the one the child was made from
    other = tmp_path / "other.vhd"
    qemu_img("create", "-q", "-f", "vpc", other, "6M")
    c = child(parent, vb.Locator(b"W2ru", vb.w2("other.vhd")))
    c.write(tmp_path / "wrong.vhd")
    with pytest.raises(bv.CorruptImageError, match="unique id"):
        bv.open(tmp_path / "wrong.vhd")
    # outside the image's directory: refused unless allowed
    sub = tmp_path / "sub"
    sub.mkdir()
    c = child(parent, vb.Locator(b"W2ku", vb.w2(str(parent))))
    c.write(sub / "far.vhd")
    with pytest.raises(bv.FormatError, match="outside the image's directory"):
        bv.open(sub / "far.vhd")
    with bv.open(sub / "far.vhd", allow_backing_anywhere=True) as img:
        assert img.read(0, img.size) == c.expected(parent_data)
    # a loop: the child names itself
    c = child(parent, vb.Locator(b"W2ru", vb.w2("self.vhd")))
    c.parent_id = c.unique_id
    c.write(tmp_path / "self.vhd")
    with pytest.raises(bv.Error, match="loops"):
        bv.open(tmp_path / "self.vhd")


def test_dynamic_bitmap_clear_sectors_read_as_zeros(tmp_path):
    """A dynamic (not differencing) disk: sectors whose bit is clear read as zeros, as
    the specification says, whatever the block holds there."""
    v = vb.Vhd(size=4 * MiB, blocks={1: block(set(range(100, 4000)), 5)})
    path = tmp_path / "partial.vhd"
    v.write(path)
    want = v.expected(None)
    with bv.open(path) as img:
        assert img.read(0, img.size) == want
        kinds = [(off, n, kind) for off, n, kind, _ in img.map()]
    assert kinds == [
        (0, 2 * MiB + 100 * 512, "unallocated"),
        (2 * MiB + 100 * 512, 3900 * 512, "data"),
        (2 * MiB + 4000 * 512, 96 * 512, "unallocated"),
    ]
    expected = tmp_path / "expected.raw"
    expected.write_bytes(want)
    assert bv.verify(expected, path).identical


def test_builder_agrees_with_qemu(tmp_path):
    """The builder's dynamic disks are VHDs QEMU reads as we compute them (all bits set)."""
    v = vb.Vhd(size=5 * MiB, blocks={0: block(set(range(4096)), 7), 2: block(set(range(4096)), 8)})
    path = tmp_path / "built.vhd"
    v.write(path)
    out = tmp_path / "qemu.raw"
    convert_to_raw(path, out, fmt="vpc")
    assert out.read_bytes() == v.expected(None)
    with bv.open(path) as img:
        assert img.read(0, img.size) == v.expected(None)


def test_unchanged_on_disk(vhds):
    """Opening and reading never writes."""
    e = vhds["dynamic-forceon"]
    st = os.stat(e.path)
    before = e.path.read_bytes()
    with bv.open(e.path) as img:
        img.read(0, img.size)
    assert e.path.read_bytes() == before
    assert os.stat(e.path).st_mtime_ns == st.st_mtime_ns


@pytest.mark.parametrize("name", ["dynamic-forceoff", "fixed-forceon", "converted-dynamic"])
def test_io_matches_qemu_io(vhds, name):
    """Reads, queries (info, map, alloc) and refused writes print what qemu-io -r prints."""
    from test_io_parity import READ_SCRIPT, assert_same, run_ours, run_qemu_io

    script = [*READ_SCRIPT, "info", "map", "alloc 0 4M", "alloc 1M 64k", "read -P 0x5d 2046k 4k"]
    e = vhds[name]
    theirs = run_qemu_io(e.path, "vpc", script, read_only=True)
    ours = run_ours(e.path, "vpc", script, read_only=True)
    assert_same(ours, theirs, name)


def test_fixed_parent(tmp_path):
    """A differencing disk over a fixed VHD (its only footer at the end holds the id)."""
    parent = tmp_path / "fixed.vhd"
    qemu_img("create", "-q", "-f", "vpc", "-o", "subformat=fixed,force_size=on", parent, "6M")
    qemu_io(parent, "write -P 0x3c 0 6M", fmt="vpc")
    c = child(parent, vb.Locator(b"W2ru", vb.w2("fixed.vhd")))
    c.write(tmp_path / "child.vhd")
    with bv.open(tmp_path / "child.vhd") as img:
        assert img.read(0, img.size) == c.expected(b"\x3c" * (6 * MiB))
        assert img.locate(512)["kind"] == "backing"
        assert img.locate(512)["host_offset"] == 512
