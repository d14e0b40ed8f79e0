"""Hard faults while verifying: files that shrink underneath us, and references
shorter than the test image. Each ends in a clear result or error, never a
crash, a hang or a silent 'identical'."""

from __future__ import annotations

import os
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, qemu_img, run_cli


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    raw = tmp_path / "ref.raw"
    raw.write_bytes(os.urandom(64 * MiB))
    test = tmp_path / "test.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, test)
    return raw, test


def truncate_on_first_progress(path: Path, size: int):
    state = {"done": False}

    def progress(done: int, total: int) -> None:
        if not state["done"]:
            os.truncate(path, size)
            state["done"] = True

    return progress


def test_test_image_truncated_while_verifying_is_a_finding(pair) -> None:
    raw, test = pair
    # The first progress call comes before any read, so the file shrinks mid-run.
    rep = bv.verify(raw, test, all=True, progress=truncate_on_first_progress(test, MiB))
    assert not rep.identical
    lost = [m for m in rep.mismatches if m.error]
    assert lost, rep.mismatches
    assert "past the end of the file" in lost[0].error
    # Everything past the first MiB is reported, as errors or as differences.
    assert rep.mismatches[-1].offset + rep.mismatches[-1].length == 64 * MiB
    after = bv.verify(raw, test, all=False)
    assert not after.identical
    assert after.mismatches[0].error is not None
    assert "past the end of the file" in after.mismatches[0].error
    cli = run_cli("verify", raw, test)
    assert cli.returncode == 1
    assert "read error in sector" in cli.stdout
    assert "Traceback" not in cli.stderr


def test_reference_truncated_is_an_error_naming_it(pair) -> None:
    raw, test = pair
    with pytest.raises(OSError) as info:
        bv.verify(raw, test, progress=truncate_on_first_progress(raw, MiB))
    assert info.value.filename == str(raw)
    assert "shrank" in str(info.value) or "end of file" in str(info.value)


def test_reference_truncated_before_the_run_is_a_size_difference(pair, tmp_path: Path) -> None:
    raw, test = pair
    short = tmp_path / "short.raw"
    short.write_bytes(raw.read_bytes()[: 32 * MiB])
    rep = bv.verify(short, test)
    assert not rep.identical
    assert rep.mismatches[0].first_byte == 32 * MiB
    assert any("sizes differ" in w for w in rep.warnings)
    cli = run_cli("verify", short, test)
    assert cli.returncode == 1
    assert "blkverify: warning: image sizes differ" in cli.stderr
