"""A real Linux guest (tests/guest.py) on NBD disks: correct ones, and the planted-bug server.

On a correct disk (qemu-nbd over a fresh qcow2, the bug server without bugs) the guest
prints ``ok``: its file system holds the tree, ``qemu-img check`` is clean, and its
discards reach the server.  On the bug server with a planted bug that the guest meets,
it prints ``FAIL readback``, and the byte where its ``cmp`` saw the first difference is
the very byte (and sector) the server's log names.  A server that goes away mid-run
gives a FAIL line, not a hang.

These runs are what issue 23 runs against ``blkverify serve``: ``run_guest`` takes any
NBD URI, so putting serve in front of a disk changes one line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from bug_server import BugServer
from conftest import MiB, qemu_img, run
from guest import GuestBoot, GuestResult, run_guest

DISK_SIZE = 128 * MiB
FS_BLOCK = 4096  # scripts/guest/init makes ext4 with -b 4096
STEPS = ["disk", "mkfs", "mount", "copy", "sync", "readback", "delete", "fstrim", "umount", "fsck"]
# what the guest deletes before fstrim (scripts/guest/init), and so what stays on the disk
DELETED = ("big", "d1")


class QemuNbd:
    """``qemu-nbd --persistent --discard=unmap`` on a unix socket, stopped by PID."""

    def __init__(self, image: Path, fmt: str, sock: Path) -> None:
        self.sock = sock
        pidfile = sock.with_suffix(".pid")
        self.log = sock.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "qemu-nbd",
                    "--persistent",
                    "--discard=unmap",
                    "-f",
                    fmt,
                    "-k",
                    str(sock),
                    "--pid-file",
                    str(pidfile),
                    str(image),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"qemu-nbd did not start: {self.log.read_text()}")
            if pidfile.exists() and sock.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(sock))
                    break
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.02)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def __enter__(self) -> QemuNbd:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def new_raw(path: Path) -> Path:
    run(["truncate", "-s", DISK_SIZE, path])
    return path


def report(name: str, result: GuestResult, stats: dict | None = None) -> None:
    """Print the run's figures (shown with ``pytest -s``)."""
    line = f"guest[{name}]: {result.result_line!r} wall={result.wall_s:.1f}s steps={result.steps}"
    if stats is not None:
        line += f" server={stats}"
    print(line)


def assert_tree_on_disk(raw: Path, boot: GuestBoot, d: Path) -> None:
    """The file system on ``raw`` is clean and holds the tree, less what the guest deleted."""
    run(["e2fsck", "-fn", raw])
    dump = d / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump /tree {dump}", raw])
    got = sorted(p.relative_to(dump / "tree") for p in (dump / "tree").rglob("*"))
    every = sorted(p.relative_to(boot.tree) for p in boot.tree.rglob("*"))
    want = [rel for rel in every if rel.parts[0] not in DELETED]
    assert got == want
    for rel in want:
        if (boot.tree / rel).is_file():
            assert (dump / "tree" / rel).read_bytes() == (boot.tree / rel).read_bytes(), rel


def disk_byte_of(raw: Path, tree_path: str, file_offset: int, d: Path) -> int:
    """Where byte ``file_offset`` of /tree/``tree_path`` lies on the disk ``raw``.

    The guest stopped without unmounting, so this works on a copy whose journal e2fsck
    has replayed.
    """
    copy = d / "replayed.raw"
    shutil.copyfile(raw, copy)
    proc = run(["e2fsck", "-fy", copy], check=False)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    block = file_offset // FS_BLOCK
    out = run(["debugfs", "-R", f"bmap /tree/{tree_path} {block}", copy]).stdout
    physical = int(out.strip())
    assert physical > 0, out
    copy.unlink()
    return physical * FS_BLOCK + file_offset % FS_BLOCK


# --------------------------------------------------------------------------------------
# correct disks
# --------------------------------------------------------------------------------------


def test_guest_on_qemu_nbd_qcow2_is_ok(guest_boot: GuestBoot, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    qemu_img("create", "-f", "qcow2", image, DISK_SIZE)
    with QemuNbd(image, "qcow2", tmp_path / "q.sock") as server:
        result = run_guest(server.uri, guest_boot)
    report("qemu-nbd qcow2", result)
    assert result.result_line == "ok", result.describe()
    assert list(result.steps) == STEPS
    check = run(["qemu-img", "check", image], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "No errors were found on the image." in check.stdout
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", image, raw)
    assert_tree_on_disk(raw, guest_boot, tmp_path)


def test_guest_on_bug_server_without_bugs_is_ok_and_discards_reach_it(
    guest_boot: GuestBoot, tmp_path: Path
) -> None:
    disk = new_raw(tmp_path / "disk.raw")
    with BugServer(disk) as server:
        result = run_guest(server.uri, guest_boot)
    stats = server.stats()
    report("bug server, no bug", result, stats)
    assert result.result_line == "ok", result.describe()
    assert server.fired() == []
    m = re.search(r"^/mnt: (\d+) bytes trimmed", result.console_text, re.M)
    assert m, result.describe()
    fstrim_bytes = int(m.group(1))
    assert fstrim_bytes > 0
    # mke2fs discards the whole disk; then fstrim's discards come on top
    assert stats is not None
    assert stats["bytes_trimmed"] >= DISK_SIZE + fstrim_bytes, stats
    assert stats["bytes_written"] >= sum(
        p.stat().st_size for p in guest_boot.tree.rglob("*") if p.is_file()
    )
    assert stats["reads"] > 0 and stats["flushes"] > 0
    assert_tree_on_disk(disk, guest_boot, tmp_path)


# --------------------------------------------------------------------------------------
# planted bugs
# --------------------------------------------------------------------------------------

# The 2nd write that crosses 64 KiB is the first write of file data: mke2fs's first
# write (offset 0, 96 KiB) is the 1st; the guest's copy is written back at its sync.
LOST_WRITE = ("lost-write", 2)
# The 100th read falls in the guest's read-back, after the mkfs, mount and copy.
NEIGHBOUR_READ = ("neighbour-read", 100)


def _meet(boot: GuestBoot, bug: tuple, d: Path) -> tuple[GuestResult, dict, int, Path]:
    d.mkdir()
    disk = new_raw(d / "disk.raw")
    with BugServer(disk, bugs=[bug]) as server:
        result = run_guest(server.uri, boot)
    report(f"bug server, {bug[0]}@{bug[1]}", result, server.stats())
    assert result.result_line == "FAIL readback", result.describe()
    [entry] = server.fired()
    failures = result.cmp_failures()
    assert failures, result.describe()
    tree_path, offset = failures[0]
    assert (boot.tree / tree_path).is_file(), tree_path
    return result, entry, disk_byte_of(disk, tree_path, offset, d), disk


def test_guest_meets_a_lost_write_at_the_logged_sector_every_time(
    guest_boot: GuestBoot, tmp_path: Path
) -> None:
    runs = [_meet(guest_boot, LOST_WRITE, tmp_path / f"run{i}") for i in range(2)]
    for _result, entry, byte, _disk in runs:
        assert (entry["kind"], entry["phase"], entry["count"]) == ("lost-write", "lost", 2)
        # the first byte the guest read back wrong is the first byte the bug made wrong
        assert byte == entry["first_byte"], (byte, entry)
        assert byte // 512 == entry["first_sector"]
    (r1, e1, b1, _), (r2, e2, b2, _) = runs
    assert b1 == b2
    assert r1.cmp_failures()[0] == r2.cmp_failures()[0]
    key = ("offset", "first_byte", "first_sector")
    assert [e1[k] for k in key] == [e2[k] for k in key]


def test_guest_meets_a_neighbour_read_and_the_disk_stays_right(
    guest_boot: GuestBoot, tmp_path: Path
) -> None:
    _result, entry, byte, disk = _meet(guest_boot, NEIGHBOUR_READ, tmp_path / "run")
    assert (entry["kind"], entry["phase"], entry["count"]) == ("neighbour-read", "served", 100)
    assert byte == entry["first_byte"], (byte, entry)
    assert byte // 512 == entry["first_sector"]
    # only the read was wrong: what the guest wrote is all on the disk
    replayed = tmp_path / "replayed.raw"
    shutil.copyfile(disk, replayed)
    assert run(["e2fsck", "-fy", replayed], check=False).returncode in (0, 1)
    dump = tmp_path / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump /tree {dump}", replayed])
    for p in guest_boot.tree.rglob("*"):
        if p.is_file():
            rel = p.relative_to(guest_boot.tree)
            assert (dump / "tree" / rel).read_bytes() == p.read_bytes(), rel


# --------------------------------------------------------------------------------------
# a server that goes away
# --------------------------------------------------------------------------------------


def test_guest_fails_cleanly_when_its_server_goes_away(
    guest_boot: GuestBoot, tmp_path: Path
) -> None:
    step = "readback"
    disk = new_raw(tmp_path / "disk.raw")
    work = tmp_path / "guest"
    work.mkdir()
    console = work / "console.txt"
    server = BugServer(disk)
    stopped = threading.Event()
    done = threading.Event()

    def stop_at_step() -> None:
        while not done.is_set():
            if console.exists() and f"BLKVERIFY-STEP: {step} " in console.read_text(
                errors="replace"
            ):
                server.stop()
                stopped.set()
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=stop_at_step, daemon=True)
    watcher.start()
    try:
        result = run_guest(server.uri, guest_boot, work_dir=work)
    finally:
        done.set()
        watcher.join(timeout=10)
        server.stop()
    report(f"server stopped at {step}", result)
    assert stopped.is_set()
    assert not result.timed_out, result.describe()
    assert result.result_line == f"FAIL {step}", result.describe()
    assert "I/O error" in result.console_text
