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
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import qemu_img, run, run_cli
from guest import GuestBoot, GuestResult, run_guest
from test_guest import DISK_SIZE, LOST_WRITE, STEPS, assert_tree_on_disk, new_raw, report
from test_serve import ServeProc
from test_trace import bug_command

BUG = f"{LOST_WRITE[0]}@{LOST_WRITE[1]}"
SERVE_END_S = 60  # serve ends by itself once the guest is gone (or at its finding)


@pytest.fixture
def serve():
    """Start ``blkverify serve`` processes; each is killed by PID at teardown if the
    test left it running."""
    started: list[ServeProc] = []

    def start(*args, **kwargs) -> ServeProc:
        server = ServeProc(*args, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


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
    # the guest's discards reached the test side (mke2fs's, then fstrim's)
    assert not re.search(r"discarded 0 B$", test_line), test_line
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
