"""The planted-bug NBD server (tests/bug_server.py), checked with the real QEMU tools.

Without bugs it is a correct NBD server for qemu-img, qemu-io, nbdcopy and nbdfuse.
With a bug armed, what qemu-io reads back differs from a plain copy that had the same
writes applied, and the first differing byte is the one the server's log names; a fresh
server over a fresh copy repeats the same run exactly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bug_server import BugServer
from conftest import KiB, MiB, qemu_img, qemu_io, run

SIZE = 4 * MiB
CLUSTER = 64 * KiB


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A raw disk whose 64 KiB cluster i is filled with the byte i + 1: neighbours differ."""
    d = tmp_path_factory.mktemp("bugbase")
    p = d / "base.raw"
    qemu_img("create", "-f", "raw", p, SIZE)
    qemu_io(p, *(f"write -P {i + 1} {i * CLUSTER} 64k" for i in range(SIZE // CLUSTER)), fmt="raw")
    return p


def fresh(base: Path, d: Path, name: str) -> Path:
    p = d / name
    shutil.copyfile(base, p)
    return p


def expected_image(base: Path, d: Path, cmds: list[str], name: str = "expected.raw") -> Path:
    """A plain copy of ``base`` with ``cmds`` applied by qemu-io: what a correct server holds."""
    p = fresh(base, d, name)
    qemu_io(p, *cmds, fmt="raw")
    return p


def qemu_io_uri(uri: str, *cmds: str) -> subprocess.CompletedProcess:
    """qemu-io on an NBD URI (raw); failures of a command are output, not exceptions."""
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    return run([*argv, uri])


def read_via(uri: str, offset: int, length: int) -> bytes:
    """The bytes qemu-io reads at [offset, offset+length), parsed from ``read -v``."""
    out = qemu_io_uri(uri, f"read -v {offset} {length}").stdout
    data = bytearray()
    for line in out.splitlines():
        m = re.match(r"^([0-9a-f]{8}):  ((?:[0-9a-f]{2} )+)", line)
        if m:
            assert int(m.group(1), 16) == offset + len(data), line
            data += bytes.fromhex(m.group(2))
    assert len(data) == length, out
    return bytes(data)


def first_difference(a: bytes, b: bytes) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i
    return None


def compare_mismatch(a: Path, b: Path) -> int | None:
    """The offset ``qemu-img compare`` reports as the first mismatch, or None if identical."""
    proc = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b], check=False)
    if proc.returncode == 0:
        return None
    assert proc.returncode == 1, proc.stderr
    m = re.search(r"Content mismatch at offset (\d+)!", proc.stdout)
    assert m, proc.stdout
    return int(m.group(1))


def source_file(d: Path, name: str, data: bytes) -> Path:
    p = d / name
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------------------
# no bug: a correct server
# --------------------------------------------------------------------------------------


def test_without_bugs_the_server_is_correct(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    qemu_img("create", "-f", "qcow2", src, SIZE)
    rnd = source_file(tmp_path, "rnd.bin", os.urandom(300 * KiB))
    qemu_io(
        src,
        "write -P 0xab 0 64k",
        f"write -s {rnd} 70000 300000",
        "write -P 0x42 1048476 200",
        f"write -P 0xee {SIZE - 3000} 3000",
    )
    disk = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", disk, SIZE)
    with BugServer(disk) as server:
        qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", src, server.uri)
        out = qemu_img("compare", "-f", "qcow2", "-F", "raw", src, server.uri).stdout
        assert "Images are identical" in out
        # write-zeroes, discard and flush reach the file
        qemu_io_uri(server.uri, "write -z 0 8k", "discard 64k 64k", "flush")
        qemu_io(src, "write -z 0 8k", "write -z 64k 64k")
        assert "Images are identical" in qemu_img("compare", src, server.uri).stdout
        # nbdcopy, both ways
        out_copy = tmp_path / "out.raw"
        run(["nbdcopy", server.uri, out_copy])
        run(["nbdcopy", out_copy, server.uri])
        assert "Images are identical" in qemu_img("compare", src, server.uri).stdout
    assert server.fired() == []
    assert "Images are identical" in qemu_img("compare", "-F", "raw", src, disk).stdout
    assert compare_mismatch(out_copy, disk) is None


def test_without_bugs_nbdfuse_carries_a_file_system(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", disk, 32 * MiB)
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.bin").write_bytes(os.urandom(300 * KiB))
    (tree / "sub" / "b.txt").write_text("blkverify\n" * 5000)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with BugServer(disk) as server:
        fuse = subprocess.Popen(
            ["nbdfuse", mnt / "disk", "--unix", server.socket],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 20
            while not (mnt / "disk").exists():
                assert fuse.poll() is None, fuse.stderr.read() if fuse.stderr else ""
                assert time.monotonic() < deadline, "nbdfuse did not mount"
                time.sleep(0.05)
            run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, mnt / "disk"])
            run(["e2fsck", "-fn", mnt / "disk"])
        finally:
            run(["fusermount3", "-u", mnt], check=False)
            try:
                fuse.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(fuse.pid, signal.SIGKILL)
                fuse.wait(timeout=10)
            if fuse.stderr:
                fuse.stderr.close()
    assert server.fired() == []
    run(["e2fsck", "-fn", disk])
    dump = tmp_path / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", disk])
    assert (dump / "a.bin").read_bytes() == (tree / "a.bin").read_bytes()
    assert (dump / "sub" / "b.txt").read_text() == (tree / "sub" / "b.txt").read_text()


# --------------------------------------------------------------------------------------
# lost-write
# --------------------------------------------------------------------------------------

LOST_WRITES = [
    "write -P 0xa1 0 4k",  # inside cluster 0: not counted
    "write -P 0xa2 60k 8k",  # crosses 64k: crossing write 1
    "write -P 0xa3 120k 16k",  # crosses 128k: crossing write 2
    "write -P 0xa4 300k 4k",
]


def test_lost_write_is_acknowledged_and_never_applied(base: Path, tmp_path: Path) -> None:
    disk = fresh(base, tmp_path, "disk.raw")
    expected = expected_image(base, tmp_path, LOST_WRITES)
    with BugServer(disk, bugs=[("lost-write", 2)]) as server:
        out = qemu_io_uri(server.uri, *LOST_WRITES)
        assert "wrote 16384/16384 bytes at offset 122880" in out.stdout  # acknowledged
        read = read_via(server.uri, 120 * KiB, 16 * KiB)
    [entry] = server.fired()
    assert entry == {
        "kind": "lost-write",
        "armed": 2,
        "count": 2,
        "phase": "lost",
        "op": "write",
        "offset": 120 * KiB,
        "length": 16 * KiB,
        "first_byte": 120 * KiB,
        "last_byte": 136 * KiB - 1,
        "first_sector": 240,
        "last_sector": 271,
    }
    want = expected.read_bytes()[120 * KiB : 136 * KiB]
    assert 120 * KiB + first_difference(read, want) == entry["first_byte"]
    assert compare_mismatch(expected, disk) == entry["first_sector"] * 512
    # everything else was applied
    assert disk.read_bytes()[: 120 * KiB] == expected.read_bytes()[: 120 * KiB]
    assert disk.read_bytes()[136 * KiB :] == expected.read_bytes()[136 * KiB :]


def test_lost_write_first_corrupt_sector_is_the_first_that_differs(
    base: Path, tmp_path: Path
) -> None:
    # 126k..134k crosses 128k; its first 3 KiB repeat what is there (0x02 up to 128k, then 0x03)
    data = b"\x02" * (2 * KiB) + b"\x03" * KiB + b"\xc3" * (5 * KiB)
    src = source_file(tmp_path, "w.bin", data)
    cmds = [f"write -s {src} 126k 8k"]
    disk = fresh(base, tmp_path, "disk.raw")
    expected = expected_image(base, tmp_path, cmds)
    with BugServer(disk, bugs=[("lost-write", 1)]) as server:
        qemu_io_uri(server.uri, *cmds)
        read = read_via(server.uri, 126 * KiB, 8 * KiB)
    [entry] = server.fired()
    assert (entry["first_byte"], entry["first_sector"]) == (129 * KiB, 258)
    assert (entry["last_byte"], entry["last_sector"]) == (134 * KiB - 1, 267)
    want = expected.read_bytes()[126 * KiB : 134 * KiB]
    assert 126 * KiB + first_difference(read, want) == entry["first_byte"]
    assert compare_mismatch(expected, disk) == 258 * 512


def test_lost_write_passes_over_a_write_that_changes_nothing(base: Path, tmp_path: Path) -> None:
    same = source_file(tmp_path, "same.bin", b"\x01" * (4 * KiB) + b"\x02" * (4 * KiB))
    cmds = [f"write -s {same} 60k 8k", "write -P 0xd4 190k 4k"]  # both cross
    disk = fresh(base, tmp_path, "disk.raw")
    expected = expected_image(base, tmp_path, cmds)
    with BugServer(disk, bugs=[("lost-write", 1)]) as server:
        qemu_io_uri(server.uri, *cmds)
    [entry] = server.fired()
    assert (entry["armed"], entry["count"], entry["offset"]) == (1, 2, 190 * KiB)
    assert compare_mismatch(expected, disk) == 190 * KiB


# --------------------------------------------------------------------------------------
# late-write
# --------------------------------------------------------------------------------------

LATE_WRITES = [
    "write -P 0xb1 64k 8k",  # write 1
    "write -P 0xb2 200k 4k",  # write 2: held
    "write -P 0xb4 250k 4k",  # write 3: same cluster, no overlap: still held
    "write -P 0xb3 202k 4k",  # write 4: overlaps 202k..204k: released, stale over it
]


def test_late_write_is_applied_after_a_later_write(base: Path, tmp_path: Path) -> None:
    disk = fresh(base, tmp_path, "disk.raw")
    expected = expected_image(base, tmp_path, LATE_WRITES)
    with BugServer(disk, bugs=[("late-write", 2)]) as server:
        qemu_io_uri(server.uri, *LATE_WRITES[:3])
        # held: a read sees the old contents
        held_read = read_via(server.uri, 200 * KiB, 4 * KiB)
        assert held_read == b"\x04" * (4 * KiB)
        qemu_io_uri(server.uri, LATE_WRITES[3])
        read = read_via(server.uri, 200 * KiB, 8 * KiB)
    held, released = server.fired()
    assert held == {
        "kind": "late-write",
        "armed": 2,
        "count": 2,
        "phase": "held",
        "op": "write",
        "offset": 200 * KiB,
        "length": 4 * KiB,
        "first_byte": 200 * KiB,
        "last_byte": 204 * KiB - 1,
        "first_sector": 400,
        "last_sector": 407,
    }
    assert released == {
        **held,
        "phase": "released",
        "first_byte": 202 * KiB,
        "first_sector": 404,
        "by": {"op": "write", "offset": 202 * KiB, "length": 4 * KiB, "count": 4},
    }
    want = expected.read_bytes()[200 * KiB : 208 * KiB]
    assert 200 * KiB + first_difference(read, want) == released["first_byte"]
    assert read[2 * KiB : 4 * KiB] == b"\xb2" * (2 * KiB)  # the stale bytes
    assert compare_mismatch(expected, disk) == released["first_sector"] * 512


def test_late_write_never_released_is_logged_at_exit(base: Path, tmp_path: Path) -> None:
    disk = fresh(base, tmp_path, "disk.raw")
    cmds = ["write -P 0xb1 64k 8k"]
    expected = expected_image(base, tmp_path, cmds)
    with BugServer(disk, bugs=[("late-write", 1)]) as server:
        qemu_io_uri(server.uri, *cmds)
    held, unreleased = server.fired()
    assert held["phase"] == "held"
    assert unreleased == {**held, "phase": "unreleased"}
    assert compare_mismatch(expected, disk) == 64 * KiB


# --------------------------------------------------------------------------------------
# neighbour-read
# --------------------------------------------------------------------------------------


def test_neighbour_read_returns_the_next_cluster(base: Path, tmp_path: Path) -> None:
    disk = fresh(base, tmp_path, "disk.raw")
    # the first KiB of clusters 1 and 2 agree, so the read goes wrong from 65k on
    qemu_io(disk, "write -P 0x77 64k 1k", "write -P 0x77 128k 1k", fmt="raw")
    with BugServer(disk, bugs=[("neighbour-read", 2)]) as server:
        first = read_via(server.uri, 0, 4 * KiB)  # read 1
        second = read_via(server.uri, 64 * KiB, 8 * KiB)  # read 2: cluster 2's bytes
        third = read_via(server.uri, 64 * KiB, 8 * KiB)  # read 3: right again
    [entry] = server.fired()
    assert entry == {
        "kind": "neighbour-read",
        "armed": 2,
        "count": 2,
        "phase": "served",
        "op": "read",
        "offset": 64 * KiB,
        "length": 8 * KiB,
        "first_byte": 65 * KiB,
        "last_byte": 72 * KiB - 1,
        "first_sector": 130,
        "last_sector": 143,
        "source_offset": 128 * KiB,
    }
    on_disk = disk.read_bytes()
    assert first == on_disk[: 4 * KiB]
    assert third == on_disk[64 * KiB : 72 * KiB]
    assert second == on_disk[128 * KiB : 136 * KiB]
    assert 64 * KiB + first_difference(second, third) == entry["first_byte"]
    assert compare_mismatch(base, disk) == 64 * KiB  # the file itself: only the 0x77 writes


def test_neighbour_read_at_the_end_reads_the_cluster_before(
    base: Path, tmp_path: Path, bug_server
) -> None:
    disk = fresh(base, tmp_path, "disk.raw")
    server = bug_server(disk, bugs=[("neighbour-read", 1)])  # the fixture stops it
    got = read_via(server.uri, SIZE - 4 * KiB, 4 * KiB)
    [entry] = server.fired()  # logged as it fires, while the server runs
    assert entry["source_offset"] == SIZE - CLUSTER - 4 * KiB
    assert got == disk.read_bytes()[SIZE - CLUSTER - 4 * KiB : SIZE - CLUSTER]


# --------------------------------------------------------------------------------------
# several at once, and determinism
# --------------------------------------------------------------------------------------

MIXED = [
    "write -P 0xe1 60k 8k",  # write 1, crossing 1
    "read 0 64k",  # read 1
    "write -P 0xe2 100k 40k",  # write 2, crossing 2: lost
    "read 128k 64k",  # read 2: neighbour
    "write -P 0xe3 300k 4k",  # write 3: held
    "write -P 0xe4 301k 1k",  # write 4: releases it
    "read 300k 4k",  # read 3
]


def _mixed_run(base: Path, d: Path) -> tuple[list, bytes, str]:
    d.mkdir()
    disk = fresh(base, d, "disk.raw")
    bugs = [("lost-write", 2), ("neighbour-read", 2), ("late-write", 3)]
    with BugServer(disk, bugs=bugs) as server:
        out = qemu_io_uri(server.uri, *MIXED).stdout
        stale = read_via(server.uri, 300 * KiB, 4 * KiB)
    timing = re.compile(r"^.*ops/sec.*$\n?", re.M)
    assert stale[1 * KiB : 2 * KiB] == b"\xe3" * KiB
    return server.fired(), disk.read_bytes(), timing.sub("", out)


def test_several_bugs_at_once_repeat_exactly_on_a_fresh_server(base: Path, tmp_path: Path) -> None:
    first = _mixed_run(base, tmp_path / "one")
    second = _mixed_run(base, tmp_path / "two")
    assert first == second
    log = first[0]
    assert [(e["kind"], e["phase"], e["count"]) for e in log] == [
        ("lost-write", "lost", 2),
        ("neighbour-read", "served", 2),
        ("late-write", "held", 3),
        ("late-write", "released", 3),
    ]
    assert log[0]["first_sector"] == 100 * KiB // 512
    assert log[1]["first_sector"] == 128 * KiB // 512
    assert log[3]["first_byte"] == 301 * KiB


def test_bad_bug_flag_is_refused(tmp_path: Path) -> None:
    disk = tmp_path / "disk.raw"
    qemu_img("create", "-f", "raw", disk, SIZE)
    with pytest.raises(ValueError, match="kind must be one of"):
        BugServer(disk, bugs=[("torn-write", 1)])
    proc = run(
        [
            "nbdkit",
            "-f",
            "-U",
            tmp_path / "x.sock",
            "python",
            Path(__file__).parent / "bugserver" / "plugin.py",
            f"file={disk}",
            "bug=lost-write@0",
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert "bug='lost-write@0': expected KIND@N with N >= 1" in proc.stderr
