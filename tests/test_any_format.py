"""Any format on either side: ``verify``, ``batch`` and ``bv.verify`` take a
reference in any format we read. A qcow2 or vmdk reference finds exactly the
mismatches its raw copy finds, and findings name both sides' mappings. The
mirrored device keeps a raw reference, as QEMU's blkverify does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, convert_to_raw, qemu_img, qemu_io, run_cli


@pytest.fixture(scope="module")
def disks(tmp_path_factory) -> dict[str, Path]:
    """One guest disk (`same.raw`) in every format, and `changed.qcow2`, a copy
    with a few bytes rewritten by qemu-io (and `changed.raw`, its raw copy)."""
    d = tmp_path_factory.mktemp("any-format")
    raw = d / "same.raw"
    qemu_img("create", "-q", "-f", "raw", raw, "4M")
    qemu_io(raw, "write -P 0x5a 0 1M", "write -P 0x33 2M 64k", "write -P 0x71 3M 300k", fmt="raw")
    out = {"raw": raw}
    for name, argv in {
        "qcow2": ["-O", "qcow2"],
        "qcow2-c": ["-c", "-O", "qcow2", "-o", "cluster_size=4k"],
        "vmdk": ["-O", "vmdk"],
        "vmdk-stream": ["-O", "vmdk", "-o", "subformat=streamOptimized"],
    }.items():
        path = d / f"same-{name}.img"
        qemu_img("convert", "-f", "raw", *argv, raw, path)
        out[name] = path
    changed = d / "changed.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=128k", raw, changed)
    qemu_io(
        changed, "write -P 0x99 1000 1", "write -P 0x5a 1M 3", "write -z 3149824 700",
        "write -P 0x01 4193792 512",
    )  # fmt: skip
    out["changed"] = changed
    convert_to_raw(changed, d / "changed.raw")
    out["changed-raw"] = d / "changed.raw"
    return out


def runs(report: bv.Report) -> list[tuple[int, int, int, int]]:
    return [(m.sector, m.offset, m.length, m.first_byte) for m in report.mismatches]


REFERENCES = ["qcow2", "qcow2-c", "vmdk", "vmdk-stream"]


@pytest.mark.parametrize("name", REFERENCES)
def test_a_reference_in_any_format_finds_what_raw_finds(disks, name):
    expected = bv.verify(disks["raw"], disks["changed"], all=True)
    assert len(expected.mismatches) == 4
    ours = bv.verify(disks[name], disks["changed"], all=True)
    assert ours.raw_format == ("qcow2" if name.startswith("qcow2") else "vmdk")
    assert runs(ours) == runs(expected)
    # and with the roles swapped: the changed disk as the reference
    swapped = bv.verify(disks["changed"], disks[name], all=True)
    assert runs(swapped) == runs(bv.verify(disks["changed-raw"], disks[name], all=True))
    assert runs(swapped) == runs(expected)


@pytest.mark.parametrize("name", REFERENCES)
def test_identical_in_any_formats(disks, name):
    for other in REFERENCES:
        assert bv.verify(disks[name], disks[other]).identical, other
    proc = run_cli("verify", disks[name], disks["vmdk-stream"])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_findings_name_both_sides_mappings(disks):
    proc = run_cli("verify", "--json", "--all", disks["vmdk"], disks["changed"])
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["raw_format"], report["test_format"]) == ("vmdk", "qcow2")
    first = report["mismatches"][0]
    assert [t["table"] for t in first["mapping"]["tables"]] == ["L1", "L2"]
    assert first["mapping"]["l2_index"] == 0
    assert [t["table"] for t in first["ref_mapping"]["tables"]] == ["GD", "GT"]
    assert first["ref_mapping"]["unit"] == "grain" and first["ref_mapping"]["kind"] == "data"
    assert first["ref_mapping"]["file"] == str(disks["vmdk"])
    human = run_cli("verify", disks["vmdk"], disks["changed"])
    lines = human.stdout.splitlines()
    assert lines[1].startswith("  qcow2 metadata: L1 index 0, L2 index 0: data cluster")
    assert lines[2].startswith("  reference vmdk metadata: GD index 0, GT index 0: grain at")
    # A raw reference has no mapping to name.
    raw = json.loads(run_cli("verify", "--json", disks["raw"], disks["changed"]).stdout)
    assert "ref_mapping" not in raw["mismatches"][0]


def test_formats_can_be_given(disks):
    proc = run_cli("verify", "-f", "vmdk", "-F", "qcow2", disks["vmdk"], disks["qcow2"])
    assert proc.returncode == 0, proc.stderr
    # The reference read as raw bytes differs from the guest disk it holds.
    proc = run_cli("verify", "-f", "raw", disks["vmdk"], disks["qcow2"])
    assert proc.returncode == 1
    proc = run_cli("verify", "-f", "qcow2", disks["vmdk"], disks["qcow2"])
    assert proc.returncode == 2 and "same-vmdk.img" in proc.stderr


def test_a_reference_that_cannot_be_read_is_an_error(disks, tmp_path):
    # Damage a compressed cluster of a qcow2 used as the reference: the
    # reference side's read error ends the run (exit 2), as it would for raw.
    ref = tmp_path / "ref.qcow2"
    shutil.copyfile(disks["qcow2-c"], ref)
    with bv.open(ref) as img:
        host = next(h for _, _, kind, h in img.map() if kind == "compressed")
    with open(ref, "r+b") as f:
        f.seek(host)
        f.write(bytes(64))
    proc = run_cli("verify", ref, disks["qcow2"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("blkverify: error: ") and "ref.qcow2" in proc.stderr
    with pytest.raises(bv.CorruptImageError):
        bv.verify(ref, disks["qcow2"])


def test_batch_takes_any_format(disks):
    d = disks["raw"].parent
    manifest = d / "manifest.txt"
    manifest.write_text(
        f"{disks['qcow2'].name} {disks['vmdk'].name}\n"
        + json.dumps({"raw": disks["vmdk-stream"].name, "test": "changed.qcow2", "all": True})
        + "\n"
        + json.dumps({"raw": "same.raw", "test": "changed.qcow2", "raw_format": "raw"})
        + "\n"
    )
    proc = run_cli("batch", "--no-progress", "--json", manifest)
    assert proc.returncode == 1, proc.stderr
    same, changed, plain = (json.loads(line) for line in proc.stdout.splitlines())
    assert same["identical"] and (same["raw_format"], same["test_format"]) == ("qcow2", "vmdk")
    assert len(changed["mismatches"]) == 4 and "ref_mapping" in changed["mismatches"][0]
    assert changed["raw_format"] == "vmdk"
    assert plain["mismatches"][0]["offset"] == changed["mismatches"][0]["offset"]


def test_the_mirrored_device_keeps_a_raw_reference(disks):
    # blkverify:REF:TEST reads REF as raw bytes, whatever they hold: a qcow2
    # reference's header differs from the guest data at sector 0.
    spec = f"blkverify:{disks['qcow2']}:{disks['vmdk']}"
    proc = run_cli("io", "-c", "read 0 64k", spec)
    assert proc.returncode == 1
    assert "contents mismatch in sector 0" in proc.stderr
    same = run_cli("io", "-c", "read 0 1M", f"blkverify:{disks['raw']}:{disks['vmdk']}")
    assert same.returncode == 0, same.stderr


def test_size_difference_with_formats(disks, tmp_path):
    bigger = tmp_path / "bigger.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", disks["raw"], bigger)
    qemu_img("resize", "-q", bigger, "5M")
    rep = bv.verify(disks["vmdk"], bigger)
    assert rep.identical and rep.raw_size == 4 * MiB and rep.test_size == 5 * MiB
    assert any("sizes differ" in w for w in rep.warnings)
