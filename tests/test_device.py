"""The mirrored blkverify device: the seed document's example to the letter, the Python
device API, a driver fault caught at the exact sector, one-sided failures, and the
guest-install scenario (16 GiB images, hundreds of mirrored writes and reads)."""

from __future__ import annotations

import errno
import json
import random
import shutil
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, flip_byte, qemu_img, qemu_io, run, run_cli

KiB = 1024


def make_seed_images(d: Path, test_fmt: str) -> tuple[Path, Path]:
    """raw.img has 0xcd throughout its first sector; test.img has it zeroed."""
    raw = d / "raw.img"
    test = d / ("test.img" if test_fmt == "raw" else "test.qcow2")
    qemu_img("create", "-f", "raw", raw, 1 * MiB)
    qemu_io(raw, "write -P 0xcd 0 512", fmt="raw")
    qemu_img("create", "-f", test_fmt, test, 1 * MiB)
    return raw, test


# ----------------------------------------------------------------------------------------
# the seed's example
# ----------------------------------------------------------------------------------------


def test_seed_hexdump_is_qemu_ios(tmp_path):
    raw, _ = make_seed_images(tmp_path, "raw")
    theirs = run(["qemu-io", "-f", "raw", "-c", "read -v 0 512", raw])
    ours = run_cli("io", "-f", "raw", "-c", "read -v 0 512", raw)
    assert ours.returncode == 0, ours.stderr
    ours_lines, theirs_lines = ours.stdout.splitlines(), theirs.stdout.splitlines()
    # 32 hexdump lines and the "read" line are identical; the timing line differs only
    # in its figures
    assert ours_lines[:33] == theirs_lines[:33]
    assert ours_lines[0] == "00000000:  " + "cd " * 16 + " " + "." * 16
    assert ours_lines[32] == "read 512/512 bytes at offset 0"
    assert ours_lines[33].startswith("512 bytes, 1 ops; ")


@pytest.mark.parametrize("test_fmt", ["raw", "qcow2"])
def test_seed_example_to_the_letter(tmp_path, test_fmt):
    raw, test = make_seed_images(tmp_path, test_fmt)
    proc = run_cli("io", "-c", "read 0 512", f"blkverify:{raw}:{test}")
    assert (
        proc.stderr == "blkverify: read sector_num=0 nb_sectors=1 contents mismatch in sector 0\n"
    )
    assert proc.stdout == ""
    assert proc.returncode == 1


@pytest.mark.parametrize("test_fmt", ["raw", "qcow2"])
def test_seed_example_2048_byte_request(tmp_path, test_fmt):
    raw, test = make_seed_images(tmp_path, test_fmt)
    proc = run_cli("io", "-c", "read 0 2048", f"blkverify:{raw}:{test}")
    assert (
        proc.stderr == "blkverify: read sector_num=0 nb_sectors=4 contents mismatch in sector 0\n"
    )
    assert proc.returncode == 1


def test_mismatch_in_a_later_sector_of_the_request(tmp_path):
    raw = tmp_path / "raw.img"
    test = tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, 1 * MiB)
    qemu_img("create", "-f", "qcow2", test, 1 * MiB)
    qemu_io(raw, "write -P 0xcd 0 8k", fmt="raw")
    # the test image agrees except in sector 13 (bytes 6656..7167), of which it has 0xce
    qemu_io(test, "write -P 0xcd 0 8k", "write -P 0xce 6656 512")
    spec = f"blkverify:{raw}:{test}"
    cases = [
        ("read 0 8k", "sector_num=0 nb_sectors=16 contents mismatch in sector 13"),
        ("read 2k 6k", "sector_num=4 nb_sectors=12 contents mismatch in sector 13"),
        ("read 6700 100", "sector_num=13 nb_sectors=1 contents mismatch in sector 13"),
        ("readv 4k 1k 1k 1k", "sector_num=8 nb_sectors=6 contents mismatch in sector 13"),
    ]
    for cmd, message in cases:
        proc = run_cli("io", "-c", "read 0 6656", "-c", cmd, "-c", "read 0 512", spec)
        assert proc.stderr == f"blkverify: read {message}\n", cmd
        assert proc.returncode == 1
        # the good read before the mismatch printed its report; nothing ran after it
        assert proc.stdout.startswith("read 6656/6656 bytes at offset 0\n")
        assert proc.stdout.count("bytes at offset") == 1
    with bv.open(spec) as dev:
        assert dev.read(0, 6656) == b"\xcd" * 6656
        with pytest.raises(bv.MismatchError) as info:
            dev.read(2048, 6144)
        e = info.value
        assert isinstance(e, bv.Error)
        assert (e.sector, e.first_byte, e.offset, e.length) == (13, 6656, 2048, 6144)
        assert e.op == "read"
        assert str(e) == "blkverify: read sector_num=4 nb_sectors=12 contents mismatch in sector 13"


# ----------------------------------------------------------------------------------------
# the Python device API
# ----------------------------------------------------------------------------------------


def raw_pair(d: Path, size: int = 4 * MiB) -> tuple[Path, Path]:
    raw = d / "raw.img"
    test = d / "test.img"
    qemu_img("create", "-f", "raw", raw, size)
    qemu_io(raw, "write -P 0x11 0 1M", f"write -P 0x22 {3 * MiB} 64k", fmt="raw")
    shutil.copyfile(raw, test)
    return raw, test


def test_device_api_mirrors_every_operation(tmp_path):
    raw, test = raw_pair(tmp_path)
    oracle = tmp_path / "oracle.img"
    shutil.copyfile(raw, oracle)
    with bv.open(f"blkverify:{raw}:{test}", read_only=False) as dev:
        assert isinstance(dev, bv.Device)
        assert (dev.size, dev.format, dev.test_format) == (4 * MiB, "blkverify", "raw")
        assert (dev.raw, dev.test, dev.closed, dev.read_only) == (str(raw), str(test), False, False)
        assert dev.read(0, 4096) == b"\x11" * 4096
        assert dev.write(100, b"hello" * 100) == 500
        assert dev.write(2 * MiB, memoryview(bytearray(b"\x33" * 70000))) == 70000
        dev.write_zeroes(4096, 8192)
        dev.write_zeroes(64 * KiB, 128 * KiB, unmap=True)
        dev.discard(3 * MiB, 32 * KiB)
        dev.flush()
        buf = bytearray(600)
        assert dev.readinto(0, buf) == 600
        assert bytes(buf[100:600]) == b"hello" * 100
        assert dev.read(4096, 8192) == bytes(8192)
        assert dev.read(3 * MiB, 64 * KiB) == bytes(32 * KiB) + b"\x22" * (32 * KiB)
        big = dev.read(0, 4 * MiB)  # the parallel path
        assert len(big) == 4 * MiB
    assert dev.closed
    with pytest.raises(ValueError, match="closed device"):
        dev.read(0, 1)
    with pytest.raises(ValueError, match="closed device"):
        dev.write(0, b"x")
    with pytest.raises(ValueError, match="closed device"):
        dev.flush()
    # qemu-io doing the same on a third copy gives the same bytes on both sides
    with open(oracle, "r+b") as f:
        f.seek(100)
        f.write(b"hello" * 100)
    qemu_io(
        oracle,
        f"write -P 0x33 {2 * MiB} 70000",
        "write -z 4k 8k",
        "write -z -u 64k 128k",
        "discard 3M 32k",
        fmt="raw",
    )
    assert raw.read_bytes() == oracle.read_bytes()
    assert test.read_bytes() == oracle.read_bytes()


def test_device_read_only_by_default(tmp_path):
    raw, test = raw_pair(tmp_path)
    before = test.read_bytes()
    with bv.open(raw=raw, test=test) as dev:
        assert dev.read_only
        with pytest.raises(OSError) as info:
            dev.write(0, b"x")
        assert info.value.errno == errno.EROFS
        assert not isinstance(info.value, bv.MismatchError)
    assert test.read_bytes() == before


def test_open_with_paths_containing_colons(tmp_path):
    d = tmp_path / "a:b"
    d.mkdir()
    raw, test = raw_pair(d)
    with bv.open(raw=raw, test=test) as dev:
        assert dev.read(0, 512) == b"\x11" * 512
        assert dev.raw == str(raw)
    # the spec form splits at the first colon: the raw path "…/a" does not exist
    with pytest.raises(FileNotFoundError):
        bv.open(f"blkverify:{raw}:{test}")


def test_open_refuses_bad_specs_and_arguments(tmp_path):
    raw, test = raw_pair(tmp_path)
    with pytest.raises(ValueError, match="blkverify:RAW:TEST"):
        bv.open(f"blkverify:{raw}")
    with pytest.raises(ValueError, match="raw= and test="):
        bv.open(raw=raw)
    with pytest.raises(ValueError, match="raw= and test="):
        bv.open(raw, raw=raw, test=test)
    assert isinstance(bv.open(raw), bv.Image)  # a plain path is a plain image
    proc = run_cli("io", "-c", "length", f"blkverify:{raw}")
    assert proc.returncode == 1
    assert proc.stderr.startswith("blkverify: error: ")
    assert "Traceback" not in proc.stderr


def test_io_writes_reach_both_sides_of_a_qcow2_device(tmp_path):
    raw, test = make_seed_images(tmp_path, "qcow2")
    proc = run_cli(
        "io", "-c", "write -P 0x77 0 512", "-c", "read -P 0x77 0 512", f"blkverify:{raw}:{test}"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("wrote 512/512 bytes at offset 0\n")
    assert "read 512/512 bytes at offset 0\n" in proc.stdout
    assert proc.stderr == ""
    compare = run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, test], check=False)
    assert compare.returncode == 0, compare.stdout
    check = run(["qemu-img", "check", test], check=False)
    assert check.returncode == 0, check.stdout


def test_device_with_qcow2_test_side_reads_and_compares(zoo):
    img = zoo["qcow2_zero_alloc"]
    with bv.open(raw=img.expected, test=img.path) as dev:
        assert dev.test_format == "qcow2"
        whole = dev.read(0, img.size)
        assert whole == img.expected.read_bytes()
        assert dev.info()["cluster_size"] == "4096"


# ----------------------------------------------------------------------------------------
# faults
# ----------------------------------------------------------------------------------------


def test_corruption_under_a_running_device_is_caught_at_the_exact_sector(tmp_path):
    """A qcow2 test image whose data cluster is damaged on disk while the device is open:
    the next read names the sector the damaged byte belongs to."""
    raw = tmp_path / "raw.img"
    test = tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, 4 * MiB)
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", test, 4 * MiB)
    for img, fmt in ((raw, "raw"), (test, "qcow2")):
        qemu_io(img, "write -P 0x5a 1M 64k", "write -P 0x6b 2M 8k", fmt=fmt)
    guest = 1 * MiB + 20 * KiB + 777  # in sector 2089
    mapping = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", test).stdout)
    extent = next(e for e in mapping if e["start"] <= guest < e["start"] + e["length"])
    host = extent["offset"] + (guest - extent["start"])
    with bv.open(f"blkverify:{raw}:{test}") as dev:
        assert dev.read(1 * MiB, 64 * KiB) == b"\x5a" * (64 * KiB)
        flip_byte(test, host, 0x01)
        with pytest.raises(bv.MismatchError) as info:
            dev.read(1 * MiB, 64 * KiB)
        assert info.value.sector == guest // 512 == 2089
        assert info.value.first_byte == guest
        assert str(info.value) == (
            "blkverify: read sector_num=2048 nb_sectors=128 contents mismatch in sector 2089"
        )
        # the rest of the disk still verifies
        assert dev.read(2 * MiB, 8 * KiB) == b"\x6b" * (8 * KiB)


def test_corruption_of_a_raw_test_side_via_cli(tmp_path):
    raw, test = raw_pair(tmp_path)
    flip_byte(test, 3 * MiB + 5 * 512 + 3, 0x80)
    proc = run_cli("io", "-f", "raw", "-c", "read 3M 64k", f"blkverify:{raw}:{test}")
    assert proc.stderr == (
        "blkverify: read sector_num=6144 nb_sectors=128 contents mismatch in sector 6149\n"
    )
    assert proc.returncode == 1


def shorter_reference(d: Path) -> tuple[Path, Path]:
    """A reference one 4 KiB page shorter than the test image: a real setup mistake
    (the copy was truncated) that makes every request near the end fail on the raw
    side only, as a failing reference disk would."""
    raw, test = raw_pair(d)
    with open(raw, "r+b") as f:
        f.truncate(4 * MiB - 4096)
    return raw, test


def test_failure_on_one_side_only_is_a_return_value_mismatch(tmp_path):
    raw, test = shorter_reference(tmp_path)
    einval = -errno.EINVAL
    with bv.open(raw=raw, test=test, read_only=False) as dev:
        assert dev.size == 4 * MiB  # the test side's size, as in QEMU
        dev.write(4 * MiB - 8192, b"\x01" * 4096)  # inside both: fine
        with pytest.raises(bv.MismatchError) as info:
            dev.write(4 * MiB - 4096, b"\x02" * 4096)
        e = info.value
        assert (
            str(e)
            == f"blkverify: write sector_num=8184 nb_sectors=8 return value mismatch 0 != {einval}"
        )
        assert (e.test_ret, e.raw_ret, e.sector, e.first_byte) == (0, einval, None, None)
        assert (e.op, e.offset, e.length) == ("write", 4 * MiB - 4096, 4096)
        with pytest.raises(
            bv.MismatchError,
            match=r"^blkverify: read sector_num=8190 nb_sectors=2 return value mismatch 0 != -22$",
        ):
            dev.read(4 * MiB - 1024, 1024)
        with pytest.raises(
            bv.MismatchError,
            match="write_zeroes sector_num=8191 nb_sectors=1 return value mismatch",
        ):
            dev.write_zeroes(4 * MiB - 512, 512)
        with pytest.raises(
            bv.MismatchError, match="discard sector_num=8190 nb_sectors=2 return value mismatch"
        ):
            dev.discard(4 * MiB - 1024, 1024)
    proc = run_cli(
        "io", "-f", "raw", "-c", "write -P 1 4092k 4k", "-c", "read 0 1", f"blkverify:{raw}:{test}"
    )
    assert proc.stderr == (
        f"blkverify: write sector_num=8184 nb_sectors=8 return value mismatch 0 != {einval}\n"
    )
    assert proc.stdout == ""
    assert proc.returncode == 1


# ----------------------------------------------------------------------------------------
# the guest-install scenario from the seed
# ----------------------------------------------------------------------------------------

INSTALL_TEST_FORMATS = ["raw", "qcow2"]


@pytest.mark.parametrize("test_fmt", INSTALL_TEST_FORMATS)
def test_guest_install_scenario(tmp_path, test_fmt):
    """qemu-img create raw.img 16G; qemu-img create -f FMT test 16G; hundreds of mirrored
    writes (sequential installer-like streams, scattered metadata updates, zeroing,
    discard) and reads through blkverify:raw.img:test; then qemu-img says they are the
    same disk."""
    size = 16 * 1024 * MiB
    raw = tmp_path / "raw.img"
    test = tmp_path / f"test.{test_fmt}"
    qemu_img("create", "-f", "raw", raw, size)
    qemu_img("create", "-f", test_fmt, test, size)
    rng = random.Random(0x5EED)
    written: dict[int, bytes] = {}
    with bv.open(raw=raw, test=test, format=test_fmt, read_only=False) as dev:
        assert dev.size == size
        # an installer writes files in long sequential runs...
        for _stream in range(4):
            at = rng.randrange(0, size // MiB - 64) * MiB
            for _ in range(40):
                data = rng.randbytes(rng.choice([4096, 65536, 131072]))
                dev.write(at, data)
                written[at] = data
                at += len(data)
        # ...and updates metadata all over the disk, at odd offsets and sizes
        for _ in range(250):
            at = rng.randrange(0, size - 70000)
            data = rng.randbytes(rng.randrange(1, 70000))
            dev.write(at, data)
            written[at] = data
            if rng.random() < 0.5:
                probe = rng.randrange(0, size - 8192)
                dev.read(probe, 8192)  # compared on every read
        for _ in range(20):
            at = rng.randrange(0, size // 4096 - 64) * 4096
            dev.write_zeroes(at, rng.choice([4096, 65536]), unmap=rng.random() < 0.5)
            dev.discard(rng.randrange(0, size // 4096 - 64) * 4096, 65536)
        dev.flush()
        # read everything back through the device (each read compares both sides)
        reads = 0
        for at, data in written.items():
            dev.read(at, len(data))
            reads += 1
        assert reads >= 300
        dev.read(size - MiB, MiB)
    compare = run(["qemu-img", "compare", "-f", "raw", "-F", test_fmt, raw, test], check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    assert "Images are identical." in compare.stdout
    if test_fmt == "qcow2":
        check = run(["qemu-img", "check", "-f", "qcow2", test], check=False)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "No errors were found on the image." in check.stdout
