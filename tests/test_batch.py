"""``blkverify batch`` and ``bv.verify_many``: manifest parsing, results, the
worst exit status, the JSON lines. Images are made with qemu-img/qemu-io; the
expected contents of each qcow2 is its ``qemu-img convert -O raw``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import blkverify_rs as bv
import pytest
from blkverify_rs.report import human_size
from conftest import convert_to_raw, qemu_img, qemu_io, run_cli

MiB = 1 << 20


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """good.qcow2 = good.raw; bad.qcow2 differs from good.raw at sector 2048."""
    d = tmp_path_factory.mktemp("batch")
    good = d / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(good), str(4 * MiB))
    qemu_io(good, "write -P 0x5a 0 1M", "write -P 0x33 2M 64k")
    convert_to_raw(good, d / "good.raw")
    bad = d / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(bad), str(4 * MiB))
    qemu_io(bad, "write -P 0x5a 0 1M", "write -P 0x34 1M 512", "write -P 0x33 2M 64k")
    return {"dir": d, "good": good, "raw": d / "good.raw", "bad": bad}


def write_manifest(d: Path, name: str, text: str) -> Path:
    path = d / name
    path.write_text(text)
    return path


def batch(*args) -> tuple[int, str, str]:
    proc = run_cli("batch", "--no-progress", *args)
    return proc.returncode, proc.stdout, proc.stderr


def test_plain_lines_comments_and_blanks(pairs):
    m = write_manifest(
        pairs["dir"],
        "plain.txt",
        "# a comment\n\n  good.raw   good.qcow2  \n   # indented comment\ngood.raw\tgood.qcow2\n",
    )
    code, out, err = batch("--json", m)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["identical"] is True
        assert r["test"] == str(pairs["good"])  # resolved against the manifest's directory
        assert r["bytes_compared"] == 4 * MiB


def test_worst_status_and_json_shape(pairs):
    d = pairs["dir"]
    m = write_manifest(d, "mixed.txt", "good.raw good.qcow2\ngood.raw bad.qcow2\n")
    code, out, err = batch("--json", m)
    assert code == 1, err
    good, bad = (json.loads(line) for line in out.splitlines())
    single = json.loads(run_cli("verify", "--json", pairs["raw"], pairs["bad"]).stdout)
    assert set(bad) == set(single)  # the same shape as verify --json
    assert bad["identical"] is False and good["identical"] is True
    assert bad["mismatches"][0]["sector"] == 2048
    assert bad["mismatches"] == single["mismatches"]

    m = write_manifest(d, "err.txt", "good.raw good.qcow2\ngood.raw missing.qcow2\n")
    code, out, err = batch("--json", m)
    assert code == 2
    records = [json.loads(line) for line in out.splitlines()]
    assert records[0]["identical"] is True
    assert set(records[1]) == {"raw", "test", "error"}
    assert "missing.qcow2" in records[1]["error"]
    assert "missing.qcow2" in err


def test_json_lines_with_options(pairs):
    d = pairs["dir"]
    lines = [
        {"raw": "good.raw", "test": "bad.qcow2", "test_format": "qcow2", "all": True},
        {"raw": str(pairs["raw"]), "test": "good.qcow2", "raw_format": "raw", "strict": True},
    ]
    m = write_manifest(d, "json.txt", "\n".join(json.dumps(x) for x in lines) + "\n")
    code, out, err = batch("--json", m)
    assert code == 1, err
    bad, good = (json.loads(line) for line in out.splitlines())
    assert bad["mismatches"][0]["sector"] == 2048 and good["identical"] is True


def test_summary_table(pairs):
    d = pairs["dir"]
    m = write_manifest(d, "table.txt", "good.raw good.qcow2\ngood.raw bad.qcow2\n")
    code, out, _ = batch(m)
    assert code == 1
    header, _rule, first, second, totals = out.splitlines()
    for column in ("pair", "size", "result", "first corrupt sector", "MiB/s"):
        assert column in header
    assert "identical" in first and "4.0 MiB" in first
    assert "differ" in second and " 2048 " in second
    # The good pair is compared whole; the bad one up to its first mismatch.
    good = bv.verify(pairs["raw"], pairs["good"]).bytes_compared
    bad = bv.verify(pairs["raw"], pairs["bad"]).bytes_compared
    assert totals == (
        f"2 pairs: 1 identical, 1 differ, 0 failed; {good + bad} bytes compared "
        f"({human_size(good + bad)})"
    )


@pytest.mark.parametrize(
    ("text", "line", "fact"),
    [
        ("good.raw good.qcow2\nonly-one-field\n", 2, "expected 'RAW TEST'"),
        ("# c\na b c\n", 2, "got 3 field(s)"),
        ('{"raw": "good.raw"}\n', 1, "missing key 'test'"),
        ('{"raw": "a", "test": "b", "colour": 1}\n', 1, "unknown key 'colour'"),
        ('{"raw": "a", "test": "b", "all": "yes"}\n', 1, "'all' must be true or false"),
        ('{"raw": "a", "test": "b", "test_format": "qed"}\n', 1, "'test_format' is 'qed'"),
        ('\n\n{"raw": "a", "test": \n', 3, "invalid JSON"),
        ("# only comments\n\n", None, "no pairs to verify"),
    ],
)
def test_bad_manifest_lines(pairs, text, line, fact):
    m = write_manifest(pairs["dir"], "bad-manifest.txt", text)
    code, out, err = batch(m)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "Traceback" not in err
    where = f"{m}:{line}: " if line else f"{m}: "
    assert err.startswith(f"blkverify: error: {where}"), err
    assert fact in err


def test_missing_manifest(pairs):
    code, _, err = batch(pairs["dir"] / "nope.txt")
    assert code == 2 and "nope.txt" in err and err.count("\n") == 1


def test_verify_many_reports_and_errors_as_values(pairs):
    calls = []
    results = bv.verify_many(
        [
            (pairs["raw"], pairs["good"]),
            {"raw": str(pairs["raw"]), "test": str(pairs["bad"]), "all": True},
            (pairs["raw"], pairs["dir"] / "missing.qcow2"),
            {"raw": str(pairs["good"]), "test": str(pairs["bad"]), "all": True},
        ],
        threads=2,
        progress=lambda *a: calls.append(a),
    )
    good, bad, missing, qcow2_reference = results
    assert isinstance(good, bv.Report) and good.identical
    assert isinstance(bad, bv.Report) and not bad.identical
    assert bad.mismatches[0].sector == 2048
    assert bad.mismatches == bv.verify(pairs["raw"], pairs["bad"], all=True).mismatches
    assert isinstance(missing, FileNotFoundError)
    # A qcow2 reference finds what its raw copy finds, and names its own mapping.
    assert isinstance(qcow2_reference, bv.Report) and qcow2_reference.raw_format == "qcow2"
    assert [(m.offset, m.length, m.first_byte) for m in qcow2_reference.mismatches] == [
        (m.offset, m.length, m.first_byte) for m in bad.mismatches
    ]
    assert qcow2_reference.mismatches[0].ref_mapping["tables"][0]["table"] == "L1"
    for call in calls:
        assert len(call) == 4 and call[3] == 4


@pytest.mark.parametrize(
    ("pair", "fact"),
    [
        ({"raw": "a", "test": "b", "colour": 1}, "unknown key 'colour'"),
        ({"raw": "a"}, "missing key 'test'"),
        ({"raw": "a", "test": 7}, "'test' must be a non-empty string"),
        ({"raw": "a", "test": "b", "all": "yes"}, "'all' must be true or false"),
        ({"raw": "a", "test": "b", "test_format": "qed"}, "'test_format' is 'qed'"),
        (("a",), "a pair is (raw, test)"),
    ],
)
def test_verify_many_rejects_bad_pairs(pair, fact):
    """One owner of the pair rules: the same mistake is the same ValueError from
    verify_many, from check_pair, and (as MANIFEST:LINE: fact) from batch."""
    for check in (bv.check_pair, lambda p: bv.verify_many([p])):
        with pytest.raises(ValueError, match=re.escape(fact)):
            check(pair)
