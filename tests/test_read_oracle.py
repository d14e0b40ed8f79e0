"""bv.open(...).read must return exactly what `qemu-img convert -O raw` returns."""

from __future__ import annotations

import os
import random
import shutil

import blkverify_rs as bv
import pytest
from conftest import (
    BIG_WRITES,
    INCOMPAT_COMPRESSION,
    INCOMPAT_DATA_FILE,
    INCOMPAT_DIRTY,
    INCOMPAT_EXTL2,
    ZOO_NAMES,
    GiB,
    KiB,
    MiB,
    l2_geometry,
    qemu_img,
    qemu_io,
    qemu_map,
    read_header,
    read_range,
)


def open_entry(entry, **kw):
    return bv.open(entry.path, snapshot=entry.snapshot, **kw)


# --------------------------------------------------------------------------------------------
# the zoo itself is what we think it is (guards against silently weaker fixtures)
# --------------------------------------------------------------------------------------------


def test_zoo_is_complete(zoo):
    assert sorted(zoo) == sorted(ZOO_NAMES)
    for entry in zoo.values():
        assert entry.expected.stat().st_size == entry.size
        # every image has some non-zero guest data
        assert entry.expected.read_bytes().strip(b"\0")


def test_zoo_raw_sparse_has_holes(zoo):
    st = zoo["raw_sparse"].path.stat()
    assert st.st_blocks * 512 < st.st_size // 2


def test_zoo_zero_clusters(zoo):
    plain = qemu_map(zoo["qcow2_zero_plain"].path)
    assert any(e["zero"] and e["present"] and "offset" not in e for e in plain)
    alloc = qemu_map(zoo["qcow2_zero_alloc"].path)
    assert any(e["zero"] and e["present"] and "offset" in e for e in alloc)


@pytest.mark.parametrize(
    "name", ["qcow2_zlib", "qcow2_zstd", "qcow2_write_c", "qcow2_zlib_c512", "qcow2_zlib_extl2"]
)
def test_zoo_compressed_clusters(zoo, name):
    entries = qemu_map(zoo[name].path)
    assert any(e["compressed"] for e in entries)
    assert any(e["data"] and not e["compressed"] for e in entries)  # incompressible clusters


def test_zoo_header_features(zoo):
    assert read_header(zoo["qcow2_extl2"].path)["incompatible_features"] & INCOMPAT_EXTL2
    assert read_header(zoo["qcow2_extl2_backing"].path)["incompatible_features"] & INCOMPAT_EXTL2
    assert read_header(zoo["qcow2_zstd"].path)["incompatible_features"] & INCOMPAT_COMPRESSION
    assert read_header(zoo["qcow2_data_file"].path)["incompatible_features"] & INCOMPAT_DATA_FILE
    assert read_header(zoo["qcow2_v2"].path)["version"] == 2
    assert read_header(zoo["qcow2_refcount1"].path)["refcount_order"] == 0
    assert read_header(zoo["qcow2_refcount64"].path)["refcount_order"] == 6
    assert read_header(zoo["qcow2_dirty"].path)["incompatible_features"] & INCOMPAT_DIRTY
    assert read_header(zoo["snapshot_current"].path)["nb_snapshots"] == 1
    assert read_header(zoo["qcow2_bitmap"].path)["autoclear_features"] & 1
    assert read_header(zoo["chain_v2"].path)["version"] == 2
    assert read_header(zoo["chain_v2"].chain[0])["version"] == 2
    assert l2_geometry(zoo["qcow2_extl2_c16k"].path) == (16 * KiB, 1024, True)
    assert l2_geometry(zoo["qcow2_zstd_c2m"].path)[0] == 2 * MiB
    assert any(
        e["compressed"] and e["depth"] == 1 for e in qemu_map(zoo["chain_over_compressed"].path)
    )
    for name, cs in [
        ("qcow2_c512", 512),
        ("qcow2_c4k", 4 * KiB),
        ("qcow2_c64k", 64 * KiB),
        ("qcow2_c2m", 2 * MiB),
    ]:
        assert l2_geometry(zoo[name].path)[0] == cs


def test_zoo_snapshot_differs_from_current(zoo):
    assert zoo["snapshot_by_name"].expected.read_bytes() != (
        zoo["snapshot_current"].expected.read_bytes()
    )
    assert zoo["snapshot_by_name"].expected.read_bytes() == (
        zoo["snapshot_by_id"].expected.read_bytes()
    )


# --------------------------------------------------------------------------------------------
# reads against the oracle
# --------------------------------------------------------------------------------------------


def test_open_metadata(zoo_image):
    with open_entry(zoo_image) as img:
        assert img.size == zoo_image.size
        assert img.format == zoo_image.fmt
        assert isinstance(img.path, str)
        assert os.path.samefile(img.path, zoo_image.path)


def test_open_explicit_format(zoo_image):
    with open_entry(zoo_image, format=zoo_image.fmt) as img:
        assert img.format == zoo_image.fmt
        assert img.size == zoo_image.size
        assert img.read(0, 4096) == zoo_image.expected.read_bytes()[:4096]


def test_read_whole_image(zoo_image):
    expected = zoo_image.expected.read_bytes()
    with open_entry(zoo_image) as img:
        data = img.read(0, img.size)
    assert len(data) == len(expected)
    assert data == expected


def test_random_unaligned_reads(zoo_image):
    expected = zoo_image.expected.read_bytes()
    size = zoo_image.size
    rng = random.Random(f"reads-{zoo_image.name}")
    img = open_entry(zoo_image)
    try:
        for _ in range(200):
            length = rng.randint(1, 70000)
            offset = rng.randint(0, size - length)
            got = img.read(offset, length)
            assert got == expected[offset : offset + length], (offset, length)
    finally:
        img.close()


def test_reads_across_cluster_boundaries(zoo_image):
    expected = zoo_image.expected.read_bytes()
    size = zoo_image.size
    cs = l2_geometry(zoo_image.path)[0] if zoo_image.fmt == "qcow2" else 64 * KiB
    offsets = {k * cs + d for k in range(1, 40) for d in (-3, -1, 0, 511)}
    offsets |= {1 * MiB - 1, size // 2 + 7, size - 1}
    with open_entry(zoo_image) as img:
        for off in sorted(o for o in offsets if 0 <= o < size):
            length = min(7, size - off)
            assert img.read(off, length) == expected[off : off + length], off
        # a read of a whole cluster-sized window starting mid-cluster
        off = cs // 2 + 3
        length = min(cs + 100, size - off)
        assert img.read(off, length) == expected[off : off + length]


def test_readinto(zoo_image):
    expected = zoo_image.expected.read_bytes()
    size = zoo_image.size
    with open_entry(zoo_image) as img:
        buf = bytearray(70001)
        off = size // 2 - 1000
        n = img.readinto(off, buf)
        assert n == len(buf)
        assert bytes(buf) == expected[off : off + len(buf)]

        backing = bytearray(b"\xa5" * 1000)
        view = memoryview(backing)[100:300]
        n = img.readinto(70000 - 3, view)
        assert n == 200
        assert bytes(backing[100:300]) == expected[70000 - 3 : 70000 + 197]
        # bytes outside the view are untouched
        assert backing[:100] == b"\xa5" * 100
        assert backing[300:] == b"\xa5" * 700

        tail = bytearray(512)
        assert img.readinto(size - 512, tail) == 512
        assert bytes(tail) == expected[-512:]


def test_read_past_end_raises(zoo_image):
    with open_entry(zoo_image) as img:
        size = img.size
        with pytest.raises((ValueError, bv.Error)):
            img.read(size - 10, 20)
        with pytest.raises((ValueError, bv.Error)):
            img.read(size, 1)
        with pytest.raises((ValueError, bv.Error)):
            img.read(size + 4096, 512)
        with pytest.raises((ValueError, bv.Error)):
            img.readinto(size - 1, bytearray(2))
        # still usable after a refused read
        assert img.read(size - 10, 10) == zoo_image.expected.read_bytes()[-10:]


# --------------------------------------------------------------------------------------------
# specific behaviours
# --------------------------------------------------------------------------------------------


def test_qcow2_opened_as_raw_reads_the_file(zoo):
    entry = zoo["qcow2_c64k"]
    file_bytes = entry.path.read_bytes()
    with bv.open(entry.path, format="raw") as img:
        assert img.format == "raw"
        assert img.size == len(file_bytes)
        assert img.read(0, 4) == b"QFI\xfb"
        assert img.read(0, len(file_bytes)) == file_bytes


def test_snapshot_by_name_and_id_agree(zoo):
    by_name = zoo["snapshot_by_name"]
    expected = by_name.expected.read_bytes()
    for snap in ("snap1", "1"):
        with bv.open(by_name.path, snapshot=snap) as img:
            assert img.size == by_name.size
            assert img.read(0, img.size) == expected


def test_unknown_snapshot_raises(zoo):
    # a bad argument, like every InvalidArgument of the core: ValueError, naming both
    # the snapshot asked for and the ones the image has
    with pytest.raises(ValueError, match=r"no snapshot with ID or name 'no-such-snapshot'.*snap1"):
        bv.open(zoo["snapshot_current"].path, snapshot="no-such-snapshot")


def test_dirty_image_is_not_modified_by_open(zoo):
    entry = zoo["qcow2_dirty"]
    before = entry.path.read_bytes()
    st = entry.path.stat()
    assert read_header(entry.path)["incompatible_features"] & INCOMPAT_DIRTY
    with bv.open(entry.path) as img:
        assert img.read(0, img.size) == entry.expected.read_bytes()
        assert img.read(0, 64 * KiB) == b"\x5a" * (64 * KiB)
    rep = bv.verify(entry.expected, entry.path)
    assert rep.identical
    assert entry.path.read_bytes() == before
    assert entry.path.stat().st_mtime_ns == st.st_mtime_ns
    assert read_header(entry.path)["incompatible_features"] & INCOMPAT_DIRTY


def test_open_is_read_only_for_every_image(zoo_image):
    files = [zoo_image.path, *zoo_image.chain]
    if zoo_image.data_file is not None:
        files.append(zoo_image.data_file)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in files}
    with open_entry(zoo_image) as img:
        img.read(0, min(img.size, 1 * MiB))
    for p in files:
        assert (p.read_bytes(), p.stat().st_mtime_ns) == before[p], p


def test_missing_file_raises_file_not_found(tmp_path):
    missing = tmp_path / "does-not-exist.qcow2"
    with pytest.raises(FileNotFoundError):
        bv.open(missing)
    with pytest.raises(OSError):
        bv.open(missing, format="qcow2")


def test_random_file_probes_as_raw(tmp_path):
    data = random.Random(7).randbytes(64 * KiB + 512)
    p = tmp_path / "random.img"
    p.write_bytes(data)
    with bv.open(p) as img:
        assert img.format == "raw"
        assert img.size == len(data)
        assert img.read(0, len(data)) == data
        assert img.read(12345, 3) == data[12345:12348]


def test_odd_sized_raw(tmp_path, zoo):
    # a raw file whose size is not a multiple of 512
    data = zoo["raw"].expected.read_bytes()[: 1 * MiB + 1234]
    p = tmp_path / "odd.raw"
    p.write_bytes(data)
    with bv.open(p, format="raw") as img:
        assert img.size == len(data)
        assert img.read(0, len(data)) == data
        assert img.read(len(data) - 5, 5) == data[-5:]
        with pytest.raises((ValueError, bv.Error)):
            img.read(len(data) - 5, 6)


def test_module_surface():
    assert isinstance(bv.__version__, str) and bv.__version__
    assert issubclass(bv.Error, Exception)
    assert issubclass(bv.FormatError, bv.Error)
    assert issubclass(bv.CorruptImageError, bv.Error)
    assert not issubclass(bv.FormatError, bv.CorruptImageError)


def test_big_sparse_reads_above_4gib(big_sparse):
    e = big_sparse
    rng = random.Random(64)
    with bv.open(e.path) as img:
        assert img.size == 6 * GiB
        for off, length in BIG_WRITES:
            for start, n in [
                (off, length),
                (off - 700, length + 1400),
                (off + length // 2 - 3, 9),
                (off - 4096, 4096),
            ]:
                start = max(0, start)
                n = min(n, e.size - start)
                assert img.read(start, n) == read_range(e.expected, start, n), (start, n)
        for _ in range(100):
            n = rng.randint(1, 20000)
            start = rng.randint(4 * GiB - 100000, 6 * GiB - n)
            assert img.read(start, n) == read_range(e.expected, start, n), (start, n)
        buf = bytearray(70000)
        assert img.readinto(BIG_WRITES[1][0], buf) == 70000
        assert bytes(buf) == read_range(e.expected, BIG_WRITES[1][0], 70000)
        with pytest.raises((ValueError, bv.Error)):
            img.read(6 * GiB - 1, 2)


def test_snapshot_of_a_smaller_disk(tmp_path):
    """A snapshot taken before the image grew: its size is the snapshot's own disk size.

    Oracle: `qemu-img snapshot -a` on a copy (reverting really restores the old size), then
    `qemu-img convert -O raw`.
    """
    img = tmp_path / "grown.qcow2"
    qemu_img("create", "-f", "qcow2", img, 2 * MiB)
    qemu_io(img, "write -P 0x41 0 1M", "write -P 0x42 2047k 1k")
    qemu_img("snapshot", "-c", "small", img)
    qemu_img("resize", img, 4 * MiB)
    qemu_io(img, "write -P 0x43 3M 64k", "write -P 0x44 0 4k")
    reverted = tmp_path / "reverted.qcow2"
    shutil.copyfile(img, reverted)
    qemu_img("snapshot", "-a", "small", reverted)
    expected = tmp_path / "small.raw"
    qemu_img("convert", "-O", "raw", reverted, expected)
    data = expected.read_bytes()
    assert len(data) == 2 * MiB
    for snap in ("small", "1"):
        with bv.open(img, snapshot=snap) as opened:
            assert opened.size == 2 * MiB
            assert opened.read(0, opened.size) == data
    with bv.open(img) as opened:
        assert opened.size == 4 * MiB
    rep = bv.verify(expected, img, snapshot="small", strict=True)
    assert rep.identical
    assert rep.test_size == 2 * MiB
