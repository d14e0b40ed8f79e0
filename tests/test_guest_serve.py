"""A real Linux guest on ``blkverify serve`` (issue 23): the seed's scenario end to end.

The guest of tests/guest.py (ext4 made, a tree copied, synced, read back with ``cmp``
after its page cache is dropped, files deleted, ``fstrim``, ``e2fsck -fn``) boots under
TCG with its NVMe disk on serve, three times:

1. the test side is our qcow2: the guest prints ``ok``, serve exits 0 with no finding,
   ``blkverify verify RAW TEST`` says identical and ``qemu-img check`` is clean;
2. the test side is the planted-bug server (a write lost), ``--on-mismatch stop`` with a
   trace: serve names the first corrupt sector, where the bug server's log says the bug
   fired, and exits 1; the guest sees an I/O error; the trace replays without the guest
   to the same finding at the same request; shrink cuts it to a handful of requests in
   under a minute; ``blkverify io -c 'read -v ...'`` on the sector shows the bad bytes;
3. the same bug, ``--on-mismatch reference``: the guest runs to its end on correct data
   (its ``e2fsck`` passes) and serve's report lists every corrupt read.

One guest boot per run. Every process (serve, the bug servers, QEMU) is stopped by its
PID at teardown; replay and shrink start a fresh bug server per trial through
``--test-command`` (test_trace.py's pattern).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import blkverify_rs as bv
from conftest import MiB, qemu_img, run, run_cli
from guest import GuestBoot, GuestResult, run_guest
from test_guest import DISK_SIZE, LOST_WRITE, STEPS, assert_tree_on_disk, new_raw, report
from test_serve import ServeProc
from test_trace import bug_command

BUG = f"{LOST_WRITE[0]}@{LOST_WRITE[1]}"
SERVE_END_S = 60  # serve ends by itself once the guest is gone (or at its finding)


def findings_of(report_path: Path) -> list[dict]:
    if not report_path.exists():
        return []
    return [json.loads(line) for line in report_path.read_text().splitlines() if line.strip()]


def summary_line(stderr: str) -> str:
    m = re.search(r"^blkverify: serve: \d+ requests .*$", stderr, re.M)
    assert m, stderr
    return m.group(0)


def requests_and_bytes(stderr: str) -> tuple[int, str]:
    """serve's summary: the request count, and the test side's byte counts."""
    requests = int(re.search(r"^blkverify: serve: (\d+) requests", stderr, re.M).group(1))
    test_line = re.search(r"^blkverify: serve: test .*$", stderr, re.M).group(0)
    return requests, test_line


def guest_on_serve(
    boot: GuestBoot, serve, d: Path, raw: Path, test, *options
) -> tuple[ServeProc, GuestResult, list[dict]]:
    """Boot the guest with its disk on ``serve OPTIONS --report R RAW TEST``; wait for serve
    to end by itself (the guest's QEMU was its only client, or a finding stopped it)."""
    report_path = d / "report.jsonl"
    server = serve(*options, "--report", report_path, raw, test)
    result = run_guest(server.uri, boot)
    server.wait(timeout=SERVE_END_S)
    return server, result, findings_of(report_path)


@dataclass
class BugRun:
    """A guest run on serve over the bug server (LOST_WRITE), traced."""

    pristine: Path  # the disk as it was before the run, for replays
    raw: Path
    disk: Path
    trace: Path
    bugs: object  # the stopped BugServer: fired() and stats() still answer
    server: ServeProc
    result: GuestResult
    findings: list[dict]
    stderr: str


def guest_on_bug_server(boot: GuestBoot, serve, bug_server, d: Path, policy: str) -> BugRun:
    """Boot the guest on ``serve --on-mismatch POLICY --trace`` in front of the bug
    server, over fresh blank copies; print what serve and the guest said."""
    pristine = new_raw(d / "blank.raw")
    raw, disk = d / "raw.img", d / "disk.raw"
    shutil.copyfile(pristine, raw)
    shutil.copyfile(pristine, disk)
    trace = d / "guest.bvt"
    bugs = bug_server(disk, bugs=[LOST_WRITE])
    server, result, findings = guest_on_serve(
        boot, serve, d, raw, bugs.uri, "--on-mismatch", policy, "--trace", trace
    )
    bugs.stop()
    stderr = server.stderr()
    report(f"serve --on-mismatch {policy} over the bug server, {BUG}", result, bugs.stats())
    print(stderr)
    return BugRun(pristine, raw, disk, trace, bugs, server, result, findings, stderr)


# --------------------------------------------------------------------------------------
# 1. the correct test side: our qcow2
# --------------------------------------------------------------------------------------


def test_guest_on_serve_over_our_qcow2_is_ok_and_finds_nothing(
    guest_boot: GuestBoot, tmp_path: Path, serve
) -> None:
    raw = new_raw(tmp_path / "raw.img")
    test = tmp_path / "test.qcow2"
    qemu_img("create", "-f", "qcow2", test, DISK_SIZE)
    server, result, findings = guest_on_serve(guest_boot, serve, tmp_path, raw, test)
    report("serve over qcow2", result)
    print(server.stderr())
    assert result.result_line == "ok", result.describe()
    assert list(result.steps) == STEPS
    assert server.returncode == 0, server.stderr()
    assert findings == []
    stderr = server.stderr()
    assert "; 0 findings;" in summary_line(stderr)
    assert "contents mismatch" not in stderr and "return value mismatch" not in stderr
    requests, test_line = requests_and_bytes(stderr)
    assert requests > 100, stderr
    # the guest's discards reached the test side: mke2fs's of the whole disk, then fstrim's
    discarded = re.search(r"discarded ([0-9.]+) MiB$", test_line)
    assert discarded and float(discarded.group(1)) > DISK_SIZE / MiB, test_line
    proc = run_cli("verify", raw, test)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "identical" in proc.stdout.lower(), proc.stdout
    check = run(["qemu-img", "check", test], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found on the image." in check.stdout
    # what the guest wrote is there: on the reference, and on the qcow2 as QEMU reads it
    (tmp_path / "raw").mkdir()
    assert_tree_on_disk(raw, guest_boot, tmp_path / "raw")
    (tmp_path / "test").mkdir()
    converted = tmp_path / "test.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", test, converted)
    assert_tree_on_disk(converted, guest_boot, tmp_path / "test")


# --------------------------------------------------------------------------------------
# 2. a planted bug, --on-mismatch stop, traced: caught, replayed, shrunk, explored
# --------------------------------------------------------------------------------------


def hex_bytes(io_output: str) -> bytes:
    """The bytes of qemu-io's ``read -v`` dump: ``00000000:  de ad ...  ascii``."""
    out = bytearray()
    for line in io_output.splitlines():
        m = re.match(r"^[0-9a-f]{8}:\s+((?:[0-9a-f]{2} ){1,16})", line)
        if m:
            out.extend(bytes.fromhex(m.group(1)))
    return bytes(out)


def test_guest_on_serve_stops_at_the_lost_writes_sector_and_the_trace_replays_and_shrinks(
    guest_boot: GuestBoot, tmp_path: Path, serve, bug_server
) -> None:
    caught = guest_on_bug_server(guest_boot, serve, bug_server, tmp_path, "stop")
    pristine, raw, disk, trace, bugs = (
        caught.pristine,
        caught.raw,
        caught.disk,
        caught.trace,
        caught.bugs,
    )
    server, result, findings, stderr = caught.server, caught.result, caught.findings, caught.stderr
    # serve: the first corrupt sector, where the bug fired; exit 1
    assert server.returncode == 1, stderr
    [fired] = bugs.fired()
    assert (fired["kind"], fired["phase"]) == ("lost-write", "lost"), fired
    [live] = findings
    print(json.dumps({k: live[k] for k in ("request", "op", "sector", "message")}))
    assert live["kind"] == "contents" and live["op"].startswith("read "), live
    assert live["sector"] == fired["first_sector"], (live, fired)
    assert live["first_byte"] == fired["first_byte"], (live, fired)
    assert re.search(
        rf"^blkverify: read sector_num=\d+ nb_sectors=\d+ contents mismatch in sector "
        rf"{fired['first_sector']}$",
        stderr,
        re.M,
    ), stderr
    assert "; 1 finding;" in summary_line(stderr)
    # the guest: an I/O error, and a FAIL line (not a hang)
    assert not result.timed_out, result.describe()
    assert result.result_line is not None and result.result_line.startswith("FAIL "), (
        result.describe()
    )
    assert "I/O error" in result.console_text, result.describe()
    print(next(line for line in result.console_text.splitlines() if "I/O error" in line))

    # the trace, without the guest: the same finding at the same request
    command = bug_command(pristine, BUG)
    recording = bv.Recording(trace)
    requests = len(recording)
    # requests admitted after the failing read (in flight with it) are recorded too
    assert requests >= live["request"] + 1, (requests, live["request"])
    proc = run_cli("replay", "--json", trace, pristine, "--test-command", command)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = json.loads(proc.stdout)
    [replayed] = out["mismatches"]
    for key in ("request", "message", "sector", "kind", "op", "connection", "first_byte"):
        assert replayed[key] == live[key], (key, replayed, live)
    assert out["ops"] == live["request"] + 1
    print(f"replay: {out['ops']} of {out['total']} requests in {out['elapsed_s']:.2f} s")

    # shrink: a handful of requests, in under a minute
    shrunk = tmp_path / "min.bvt"
    started = time.monotonic()
    proc = run_cli("shrink", "--json", trace, shrunk, pristine, "--test-command", command)
    shrink_s = time.monotonic() - started
    assert proc.returncode == 1, proc.stdout + proc.stderr
    result_json = json.loads(proc.stdout)
    print(
        f"trace: {requests} requests, {trace.stat().st_size} bytes; shrunk to "
        f"{result_json['ops_after']} in {result_json['trials']} trials ({shrink_s:.1f} s)"
    )
    assert result_json["ops_before"] == requests
    assert 2 <= result_json["ops_after"] <= 6, result_json
    assert result_json["finding"]["kind"] == "contents"
    assert shrink_s < 60, shrink_s
    proc = run_cli("replay", "--json", shrunk, pristine, "--test-command", command)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    again = json.loads(proc.stdout)
    assert again["total"] == result_json["ops_after"]
    assert again["mismatches"][0]["kind"] == "contents"

    # the seed's last step: read the sector in question with io, as qemu-io does
    offset = live["sector"] * 512
    command_v = f"read -v {offset} 512"
    ours = run_cli("io", "-f", "raw", "-c", command_v, disk)
    theirs = run(["qemu-io", "-f", "raw", "-c", command_v, disk])
    assert ours.returncode == 0, ours.stderr
    strip = lambda s: re.sub(r"\(.*/sec and .* ops/sec\)", "", s)  # noqa: E731
    assert strip(ours.stdout) == strip(theirs.stdout)
    bad = hex_bytes(ours.stdout)
    good = hex_bytes(run_cli("io", "-f", "raw", "-c", command_v, raw).stdout)
    assert len(bad) == len(good) == 512
    assert bad != good
    at = live["first_byte"] - offset
    assert bad[:at] == good[:at] and bad[at] != good[at]
    # through the mirrored device, io stops at that sector with the seed's message
    device = run_cli("io", "-c", command_v, f"blkverify:{raw}:{disk}")
    assert device.returncode == 1, device.stdout + device.stderr
    assert f"contents mismatch in sector {live['sector']}" in device.stderr


# --------------------------------------------------------------------------------------
# 3. the same bug, --on-mismatch reference: the guest runs to its end on correct data
# --------------------------------------------------------------------------------------


def corrupt_reads(ops: list, fired: dict) -> tuple[set[int], set[int]]:
    """From the trace's requests: the reads that must be findings, and those that may be.

    The lost write left the test side stale in [first_byte, last_byte] (both ends
    certainly differ; bytes between may not); a later write, write-zeroes or discard
    over a byte sets it alike on both sides.  A read after the lost write that covers an
    end still stale must be a finding; one that covers no stale byte must not be.
    """
    writes = [op for op in ops if op[1].split()[0] == "write"]
    lost = [op for op in writes if (op[2], op[3]) == (fired["offset"], fired["length"])]
    assert lost, (fired, writes)
    lost_number = lost[0][0]
    stale = [(fired["first_byte"], fired["last_byte"] + 1)]  # [start, end) ranges
    ends = {fired["first_byte"], fired["last_byte"]}
    must, may = set(), set()
    for number, line, offset, length, _writes, _conn in ops:
        if number <= lost_number:
            continue
        end = offset + length
        kind = line.split()[0]
        if kind == "read":
            if any(s < end and offset < e for s, e in stale):
                may.add(number)
                if any(offset <= b < end for b in ends):
                    must.add(number)
        elif kind in ("write", "zero", "discard"):
            cut = []
            for s, e in stale:
                cut += [(s, min(e, offset)), (max(s, end), e)]
            stale = [(s, e) for s, e in cut if s < e]
            ends = {b for b in ends if not offset <= b < end}
    return must, may


def test_guest_on_serve_with_reference_runs_to_its_end_and_the_report_lists_every_corrupt_read(
    guest_boot: GuestBoot, tmp_path: Path, serve, bug_server
) -> None:
    caught = guest_on_bug_server(guest_boot, serve, bug_server, tmp_path, "reference")
    raw, trace, bugs = caught.raw, caught.trace, caught.bugs
    server, result, findings, stderr = caught.server, caught.result, caught.findings, caught.stderr
    # the guest ran to its end on correct data: every step, its cmp and its e2fsck -fn
    assert result.result_line == "ok", result.describe()
    assert list(result.steps) == STEPS
    assert result.cmp_failures() == []
    assert "I/O error" not in result.console_text, result.describe()
    # what it wrote is right on the reference
    (tmp_path / "raw").mkdir()
    assert_tree_on_disk(raw, guest_boot, tmp_path / "raw")
    # serve: exit 1, every corrupt read in the report, on stderr and in the summary
    assert server.returncode == 1, stderr
    [fired] = bugs.fired()
    assert (fired["kind"], fired["phase"]) == ("lost-write", "lost"), fired
    assert findings, stderr
    for f in findings:
        assert f["kind"] == "contents" and f["op"].startswith("read "), f
        assert fired["first_sector"] <= f["sector"] <= fired["last_sector"], (f, fired)
        assert f["message"] in stderr
    assert findings[0]["sector"] == fired["first_sector"], (findings[0], fired)
    numbers = [f["request"] for f in findings]
    assert len(set(numbers)) == len(numbers)
    assert f"; {len(findings)} finding" in summary_line(stderr)
    must, may = corrupt_reads(bv.Recording(trace).ops(), fired)
    assert must, (fired, findings)
    assert must <= set(numbers) <= may, (sorted(must), sorted(numbers), sorted(may))
    print(f"findings: {len(findings)} corrupt reads, requests {numbers}")
