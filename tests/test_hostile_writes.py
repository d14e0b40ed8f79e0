"""Writes and untrusted images: nothing changes unless a write was asked for, images QEMU
marked corrupt are never written, and a full disk leaves a consistent image."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import (
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
    MiB,
    convert_to_raw,
    patch_header,
    qemu_img,
    read_header,
    run,
    run_cli,
)

UNKNOWN_AUTOCLEAR = 1 << 40  # a writable open clears autoclear bits it does not know


@pytest.fixture
def dirty(tmp_path: Path) -> tuple[Path, Path]:
    """A dirty image (lazy refcounts, QEMU killed mid-run) with an unknown autoclear bit."""
    img = tmp_path / "dirty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4k", img, "4M")
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", "-c", "write -P 0x6b 1M 8k",
         "-c", "abort", img], check=False)  # fmt: skip
    assert read_header(img)["incompatible_features"] & INCOMPAT_DIRTY
    patch_header(img, "autoclear_features", UNKNOWN_AUTOCLEAR)
    expected = tmp_path / "dirty.raw"
    convert_to_raw(img, expected)
    return img, expected


def test_read_only_opens_of_a_dirty_image_change_nothing(dirty) -> None:
    img, expected = dirty
    before = img.read_bytes()
    mtime = img.stat().st_mtime_ns
    with bv.open(img) as opened:
        assert opened.read_only
        assert opened.read(0, opened.size) == expected.read_bytes()
        with pytest.raises(OSError) as info:
            opened.write(0, b"x")
        assert info.value.errno == errno.EROFS
    with bv.open(raw=expected, test=img) as device:
        device.read(0, 4 * MiB)
    assert bv.verify(expected, img).identical
    assert run_cli("verify", expected, img).returncode == 0
    io = run_cli("io", "-r", "-c", "read -P 0x5a 0 64k", img)
    assert io.returncode == 0, io.stderr
    assert img.read_bytes() == before
    assert img.stat().st_mtime_ns == mtime
    # The detector works: a writable open repairs the refcounts and clears both bits.
    with bv.open(img, read_only=False):
        pass
    hdr = read_header(img)
    assert not hdr["incompatible_features"] & INCOMPAT_DIRTY
    assert hdr["autoclear_features"] == 0
    assert bv.verify(expected, img).identical


def test_writable_open_of_an_image_marked_corrupt_is_refused(dirty) -> None:
    img, expected = dirty
    hdr = read_header(img)
    patch_header(img, "incompatible_features", hdr["incompatible_features"] | INCOMPAT_CORRUPT)
    before = img.read_bytes()
    with pytest.raises(bv.FormatError) as info:
        bv.open(img, read_only=False)
    message = str(info.value)
    assert "marked corrupt" in message and "bit 1" in message and str(img) in message
    with pytest.raises(bv.FormatError, match="marked corrupt"):
        bv.open(raw=expected, test=img, read_only=False)
    io = run_cli("io", "-c", "write 0 512", img)
    assert io.returncode == 1
    assert "marked corrupt" in io.stdout + io.stderr
    assert "Traceback" not in io.stderr
    assert img.read_bytes() == before  # not even the dirty bit was repaired
    # read-only, it still reads as QEMU reads it
    with bv.open(img) as opened:
        assert opened.read(0, opened.size) == expected.read_bytes()


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 2 MiB tmpfs: writes past its space fail with ENOSPC."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_enospc_during_a_qcow2_write_leaves_a_consistent_image(small_fs: Path, tmp_path) -> None:
    img = small_fs / "full.qcow2"
    bv.create(img, 64 * MiB, cluster_size=65536)
    written: list[tuple[int, bytes]] = []
    chunk = 192 * 1024
    with bv.open(img, read_only=False) as opened:
        with pytest.raises(OSError) as info:
            for i in range(64):
                data = os.urandom(chunk)
                offset = i * 1 * MiB + 4096 * i  # scattered, unaligned to clusters
                opened.write(offset, data)
                written.append((offset, data))
        assert info.value.errno == errno.ENOSPC
        assert info.value.filename == str(img)
        assert 2 < len(written) < 12  # the 2 MiB filled part way through
        # What was written before the disk filled reads back, in this open...
        for offset, data in written:
            assert opened.read(offset, len(data)) == data
    check = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", img], capture_output=True, text=True
    )
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaked clusters only
    # ...and after it, as QEMU reads it.
    out = tmp_path / "after.raw"
    convert_to_raw(img, out)
    with open(out, "rb") as f:
        for offset, data in written:
            f.seek(offset)
            assert f.read(len(data)) == data
    with bv.open(img) as opened:
        for offset, data in written:
            assert opened.read(offset, len(data)) == data
