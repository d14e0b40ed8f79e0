"""Images blkverify must refuse (or handle specially) instead of returning wrong bytes."""

from __future__ import annotations

import os
import random
import shutil
import struct
import time

import blkverify_rs as bv
import pytest
from conftest import (
    INCOMPAT_CORRUPT,
    KiB,
    MiB,
    compressed_clusters,
    copy_entry,
    l1_entry_offset,
    l2_entry_offset,
    patch_header,
    qemu_img,
    qemu_io,
    read_header,
    run_cli,
)


def assert_cli_error(proc, name):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert any(ln.startswith("blkverify: error:") for ln in proc.stderr.splitlines()), proc.stderr
    assert name in proc.stderr
    return proc.stderr


@pytest.fixture(scope="session")
def base_image(tmp_path_factory):
    """A small, healthy qcow2 v3 image and its expected contents."""
    d = tmp_path_factory.mktemp("refusals")
    img = d / "healthy.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", img, 1 * MiB)
    qemu_io(img, "write -P 0xab 0 64k", "write -P 0x12 300001 7000")
    raw = d / "healthy.raw"
    qemu_img("convert", "-O", "raw", img, raw)
    return img, raw


@pytest.fixture
def damaged(base_image, tmp_path):
    """A fresh copy of the healthy image to damage, plus the reference raw."""
    img, raw = base_image
    copy = tmp_path / "damaged.qcow2"
    shutil.copyfile(img, copy)
    return copy, raw


@pytest.fixture(scope="session")
def luks_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("luks")
    img = d / "encrypted.qcow2"
    qemu_img(
        "create",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=123456",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        img,
        1 * MiB,
    )
    assert read_header(img)["crypt_method"] == 2
    raw = d / "zeros.raw"
    qemu_img("create", "-f", "raw", raw, 1 * MiB)
    return img, raw


def test_luks_refused(luks_image):
    img, raw = luks_image
    with pytest.raises(bv.FormatError, match=r"(?i)encrypt"):
        bv.open(img)
    with pytest.raises(bv.FormatError):
        bv.open(img, format="qcow2")
    with pytest.raises(bv.FormatError):
        bv.verify(raw, img)
    err = assert_cli_error(run_cli("verify", raw, img), img.name)
    assert "encrypt" in err.lower()


def test_aes_crypt_method_refused(damaged):
    img, raw = damaged
    patch_header(img, "crypt_method", 1)
    with pytest.raises(bv.FormatError, match=r"(?i)encrypt"):
        bv.open(img)
    err = assert_cli_error(run_cli("verify", raw, img), img.name)
    assert "encrypt" in err.lower()


def test_unknown_incompatible_feature_refused(damaged):
    img, raw = damaged
    hdr = read_header(img)
    patch_header(img, "incompatible_features", hdr["incompatible_features"] | (1 << 40))
    with pytest.raises(bv.FormatError):
        bv.open(img)
    assert_cli_error(run_cli("verify", raw, img), img.name)


@pytest.mark.parametrize("bits", [8, 22, 0, 63])
def test_cluster_bits_out_of_range(damaged, bits):
    img, raw = damaged
    patch_header(img, "cluster_bits", bits)
    with pytest.raises(bv.Error, match="cluster_bits") as info:
        bv.open(img)
    assert isinstance(info.value, (bv.CorruptImageError, bv.FormatError))
    err = assert_cli_error(run_cli("verify", raw, img), img.name)
    assert "cluster_bits" in err


def test_version_4_refused(damaged):
    img, raw = damaged
    patch_header(img, "version", 4)
    with pytest.raises(bv.FormatError):
        bv.open(img)
    assert_cli_error(run_cli("verify", raw, img), img.name)


@pytest.mark.parametrize("version", [1, 0])
def test_old_versions_refused(damaged, version):
    img, _ = damaged
    patch_header(img, "version", version)
    with pytest.raises(bv.Error):
        bv.open(img)


def test_bad_magic_probes_as_raw(damaged):
    img, _ = damaged
    with open(img, "r+b") as f:
        f.write(b"QFI\x00")
    data = img.read_bytes()
    with bv.open(img) as opened:
        assert opened.format == "raw"
        assert opened.size == len(data)
        assert opened.read(0, len(data)) == data
    # forcing qcow2 on it is a format error, not a crash
    with pytest.raises(bv.Error):
        bv.open(img, format="qcow2")


def test_random_file_forced_qcow2(tmp_path):
    p = tmp_path / "noise.bin"
    p.write_bytes(random.Random(3).randbytes(8 * KiB))
    with bv.open(p) as img:
        assert img.format == "raw"
    with pytest.raises(bv.Error):
        bv.open(p, format="qcow2")
    assert_cli_error(run_cli("verify", "-F", "qcow2", p, p), p.name)


@pytest.mark.parametrize("length", [100, 4, 0])
def test_truncated_qcow2(damaged, length):
    img, raw = damaged
    os.truncate(img, length)
    if length >= 4:
        with pytest.raises(bv.Error):
            bv.open(img)
        assert_cli_error(run_cli("verify", raw, img), img.name)
    # an empty file is a valid, empty raw image when probing
    else:
        with bv.open(img) as opened:
            assert opened.format == "raw"
            assert opened.size == 0
        with pytest.raises(bv.Error):
            bv.open(img, format="qcow2")


def test_truncated_after_header(damaged):
    img, raw = damaged
    # keep the header cluster only: L1/refcount tables now lie past the end of the file
    os.truncate(img, 4 * KiB)
    with pytest.raises(bv.CorruptImageError):
        bv.open(img)
    assert_cli_error(run_cli("verify", raw, img), img.name)


def test_corrupt_bit_still_readable(damaged):
    img, raw = damaged
    hdr = read_header(img)
    patch_header(img, "incompatible_features", hdr["incompatible_features"] | INCOMPAT_CORRUPT)
    before = img.read_bytes()
    with bv.open(img) as opened:
        assert opened.format == "qcow2"
        assert opened.read(0, opened.size) == raw.read_bytes()
    rep = bv.verify(raw, img)
    assert rep.identical
    proc = run_cli("verify", raw, img)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert img.read_bytes() == before


def test_backing_file_missing(zoo, tmp_path):
    e = copy_entry(zoo["chain_over_raw"], tmp_path)
    missing = e.chain[0]
    missing.unlink()
    with pytest.raises((OSError, bv.Error)):
        bv.open(e.path)
    assert_cli_error(run_cli("verify", e.expected, e.path), missing.name)


def test_data_file_missing(zoo, tmp_path):
    e = copy_entry(zoo["qcow2_data_file"], tmp_path)
    e.data_file.unlink()
    with pytest.raises((OSError, bv.Error)):
        bv.open(e.path)
    assert_cli_error(run_cli("verify", e.expected, e.path), e.data_file.name)


def test_raw_reference_must_be_raw(zoo):
    # the reference is opened as raw by default: a qcow2 reference is compared byte for byte
    e = zoo["qcow2_c64k"]
    rep = bv.verify(e.path, e.path, raw_format="raw", test_format="raw")
    assert rep.identical
    assert rep.virtual_size == e.path.stat().st_size


def _write_u64(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


@pytest.mark.parametrize("loop", ["self", "cycle"])
def test_backing_chain_loop(zoo, tmp_path, loop):
    e = copy_entry(zoo["chain_3level"], tmp_path)
    base = e.chain[1]
    target = base.name if loop == "self" else e.path.name
    qemu_img("rebase", "-u", "-b", target, "-F", "qcow2", base, cwd=base.parent)
    t0 = time.monotonic()
    with pytest.raises(bv.Error):
        bv.open(e.path)
    assert time.monotonic() - t0 < 10
    assert_cli_error(run_cli("verify", e.expected, e.path), base.name)


def test_broken_backing_file_is_named(zoo, tmp_path):
    e = copy_entry(zoo["chain_3level"], tmp_path)
    base = e.chain[1]
    patch_header(base, "cluster_bits", 30)
    with pytest.raises(bv.Error, match="cluster_bits"):
        bv.open(e.path)
    err = assert_cli_error(run_cli("verify", e.expected, e.path), base.name)
    assert "cluster_bits" in err


def test_l2_table_past_eof_is_a_test_side_read_error(zoo, tmp_path):
    e = copy_entry(zoo["qcow2_c4k"], tmp_path)  # 4k clusters: one L2 table maps 2 MiB
    guest = 2 * MiB + 7 + 100  # inside the random write at size/2 + 7
    _write_u64(e.path, l1_entry_offset(e.path, guest), (1 << 63) | (1 << 30))
    with bv.open(e.path) as img:
        assert img.read(0, 4096) == e.expected.read_bytes()[:4096]  # other L2 table: fine
        with pytest.raises(bv.CorruptImageError):
            img.read(guest, 10)
    rep = bv.verify(e.expected, e.path, all=True)
    assert not rep.identical
    assert rep.mismatches
    m = rep.mismatches[0]
    assert m.offset == 2 * MiB
    assert isinstance(m.error, str) and m.error
    assert all(x.offset >= 2 * MiB for x in rep.mismatches)
    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_compressed_cluster_past_eof(zoo, tmp_path):
    e = copy_entry(zoo["qcow2_zlib"], tmp_path)
    cs = 64 * KiB
    guest = compressed_clusters(e.path)[2][0]
    entry_off = l2_entry_offset(e.path, guest)
    with open(e.path, "rb") as f:
        f.seek(entry_off)
        old = struct.unpack(">Q", f.read(8))[0]
    x = 62 - (16 - 8)  # cluster_bits 16
    host = (e.path.stat().st_size + 10 * MiB) & ~511
    _write_u64(e.path, entry_off, (old & ~((1 << x) - 1)) | host)
    assert compressed_clusters(e.path)[2][:2] == (guest, host)
    with bv.open(e.path) as img:
        with pytest.raises(bv.Error):
            img.read(guest, cs)
    rep = bv.verify(e.expected, e.path)
    [m] = rep.mismatches
    assert m.offset == guest
    assert isinstance(m.error, str) and m.error
    assert m.mapping is None or m.mapping["kind"] == "compressed"
    proc = run_cli("verify", e.expected, e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr


def test_unaligned_l2_table_offset(zoo, tmp_path):
    e = copy_entry(zoo["qcow2_c4k"], tmp_path)
    entry = l1_entry_offset(e.path, 0)
    with open(e.path, "rb") as f:
        f.seek(entry)
        old = struct.unpack(">Q", f.read(8))[0]
    _write_u64(e.path, entry, old + 512)  # L2 tables must be cluster aligned
    try:
        img = bv.open(e.path)
    except bv.CorruptImageError:
        return  # refusing at open time is fine too
    with img, pytest.raises(bv.CorruptImageError):
        img.read(0, 512)


@pytest.mark.parametrize("fmt", ["vmdk", "vpc", "vhdx", "vdi"])
def test_other_formats_read_or_refused(tmp_path, fmt):
    """A format we recognise is read exactly as qemu-img reads it once its reader has
    landed (``bv.formats(readable=True)``), and refused, never compared as raw bytes, before."""
    img = tmp_path / f"image.{fmt}"
    qemu_img("create", "-q", "-f", fmt, img, 4 * MiB)
    qemu_io(img, "write -P 0x5a 1M 64k", fmt=fmt)
    raw = tmp_path / "image.raw"
    qemu_img("convert", "-f", fmt, "-O", "raw", img, raw)
    if fmt in bv.formats(readable=True):
        with bv.open(img) as opened:
            assert opened.format == fmt
            assert opened.read(0, opened.size) == raw.read_bytes()
        assert run_cli("verify", raw, img).returncode == 0
    else:
        with pytest.raises(bv.FormatError, match="cannot read"):
            bv.open(img)
        err = assert_cli_error(run_cli("verify", raw, img), img.name)
        assert "-f raw" in err


def test_vhdx_is_read_not_refused(tmp_path):
    # vhdx used to be refused like the other formats without a reader; it now has one,
    # and -f raw still compares its bytes as they are.
    img = tmp_path / "disk.vhdx"
    qemu_img("create", "-f", "vhdx", img, 4 * MiB)
    qemu_io(img, "write -P 0x5c 1M 64k", fmt="vhdx")
    with bv.open(img) as opened:
        assert opened.format == "vhdx"
        assert opened.read(1 * MiB, 4) == b"\x5c" * 4
    with bv.open(img, format="raw") as opened:
        assert opened.size == img.stat().st_size
    assert "vhdx" in bv.formats(readable=True)
