"""bv.verify / `blkverify verify` against references made by `qemu-img convert -O raw`."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import warnings

import blkverify_rs as bv
import pytest
from conftest import (
    BIG_WRITES,
    ZOO_NAMES,
    GiB,
    KiB,
    MiB,
    compressed_clusters,
    copy_entry,
    expected_indices,
    flip_byte,
    l2_geometry,
    patch_header,
    qemu_img,
    qemu_io,
    qemu_map,
    read_header,
    run_cli,
)

JSON_KEYS = {
    "raw",
    "test",
    "raw_format",
    "test_format",
    "virtual_size",
    "identical",
    "bytes_compared",
    "elapsed_s",
    "mismatches",
}

# snapshot entries read a snapshot, so the current clusters from `qemu-img map` don't apply
# (and qcow2_zstd_c2m has nothing but compressed clusters)
FLIPPABLE = [
    n for n in ZOO_NAMES if n not in ("snapshot_by_name", "snapshot_by_id", "qcow2_zstd_c2m")
]


def verify_quiet(raw, test, **kw):
    """bv.verify, tolerating (and ignoring) a Python warning about differing sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bv.verify(raw, test, **kw)


def snapshot_args(entry):
    return [] if entry.snapshot is None else ["--snapshot", entry.snapshot]


def assert_cli_error(proc, name):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines, "no error message"
    err = [ln for ln in lines if ln.startswith("blkverify: error:")]
    assert err, proc.stderr
    assert name in proc.stderr


def data_extents(entry):
    """Plain-data guest extents of the top image (or its data file): (start, len, host)."""
    fmt = entry.fmt
    out = []
    for e in qemu_map(entry.path, fmt=fmt):
        if e["data"] and not e.get("compressed") and e["depth"] == 0 and "offset" in e:
            out.append((e["start"], e["length"], e["offset"]))
    assert out, f"no data extents in {entry.name}"
    return out


def host_file(entry):
    return entry.data_file if entry.data_file is not None else entry.path


def check_mapping(entry, m, guest, kind, depth=0, host=None):
    if entry.fmt == "raw":
        assert m.mapping is None
        return
    mp = m.mapping
    assert isinstance(mp, dict), mp
    assert mp["kind"] == kind, mp
    assert isinstance(mp["file"], str)
    idx = expected_indices(entry.path, guest)
    assert mp["l1_index"] == idx["l1_index"], mp
    assert mp["l2_index"] == idx["l2_index"], mp
    assert mp["subcluster"] == idx["subcluster"], mp
    assert mp["backing_depth"] == depth, mp
    if host is not None:
        cs = l2_geometry(entry.path)[0]
        sub = cs // 32
        candidates = {host, host - guest % 512, host - guest % cs, host - guest % sub}
        assert mp["host_offset"] in candidates, (mp, candidates)


# --------------------------------------------------------------------------------------------
# identical images
# --------------------------------------------------------------------------------------------


def test_verify_identical(zoo_image):
    e = zoo_image
    rep = bv.verify(e.expected, e.path, snapshot=e.snapshot)
    assert rep.identical is True
    assert rep.mismatches == []
    assert rep.virtual_size == e.size
    assert rep.raw_size == e.size
    assert rep.test_size == e.size
    assert rep.bytes_compared == e.size
    assert rep.raw_format == "raw"
    assert rep.test_format == e.fmt
    assert isinstance(rep.elapsed_s, float) and rep.elapsed_s >= 0


def test_verify_identical_all_explicit_formats(zoo_image):
    e = zoo_image
    rep = bv.verify(
        e.expected, e.path, all=True, raw_format="raw", test_format=e.fmt, snapshot=e.snapshot
    )
    assert rep.identical
    assert rep.mismatches == []
    assert rep.bytes_compared == e.size


@pytest.mark.parametrize(
    "name",
    [
        "raw",
        "qcow2_c64k",
        "qcow2_extl2_backing",
        "chain_3level",
        "qcow2_data_file",
        "snapshot_by_id",
    ],
)
def test_cli_identical(zoo, name):
    e = zoo[name]
    proc = run_cli("verify", *snapshot_args(e), e.expected, e.path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Images are identical." in proc.stdout.splitlines()
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["raw", "qcow2_zstd", "chain_over_raw", "snapshot_by_name"])
def test_cli_json_identical(zoo, name):
    e = zoo[name]
    proc = run_cli("verify", "--json", *snapshot_args(e), e.expected, e.path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    data = json.loads(proc.stdout)
    assert JSON_KEYS <= set(data)
    assert data["raw"].endswith(e.expected.name)
    assert data["test"].endswith(e.path.name)
    assert data["raw_format"] == "raw"
    assert data["test_format"] == e.fmt
    assert data["virtual_size"] == e.size
    assert data["identical"] is True
    assert data["bytes_compared"] == e.size
    assert isinstance(data["elapsed_s"], (int, float))
    assert data["mismatches"] == []
    rep = bv.verify(e.expected, e.path, snapshot=e.snapshot)
    d = rep.to_dict()
    assert set(d) == set(data)
    for key in ("raw_format", "test_format", "virtual_size", "identical", "bytes_compared"):
        assert d[key] == data[key], key
    assert d["mismatches"] == []
    json.dumps(d)  # serialisable


def test_cli_formats_and_progress_flags(zoo):
    e = zoo["qcow2_c4k"]
    for flags in (
        ["-f", "raw", "-F", "qcow2"],
        ["--raw-format", "raw", "--test-format", "qcow2"],
        ["--progress"],
        ["--no-progress"],
        ["--all", "--strict"],
    ):
        proc = run_cli("verify", *flags, e.expected, e.path)
        assert proc.returncode == 0, (flags, proc.stdout, proc.stderr)
        assert "Images are identical." in proc.stdout.splitlines(), flags
        assert "Traceback" not in proc.stderr


def test_cli_quiet(zoo):
    e = zoo["qcow2_c64k"]
    for flag in ("-q", "--quiet"):
        proc = run_cli("verify", flag, e.expected, e.path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == ""


def test_cli_version():
    proc = run_cli("--version")
    assert proc.returncode == 0, proc.stderr
    assert bv.__version__ in proc.stdout


# --------------------------------------------------------------------------------------------
# corruption of the test image's data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FLIPPABLE)
def test_flip_one_byte_in_test_image(zoo, tmp_path, name):
    e = copy_entry(zoo[name], tmp_path)
    rng = random.Random(f"flip-{name}")
    start, length, host = rng.choice(data_extents(e))
    k = rng.randrange(length)
    guest = start + k
    flip_byte(host_file(e), host + k)

    rep = bv.verify(e.expected, e.path, snapshot=e.snapshot)
    assert rep.identical is False
    assert len(rep.mismatches) == 1
    m = rep.mismatches[0]
    assert m.sector == guest // 512
    assert m.offset == m.sector * 512
    assert m.first_byte == guest
    assert m.length > 0 and m.length % 512 == 0
    assert m.error is None
    check_mapping(e, m, guest, "data", host=host + k)

    rep_all = bv.verify(e.expected, e.path, all=True, snapshot=e.snapshot)
    assert [(x.sector, x.length, x.first_byte) for x in rep_all.mismatches] == [
        (guest // 512, 512, guest)
    ]


@pytest.mark.parametrize(
    "name", ["raw", "qcow2_c64k", "qcow2_extl2_backing", "qcow2_data_file_raw", "chain_3level"]
)
def test_cli_reports_flipped_byte(zoo, tmp_path, name):
    e = copy_entry(zoo[name], tmp_path)
    start, length, host = data_extents(e)[-1]
    k = length // 2
    guest = start + k
    flip_byte(host_file(e), host + k, 0x01)
    sector = guest // 512

    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert f"contents mismatch in sector {sector}" in proc.stdout
    if e.fmt == "qcow2":
        assert "L2" in proc.stdout

    proc = run_cli("verify", "--json", e.expected, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    data = json.loads(proc.stdout)
    assert JSON_KEYS <= set(data)
    assert data["identical"] is False
    assert len(data["mismatches"]) == 1
    mm = data["mismatches"][0]
    assert mm["sector"] == sector
    assert mm["offset"] == sector * 512
    assert mm["first_byte"] == guest
    assert mm["length"] >= 512
    if e.fmt == "qcow2":
        assert mm["mapping"]["kind"] == "data"
        assert mm["mapping"]["l2_index"] == expected_indices(e.path, guest)["l2_index"]
    else:
        assert mm.get("mapping") is None

    proc = run_cli("verify", "-q", e.expected, e.path)
    assert proc.returncode == 1


@pytest.mark.parametrize(
    "name", ["raw", "qcow2_c4k", "qcow2_extl2_backing", "qcow2_data_file", "chain_3level"]
)
def test_two_separate_flips(zoo, tmp_path, name):
    e = copy_entry(zoo[name], tmp_path)
    extents = data_extents(e)
    s1, _l1, h1 = extents[0]
    s2, l2, h2 = extents[-1]
    g1, g2 = s1 + 3, s2 + l2 - 1
    assert g2 // 512 > g1 // 512 + 1
    flip_byte(host_file(e), h1 + 3)
    flip_byte(host_file(e), h2 + l2 - 1)

    first = bv.verify(e.expected, e.path)
    assert [(m.sector, m.first_byte) for m in first.mismatches] == [(g1 // 512, g1)]

    rep = bv.verify(e.expected, e.path, all=True)
    assert rep.identical is False
    assert [(m.sector, m.length, m.first_byte) for m in rep.mismatches] == [
        (g1 // 512, 512, g1),
        (g2 // 512, 512, g2),
    ]
    for m in rep.mismatches:
        assert m.offset == m.sector * 512
    d = rep.to_dict()
    assert [x["sector"] for x in d["mismatches"]] == [g1 // 512, g2 // 512]

    proc = run_cli("verify", "--all", "--json", e.expected, e.path)
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert [(x["sector"], x["length"], x["first_byte"]) for x in data["mismatches"]] == [
        (g1 // 512, 512, g1),
        (g2 // 512, 512, g2),
    ]


@pytest.mark.parametrize("name", ["raw", "qcow2_c64k", "qcow2_c512"])
def test_consecutive_sectors_merge_into_runs(zoo, tmp_path, name):
    e = copy_entry(zoo[name], tmp_path)
    # guest 0..64k holds 0xab in every zoo image with standard writes
    extent = next(x for x in data_extents(e) if x[0] == 0)
    for guest in (600, 1100, 1700, 2600, 2601):
        flip_byte(host_file(e), extent[2] + guest)  # host == guest-relative within the extent
    rep = bv.verify(e.expected, e.path, all=True)
    assert [(m.sector, m.offset, m.length, m.first_byte) for m in rep.mismatches] == [
        (1, 512, 1536, 600),
        (5, 2560, 512, 2600),
    ]
    rep1 = bv.verify(e.expected, e.path)
    assert len(rep1.mismatches) == 1
    assert rep1.mismatches[0].sector == 1
    assert rep1.mismatches[0].first_byte == 600


@pytest.mark.parametrize(
    ("name", "guest", "kind", "depth"),
    [
        ("qcow2_c4k", 3 * MiB + 5, "unallocated", 0),
        ("qcow2_c64k", 10, "data", 0),
        ("qcow2_zero_plain", 3 * MiB + 100, "zero", 0),
        ("qcow2_zero_alloc", 3 * MiB + 100, "zero", 0),
        ("qcow2_zlib", 100, "compressed", 0),
        ("qcow2_zstd", 1 * MiB - 1, "compressed", 0),
        ("qcow2_write_c", 3 * MiB + 70000, "compressed", 0),
        ("qcow2_extl2", 3 * MiB + 8 * KiB + 100, "zero", 0),
        ("qcow2_extl2", 3 * MiB + 10 * KiB + 100, "data", 0),
        ("qcow2_extl2_backing", 2 * KiB + 5, "data", 0),
        ("qcow2_extl2_backing", 4 * KiB + 10, "backing", 1),
        ("qcow2_extl2_backing", 16 * KiB + 10, "zero", 0),
        ("chain_over_raw", 70100, "backing", 1),
        ("chain_3level", 62 * KiB + 10, "data", 0),
        ("chain_3level", 60 * KiB + 10, "backing", 1),
        ("chain_3level", 10, "backing", 1),  # COW copy in mid.qcow2
        ("chain_3level", 131072 + 100, "backing", 2),
        ("chain_3level", 1 * MiB + 10, "zero", 0),
        ("qcow2_data_file", 10, "data", 0),
        ("snapshot_by_name", 100, "data", 0),
        ("qcow2_zlib_c512", 100, "compressed", 0),
        ("qcow2_zstd_c2m", 5, "compressed", 0),
        ("qcow2_zlib_extl2", 100, "compressed", 0),
        ("qcow2_zlib_extl2", 1 * MiB + 2 * KiB + 10, "zero", 0),
        ("qcow2_extl2_c16k", 256 * KiB + 1536 + 10, "zero", 0),
        ("qcow2_extl2_c16k", 3 * MiB + 1536 + 10, "data", 0),
        ("chain_over_compressed", 10, "backing", 1),
        ("chain_over_compressed", 2 * MiB + 10, "zero", 0),
        ("chain_v2", 10, "backing", 1),
        ("qcow2_prealloc_metadata", 3 * MiB + 10, "data", 0),
        ("qcow2_bitmap", 10, "data", 0),
        ("chain_unaligned_backing_end", 1 * MiB + 1000, "backing", 1),
        ("chain_unaligned_backing_cow", 1 * MiB + 1500, "data", 0),
        ("chain_unaligned_backing_cow", 1 * MiB + 60000, "data", 0),
    ],
)
def test_flip_in_reference(zoo, tmp_path, name, guest, kind, depth):
    e = zoo[name]
    # the oracle agrees with the kind / depth we expect at this offset
    ent = next(x for x in qemu_map(e.path) if x["start"] <= guest < x["start"] + x["length"])
    if e.snapshot is None:
        assert ent["depth"] == depth, ent
        if kind == "compressed":
            assert ent["compressed"]
        if kind == "zero":
            assert ent["zero"] and ent["depth"] == 0 and ent["present"]
        if kind in ("data", "backing"):
            assert ent["data"]
    raw = tmp_path / "reference.raw"
    shutil.copyfile(e.expected, raw)
    flip_byte(raw, guest, 0x80)

    rep = bv.verify(raw, e.path, snapshot=e.snapshot)
    assert not rep.identical
    [m] = rep.mismatches
    assert (m.sector, m.offset, m.first_byte) == (guest // 512, guest // 512 * 512, guest)
    assert m.error is None
    check_mapping(e, m, guest, kind, depth=depth)

    proc = run_cli("verify", *snapshot_args(e), raw, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"contents mismatch in sector {guest // 512}" in proc.stdout
    assert "L2" in proc.stdout


def test_flip_in_backing_file(zoo, tmp_path):
    e = copy_entry(zoo["chain_3level"], tmp_path)
    base = e.chain[1]
    guest = 131072 + 100  # only in base.qcow2 (depth 2)
    ent = next(x for x in qemu_map(e.path) if x["start"] <= guest < x["start"] + x["length"])
    assert ent["depth"] == 2 and ent["data"]
    flip_byte(base, ent["offset"] + guest - ent["start"])
    rep = bv.verify(e.expected, e.path)
    [m] = rep.mismatches
    assert (m.sector, m.first_byte) == (guest // 512, guest)
    check_mapping(e, m, guest, "backing", depth=2)


def test_raw_test_image_flip(zoo, tmp_path):
    e = zoo["raw_sparse"]
    test = tmp_path / "test.raw"
    shutil.copyfile(e.path, test)
    guest = 3 * MiB + 3 + 999  # last byte of the random write
    flip_byte(test, guest, 0x10)
    rep = bv.verify(e.expected, test, all=True)
    assert rep.test_format == "raw"
    assert [(m.sector, m.length, m.first_byte) for m in rep.mismatches] == [
        (guest // 512, 512, guest)
    ]
    assert rep.mismatches[0].mapping is None


def test_test_format_raw_on_qcow2(zoo):
    e = zoo["qcow2_c64k"]
    rep = verify_quiet(e.expected, e.path, test_format="raw")
    assert not rep.identical
    assert rep.test_format == "raw"
    assert rep.mismatches[0].sector == 0
    proc = run_cli("verify", "-F", "raw", e.expected, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "contents mismatch in sector 0" in proc.stdout


# --------------------------------------------------------------------------------------------
# size differences
# --------------------------------------------------------------------------------------------


@pytest.fixture
def longer_raw(zoo, tmp_path):
    e = zoo["qcow2_c64k"]
    raw = tmp_path / "longer.raw"
    shutil.copyfile(e.expected, raw)
    qemu_img("resize", "-f", "raw", raw, "+64k")
    assert raw.stat().st_size == e.size + 64 * KiB
    return e, raw


def test_raw_longer_zero_tail(longer_raw):
    e, raw = longer_raw
    rep = verify_quiet(raw, e.path)
    assert rep.identical
    assert rep.mismatches == []
    assert rep.raw_size == e.size + 64 * KiB
    assert rep.test_size == e.size

    proc = run_cli("verify", raw, e.path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "Images are identical." in proc.stdout.splitlines()
    assert "warning" in (proc.stdout + proc.stderr).lower()
    assert "Traceback" not in proc.stderr


def test_raw_longer_strict(longer_raw):
    e, raw = longer_raw
    rep = verify_quiet(raw, e.path, strict=True)
    assert rep.identical is False
    proc = run_cli("verify", "--strict", raw, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    # equal sizes are fine with --strict
    proc = run_cli("verify", "--strict", e.expected, e.path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


def test_raw_longer_nonzero_tail(longer_raw):
    e, raw = longer_raw
    guest = e.size + 1000
    qemu_io(raw, f"write -P 0x77 {guest} 100", fmt="raw")
    rep = verify_quiet(raw, e.path)
    assert not rep.identical
    [m] = rep.mismatches
    assert (m.sector, m.first_byte) == (guest // 512, guest)
    rep = verify_quiet(raw, e.path, all=True)
    assert [(m.sector, m.first_byte) for m in rep.mismatches] == [(guest // 512, guest)]
    proc = run_cli("verify", raw, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert f"contents mismatch in sector {guest // 512}" in proc.stdout


def test_test_longer(zoo, tmp_path):
    e = copy_entry(zoo["qcow2_c4k"], tmp_path)
    qemu_img("resize", "-f", "qcow2", e.path, "+1M")
    rep = verify_quiet(e.expected, e.path)
    assert rep.identical
    assert (rep.raw_size, rep.test_size) == (e.size, e.size + 1 * MiB)
    assert not verify_quiet(e.expected, e.path, strict=True).identical
    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert "warning" in (proc.stdout + proc.stderr).lower()

    guest = e.size + 5000
    qemu_io(e.path, f"write -P 0x10 {guest} 10")
    rep = verify_quiet(e.expected, e.path, all=True)
    assert [(m.sector, m.length, m.first_byte) for m in rep.mismatches] == [
        (guest // 512, 512, guest)
    ]
    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 1
    assert f"contents mismatch in sector {guest // 512}" in proc.stdout


def test_odd_sized_reference_shorter_than_test(zoo, tmp_path):
    e = zoo["qcow2_c64k"]  # last 3000 guest bytes are 0xee
    raw = tmp_path / "odd.raw"
    raw.write_bytes(e.expected.read_bytes()[: e.size - 100])
    rep = verify_quiet(raw, e.path, all=True)
    assert not rep.identical
    assert rep.raw_size == e.size - 100
    guest = e.size - 100
    assert [(m.sector, m.first_byte) for m in rep.mismatches] == [(guest // 512, guest)]
    assert rep.mismatches[0].length == e.size - (guest // 512) * 512


# --------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------


def test_missing_files(zoo, tmp_path):
    e = zoo["qcow2_c64k"]
    missing = tmp_path / "no-such-image.qcow2"
    with pytest.raises(FileNotFoundError):
        bv.verify(e.expected, missing)
    with pytest.raises(FileNotFoundError):
        bv.verify(missing, e.path)
    assert_cli_error(run_cli("verify", e.expected, missing), missing.name)
    assert_cli_error(run_cli("verify", missing, e.path), missing.name)


def test_cli_usage_errors(zoo):
    e = zoo["raw"]
    proc = run_cli("verify", e.path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    proc = run_cli("verify", "--no-such-option", e.expected, e.path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_unknown_format_name(zoo):
    e = zoo["qcow2_c64k"]
    with pytest.raises((bv.FormatError, ValueError)):
        bv.open(e.path, format="qed")
    proc = run_cli("verify", "-F", "qed", e.expected, e.path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr


def test_unknown_snapshot_cli(zoo):
    e = zoo["snapshot_current"]
    assert_cli_error(run_cli("verify", "--snapshot", "nope", e.expected, e.path), e.path.name)


def test_l1_table_past_eof(zoo, tmp_path):
    e = copy_entry(zoo["qcow2_c64k"], tmp_path)
    cs = l2_geometry(e.path)[0]
    size = e.path.stat().st_size
    patch_header(e.path, "l1_table_offset", (size // cs + 64) * cs)
    with pytest.raises(bv.CorruptImageError):
        bv.open(e.path)
    with pytest.raises(bv.CorruptImageError):
        bv.verify(e.expected, e.path)
    assert_cli_error(run_cli("verify", e.expected, e.path), e.path.name)


@pytest.mark.parametrize("name", ["qcow2_zlib", "qcow2_zstd", "qcow2_zlib_c512", "qcow2_zstd_c2m"])
def test_corrupt_compressed_payload(zoo, tmp_path, name):
    e = copy_entry(zoo[name], tmp_path)
    cs = l2_geometry(e.path)[0]
    clusters = compressed_clusters(e.path)
    guest, host, _ = clusters[min(3, len(clusters) - 1)]
    with open(e.path, "r+b") as f:
        f.seek(host + 8)
        f.write(bytes(random.Random(1).randbytes(64)))
    rep = bv.verify(e.expected, e.path)
    assert not rep.identical
    [m] = rep.mismatches
    assert guest <= m.offset < guest + cs
    assert m.mapping["kind"] == "compressed"
    assert m.error is None or isinstance(m.error, str)

    rep = bv.verify(e.expected, e.path, all=True)
    assert rep.mismatches
    assert all(guest <= x.offset < guest + cs for x in rep.mismatches)

    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_header_untouched_by_verify(zoo):
    e = zoo["qcow2_refcount1"]
    before = read_header(e.path)
    assert bv.verify(e.expected, e.path).identical
    assert read_header(e.path) == before


# --------------------------------------------------------------------------------------------
# a 6 GiB sparse image: offsets above 4 GiB, holes on either side
# --------------------------------------------------------------------------------------------


def test_big_sparse_identical(big_sparse):
    e = big_sparse
    rep = bv.verify(e.expected, e.path, all=True)
    assert rep.identical
    assert rep.virtual_size == 6 * GiB
    assert rep.bytes_compared == 6 * GiB
    proc = run_cli("verify", "--json", e.expected, e.path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["virtual_size"] == 6 * GiB


def test_big_sparse_test_side_changes(big_sparse, tmp_path):
    # copy only the qcow2 file: the 6 GiB reference must not be copied (it would not stay sparse)
    test = tmp_path / big_sparse.path.name
    shutil.copyfile(big_sparse.path, test)
    e = dataclasses.replace(big_sparse, path=test)
    off, length = BIG_WRITES[1]
    g1 = off + length - 1  # last byte of the random write, above 5 GiB
    start, _, host = next(x for x in data_extents(e) if x[0] <= g1 < x[0] + x[1])
    flip_byte(e.path, host + g1 - start)
    g2 = 3 * GiB + 12345  # a hole in the reference, data in the test
    qemu_io(e.path, f"write -P 0x01 {g2} 1")
    rep = bv.verify(e.expected, e.path, all=True)
    assert [(m.sector, m.length, m.first_byte) for m in rep.mismatches] == [
        (g2 // 512, 512, g2),
        (g1 // 512, 512, g1),
    ]
    check_mapping(e, rep.mismatches[0], g2, "data")
    check_mapping(e, rep.mismatches[1], g1, "data", host=host + g1 - start)
    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 1
    assert f"contents mismatch in sector {g2 // 512}" in proc.stdout


def test_big_sparse_reference_side_changes(big_sparse, tmp_path):
    e = big_sparse
    raw = tmp_path / "reference.raw"
    qemu_img("convert", "-O", "raw", e.path, raw)  # sparse copy of the reference
    g1 = 2 * GiB + 7  # data in the reference, unallocated in the test
    g2 = 6 * GiB - 1  # the very last byte
    qemu_io(raw, f"write -P 0x80 {g1} 1", f"write -P 0x00 {g2} 1", fmt="raw")
    rep = bv.verify(raw, e.path, all=True)
    assert [(m.sector, m.length, m.first_byte) for m in rep.mismatches] == [
        (g1 // 512, 512, g1),
        (g2 // 512, 512, g2),
    ]
    check_mapping(e, rep.mismatches[0], g1, "unallocated")
    check_mapping(e, rep.mismatches[1], g2, "data")


def test_report_fields_are_one_list(tmp_path):
    """The Python Report is made of the native report dict's fields, one list
    (ReportFields in src/python/verify.rs): its annotations name the same fields,
    and --json prints the documented keys in that list's order, a partial
    report's range as an object."""
    from blkverify_rs import _native

    hinted = {name for name in bv.Report.__annotations__ if not name.startswith("_")}
    assert hinted == set(_native.REPORT_FIELDS)
    internal = {"bytes_read", "test_options"}
    assert set(_native.REPORT_JSON_FIELDS) == set(_native.REPORT_FIELDS) - internal
    assert JSON_KEYS <= set(_native.REPORT_JSON_FIELDS)

    raw, test = tmp_path / "a.raw", tmp_path / "b.qcow2"
    qemu_img("create", "-q", "-f", "raw", raw, "1M")
    qemu_img("create", "-q", "-f", "qcow2", test, "1M")
    qemu_io(test, "write -P 7 64k 4k")
    native = _native.verify((str(raw), str(test)), start=0, length=128 * KiB, all=True)
    assert list(native) == list(_native.REPORT_FIELDS)
    rep = bv.verify(raw, test, start=0, length=128 * KiB, all=True)
    assert rep.range == (0, 128 * KiB)
    assert rep.bytes_read > 0 and rep.test_options["backing"] is True
    data = json.loads(run_cli("verify", "--json", "--all", "--length", "128k", raw, test).stdout)
    assert list(data) == [k for k in _native.REPORT_JSON_FIELDS if k != "block_size"]
    assert data["range"] == {"start": 0, "length": 128 * KiB}
    assert data == {**rep.to_dict(), "elapsed_s": data["elapsed_s"]}
    assert [m["offset"] for m in data["mismatches"]] == [64 * KiB]
