"""Backing files of untrusted images: where they may live, and --no-backing."""

from __future__ import annotations

from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, convert_to_raw, qemu_img, qemu_io, run_cli


@pytest.fixture
def outside_chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    """base.qcow2 in one directory, an overlay in a sibling naming it as ../base."""
    base_dir = tmp_path / "base"
    top_dir = tmp_path / "top"
    base_dir.mkdir()
    top_dir.mkdir()
    base = base_dir / "base.qcow2"
    qemu_img("create", "-f", "qcow2", base, "2M")
    qemu_io(base, "write -P 0x42 0 1M")
    top = top_dir / "top.qcow2"
    qemu_img("create", "-f", "qcow2", "-b", "../base/base.qcow2", "-F", "qcow2", top, "2M")
    qemu_io(top, "write -P 0x17 64k 4k")
    expected = tmp_path / "expected.raw"
    convert_to_raw(top, expected)
    return base, top, expected


def test_backing_outside_the_image_directory_is_refused(outside_chain) -> None:
    _, top, expected = outside_chain
    with pytest.raises(bv.FormatError) as info:
        bv.open(top)
    message = str(info.value)
    assert "outside the image's directory" in message
    assert "../base/base.qcow2" in message
    assert str(top) in message
    result = run_cli("verify", expected, top)
    assert result.returncode == 2
    assert result.stderr.startswith("blkverify: error:")
    assert "--allow-backing-anywhere" in result.stderr


def test_allow_backing_anywhere_follows_it(outside_chain) -> None:
    _, top, expected = outside_chain
    with bv.open(top, allow_backing_anywhere=True) as img:
        assert img.read(0, img.size) == expected.read_bytes()
    result = run_cli("verify", "--allow-backing-anywhere", expected, top)
    assert result.returncode == 0, result.stderr
    assert "Images are identical." in result.stdout


def test_no_backing_reads_zeros_and_says_so(outside_chain, tmp_path: Path) -> None:
    _, top, expected = outside_chain
    with bv.open(top, backing=False) as img:
        data = img.read(0, 2 * MiB)
    assert data[: 64 * 1024] == bytes(64 * 1024)  # base data not read
    assert data[64 * 1024 : 68 * 1024] == b"\x17" * 4096
    # Against the full reference, the unread backing data is a mismatch...
    result = run_cli("verify", "--no-backing", expected, top)
    assert result.returncode == 1
    assert "contents mismatch in sector 0" in result.stdout
    assert "--no-backing" in result.stderr
    # ... and against a reference holding only the overlay's own data, identical.
    overlay_only = tmp_path / "overlay-only.raw"
    overlay_only.write_bytes(data)
    result = run_cli("verify", "--no-backing", overlay_only, top)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "backing file '../base/base.qcow2' was not opened" in result.stderr


def test_chain_deeper_than_the_limit_is_refused(tmp_path: Path) -> None:
    previous = tmp_path / "l0.qcow2"
    qemu_img("create", "-f", "qcow2", previous, "1M")
    for level in range(1, 5):
        image = tmp_path / f"l{level}.qcow2"
        qemu_img("create", "-f", "qcow2", "-b", previous.name, "-F", "qcow2", image, "1M")
        previous = image
    with bv.open(previous, max_backing_depth=4) as img:
        assert img.size == MiB
    with pytest.raises(bv.FormatError, match="deeper than 3"):
        bv.open(previous, max_backing_depth=3)
    raw = tmp_path / "zero.raw"
    raw.write_bytes(bytes(MiB))
    result = run_cli("verify", "--max-backing-depth", "3", raw, previous)
    assert result.returncode == 2
    assert "deeper than 3" in result.stderr


def test_external_data_file_outside_the_image_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "img").mkdir()
    data = tmp_path / "data" / "disk.data"
    image = tmp_path / "img" / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", image, "1M")
    qemu_io(image, "write -P 0x61 0 64k")
    with pytest.raises(bv.FormatError, match="external data file"):
        bv.open(image)
    with bv.open(image, allow_backing_anywhere=True) as img:
        assert img.read(0, 4) == b"aaaa"
