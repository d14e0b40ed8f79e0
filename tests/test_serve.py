"""``blkverify serve`` under real clients: qemu-img and qemu-io, nbdcopy and
nbdinfo, fio's nbd engine, and a file system built and checked through nbdfuse.
After each correct run there is no finding, ``blkverify verify RAW TEST`` says
identical and ``qemu-img check`` is clean. With the planted-bug server (and a
qcow2 holding a flipped data byte) as the test side, serve names the sector the
bug corrupted under every ``--on-mismatch`` policy.

Every serve a test starts runs as ``python -m blkverify_rs serve`` and is stopped
by its PID at teardown, as is every nbdfuse and qemu-io holder.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import KiB, MiB, qemu_img, qemu_io, qemu_map, run, run_cli

SIZE = 32 * MiB
CLUSTER = 64 * KiB

# exercise's mismatch object, which serve's findings extend.
EXERCISE_KEYS = {
    "op_number",
    "op",
    "phase",
    "kind",
    "message",
    "sector",
    "first_byte",
    "test_ret",
    "raw_ret",
    "test_error",
    "raw_error",
    "test_bytes",
    "raw_bytes",
    "hexdump",
    "last_change",
    "diagnosis",
}


class ServeProc:
    """``blkverify serve ARGS`` in a process of its own: ``uri`` once it listens
    (the line it prints), then ``stop()`` by PID."""

    def __init__(self, *args, timeout: float = 30.0) -> None:
        self._err = tempfile.TemporaryFile()
        self.argv = [sys.executable, "-m", "blkverify_rs", "serve", *(str(a) for a in args)]
        self.proc = subprocess.Popen(
            self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._err
        )
        self.returncode: int | None = None
        self._stderr: str | None = None
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            self.kill()
            raise RuntimeError(f"serve did not print its URI: {self.argv}\n{self.stderr()}")
        self.uri = line.strip()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        if self._stderr is not None:
            return self._stderr
        self._err.seek(0)
        return self._err.read().decode(errors="replace")

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for serve to end by itself; its exit status."""
        self.returncode = self.proc.wait(timeout=timeout)
        self._close()
        return self.returncode

    def _close(self) -> None:
        """Keep what serve said on stderr, and close the files."""
        if self._stderr is None:
            self._stderr = self.stderr()
            self._err.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal serve by its PID and wait for it; its exit status."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self._close()


class Mounted:
    """``nbdfuse MNT/disk URI``: the export as the file ``path``; ``unmount()``
    stops nbdfuse (fusermount3, then by PID)."""

    def __init__(self, mnt: Path, uri: str) -> None:
        mnt.mkdir(exist_ok=True)
        self.mnt = mnt
        self.path = mnt / "disk"
        self.proc = subprocess.Popen(
            ["nbdfuse", str(self.path), uri], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 20
        while not self.path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.unmount()
                raise RuntimeError("nbdfuse did not mount")
            time.sleep(0.05)

    def unmount(self) -> None:
        run(["fusermount3", "-u", self.mnt], check=False)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=20)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def nbdfuse():
    """Mount exports with nbdfuse; every mount is undone (and nbdfuse stopped by
    PID) at teardown."""
    mounts: list[Mounted] = []

    def mount(mnt: Path, uri: str) -> Mounted:
        m = Mounted(mnt, uri)
        mounts.append(m)
        return m

    yield mount
    for m in mounts:
        if m.proc.poll() is None:
            m.unmount()


def blank_pair(d: Path, size: int = SIZE) -> tuple[Path, Path]:
    """A zeroed raw reference and an empty qcow2 test image."""
    raw, test = d / "raw.img", d / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, size)
    qemu_img("create", "-f", "qcow2", test, size)
    return raw, test


def checked_clean(raw: Path, test: Path, stderr: str) -> None:
    """After a correct run: no finding, the two sides identical, the qcow2 clean."""
    assert "blkverify: read" not in stderr and "0 findings" in stderr, stderr
    verify = run_cli("verify", raw, test)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    if test.suffix == ".qcow2":
        qemu_img("check", test)


# --------------------------------------------------------------------------------------
# correct test sides, real clients
# --------------------------------------------------------------------------------------


def test_qemu_img_converts_in_and_compares_out(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    source = tmp_path / "source.qcow2"
    qemu_img("create", "-f", "qcow2", source, SIZE)
    qemu_io(source, "write -P 0x11 0 3M", "write -z 5M 1M", "write -P 0x22 9M 64k")
    server = serve("--persistent", raw, test)
    assert server.uri.startswith("nbd+unix:///?socket=")
    qemu_img("convert", "-n", "-f", "qcow2", "-O", "raw", source, server.uri)
    assert "Images are identical" in qemu_img("compare", source, server.uri).stdout
    assert server.stop() == 0
    checked_clean(raw, test, server.stderr())
    assert "Images are identical" in qemu_img("compare", source, test).stdout


def test_qemu_io_writes_zeroes_discards_and_reads(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", raw, test)
    out = run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x33 0 1M",
            "-c",
            "write -P 0x44 -f 2M 64k",
            "-c",
            "write -z 4096 8k",
            "-c",
            "write -z -u 512k 128k",
            "-c",
            "discard 640k 64k",
            "-c",
            "flush",
            "-c",
            "read -P 0x33 0 4k",
            "-c",
            "read -P 0 4096 8k",
            "-c",
            "read -P 0x44 2M 64k",
            "-c",
            "aio_write -P 0x55 6M 4k",
            "-c",
            "aio_read -P 0 7M 4k",
            "-c",
            "aio_flush",
            server.uri,
        ]
    )
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr
    assert server.stop() == 0
    stderr = server.stderr()
    checked_clean(raw, test, stderr)
    assert "write_zeroes" in stderr and "trim" in stderr, stderr


def test_nbdcopy_and_nbdinfo_map(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    source = tmp_path / "source.raw"
    qemu_img("create", "-f", "raw", source, SIZE)
    qemu_io(source, "write -P 0x66 0 2M", "write -P 0x67 20M 1M", fmt="raw")
    # --shared 4 advertises multi-conn: nbdcopy then opens several connections.
    server = serve("--persistent", "--shared", "4", raw, test)
    run(["nbdcopy", source, server.uri])
    back = tmp_path / "back.raw"
    run(["nbdcopy", server.uri, back])
    assert Path(back).read_bytes() == Path(source).read_bytes()
    ours = map_ranges(run(["nbdinfo", "--map", server.uri]).stdout)
    assert server.stop() == 0
    checked_clean(raw, test, server.stderr())
    # QEMU's own server of the same image is the oracle of the map.
    qemu_sock = tmp_path / "q.sock"
    qemu = subprocess.Popen(["qemu-nbd", "-r", "-f", "qcow2", "-k", qemu_sock, test])
    try:
        deadline = time.monotonic() + 20
        while not qemu_sock.exists():
            assert time.monotonic() < deadline and qemu.poll() is None
            time.sleep(0.05)
        theirs = map_ranges(run(["nbdinfo", "--map", f"nbd+unix:///?socket={qemu_sock}"]).stdout)
    finally:
        os.kill(qemu.pid, signal.SIGTERM)
        qemu.wait(timeout=20)
    assert ours == theirs
    assert ours[0] == (0, 2 * MiB, "data")


def map_ranges(text: str) -> list[tuple[int, int, str]]:
    """``nbdinfo --map`` as (offset, length, description), adjacent ranges of
    one kind merged (servers may split them differently)."""
    out: list[tuple[int, int, str]] = []
    for line in text.splitlines():
        offset, length, _, description = line.split(None, 3)
        if out and out[-1][2] == description and out[-1][0] + out[-1][1] == int(offset):
            out[-1] = (out[-1][0], out[-1][1] + int(length), description)
        else:
            out.append((int(offset), int(length), description))
    return out


@pytest.mark.parametrize("iodepth", [1, 8])
def test_fio_verifies_through_serve(tmp_path: Path, serve, iodepth: int) -> None:
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", "--shared", "4", raw, test)
    out = run(
        [
            "fio",
            "--name=serve",
            "--ioengine=nbd",
            f"--uri={server.uri}",
            "--rw=randrw",
            "--rwmixread=70",
            "--bs=4k",
            "--verify=crc32c",
            f"--iodepth={iodepth}",
            "--size=16M",
            "--number_ios=3000",
        ],
        cwd=tmp_path,
    )
    assert "err= 0" in out.stdout, out.stdout + out.stderr
    assert server.stop() == 0
    checked_clean(raw, test, server.stderr())


def test_overlapping_requests_from_several_connections_are_no_finding(
    tmp_path: Path, serve
) -> None:
    """Four connections hammer the same 256 KiB with overlapping reads and writes
    of many sizes: every read must see both sides alike, whatever the timing."""
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", "--shared", "4", raw, test)
    run(
        [
            "fio",
            "--name=flood",
            "--ioengine=nbd",
            f"--uri={server.uri}",
            "--rw=randrw",
            "--rwmixread=50",
            "--bsrange=512-64k",
            "--iodepth=16",
            "--numjobs=4",
            "--size=256k",
            "--time_based",
            "--runtime=3",
        ],
        cwd=tmp_path,
    )
    assert server.stop() == 0
    stderr = server.stderr()
    requests = int(stderr.split("blkverify: serve: ")[1].split(" requests")[0])
    assert requests > 1000, stderr
    checked_clean(raw, test, stderr)


def test_a_file_system_through_nbdfuse(tmp_path: Path, serve, nbdfuse) -> None:
    raw, test = blank_pair(tmp_path)
    tree = make_tree(tmp_path / "tree")
    # nbdfuse opens several connections when multi-conn is offered.
    server = serve("--persistent", "--shared", "4", raw, test)
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, mounted.path])
    mounted.unmount()
    # A fresh mount: what follows is read through serve, not the page cache.
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    run(["e2fsck", "-fn", mounted.path])
    dump = tmp_path / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", mounted.path])
    mounted.unmount()
    assert same_tree(tree, dump)
    assert server.stop() == 0
    checked_clean(raw, test, server.stderr())


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.bin").write_bytes(os.urandom(700 * KiB))
    (root / "sub" / "b.txt").write_text("blkverify serve\n" * 20000)
    (root / "sub" / "deeper" / "c.bin").write_bytes(os.urandom(3 * MiB + 123))
    for i in range(20):
        (root / f"small{i}").write_bytes(os.urandom(100 + 37 * i))
    return root


def same_tree(a: Path, b: Path) -> bool:
    for path in a.rglob("*"):
        other = b / path.relative_to(a)
        if path.is_file() and (not other.is_file() or other.read_bytes() != path.read_bytes()):
            return False
    return True


# --------------------------------------------------------------------------------------
# block status
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["eio", "reference"])
def test_a_map_that_hides_corruption_is_a_finding(tmp_path: Path, serve, policy: str) -> None:
    """The test side reads zeros at 3M (its map says so), the reference holds
    data there: a client trusting the map (qemu-img convert) would never read it.
    Serve checks the map against the reference and names the sector."""
    raw, test = blank_pair(tmp_path)
    qemu_io(raw, "write -P 0x77 3M 64k", fmt="raw")
    qemu_io(test, "write -z 3M 64k")
    assert any(e["start"] == 3 * MiB and e["zero"] for e in qemu_map(test))
    report = tmp_path / "report.jsonl"
    server = serve("--persistent", "--on-mismatch", policy, "--report", report, raw, test)
    out = tmp_path / "out.raw"
    copied = run(["qemu-img", "convert", "-f", "raw", "-O", "raw", server.uri, out], check=False)
    assert server.stop() == 1
    findings = [json.loads(line) for line in report.read_text().splitlines()]
    status = [f for f in findings if f["op"].startswith("block_status")]
    assert status, findings
    assert status[0]["sector"] == 3 * MiB // 512
    assert status[0]["message"].startswith("blkverify: block_status sector_num=")
    assert status[0]["message"].endswith(f"contents mismatch in sector {3 * MiB // 512}")
    if policy == "reference":
        # Told "data", the client read the range, and got the reference's bytes.
        assert copied.returncode == 0, copied.stderr
        assert out.read_bytes() == raw.read_bytes()
    else:
        assert copied.returncode != 0


# --------------------------------------------------------------------------------------
# a raw client: what real clients never do
# --------------------------------------------------------------------------------------


def nbd_connect(uri: str) -> socket.socket:
    """A connection through the handshake (fixed newstyle, NBD_OPT_GO of the
    default export): simple replies."""
    path = uri.split("socket=", 1)[1]
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    greeting = recv_exactly(s, 18)
    assert greeting[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
    while True:
        _, _, reply, length = struct.unpack(">QIII", recv_exactly(s, 20))
        recv_exactly(s, length)
        if reply == 1:
            return s
        assert reply == 3, reply


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            raise EOFError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def request(command: int, offset: int, length: int, cookie: int = 1, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", 0x25609513, flags, command, cookie, offset, length)


def test_a_client_that_leaves_mid_request(tmp_path: Path, serve) -> None:
    """The write a client sent whole runs on both sides even if the client is gone
    before its reply; a write whose data never came is not run. The summary says so."""
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", "--shared", "2", raw, test)
    s = nbd_connect(server.uri)
    s.sendall(request(1, 1 * MiB, 4 * MiB) + b"\xab" * (4 * MiB))
    for i in range(8):
        s.sendall(request(0, 8 * MiB, 4 * MiB, cookie=10 + i))
    s.close()
    s = nbd_connect(server.uri)
    s.sendall(request(1, 16 * MiB, 1 * MiB) + b"\xcd" * 1000)
    s.close()
    time.sleep(0.5)
    assert server.stop() == 0
    stderr = server.stderr()
    assert "replies dropped" in stderr, stderr
    assert "1 requests cut short by the client leaving" in stderr, stderr
    checked_clean(raw, test, stderr)
    qemu_io(raw, "read -P 0xab 1M 4M", "read -P 0 16M 1M", fmt="raw")
    qemu_io(test, "read -P 0xab 1M 4M", "read -P 0 16M 1M")


# --------------------------------------------------------------------------------------
# corrupt test sides: the planted-bug server and a flipped byte
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> Path:
    """A raw disk whose 64 KiB cluster i holds the byte i + 1: neighbours differ."""
    p = tmp_path_factory.mktemp("clusters") / "base.raw"
    size = 4 * MiB
    qemu_img("create", "-f", "raw", p, size)
    qemu_io(p, *(f"write -P {i + 1} {i * CLUSTER} 64k" for i in range(size // CLUSTER)), fmt="raw")
    return p


def bug_pair(clusters: Path, d: Path) -> tuple[Path, Path]:
    raw, disk = d / "raw.img", d / "disk.raw"
    shutil.copyfile(clusters, raw)
    shutil.copyfile(clusters, disk)
    return raw, disk


@pytest.mark.parametrize("policy", ["stop", "eio", "reference"])
def test_a_neighbour_read_is_named_under_every_policy(
    tmp_path: Path, serve, bug_server, clusters: Path, policy: str
) -> None:
    raw, disk = bug_pair(clusters, tmp_path)
    bugs = bug_server(disk, bugs=[("neighbour-read", 2)])
    report = tmp_path / "report.jsonl"
    server = serve("--on-mismatch", policy, "--persistent", "--report", report, raw, bugs.uri)
    first = run(["qemu-io", "-f", "raw", "-c", "read -P 3 128k 64k", server.uri])
    assert "Pattern verification failed" not in first.stdout
    second = run(
        ["qemu-io", "-f", "raw", "-c", "read -P 5 256k 16k", "-c", "read -P 7 384k 4k", server.uri],
        check=False,
    )
    [fired] = bugs.fired()
    if policy == "stop":
        assert "read failed: Input/output error" in second.stdout + second.stderr
        started = time.monotonic()
        assert server.wait(timeout=10) == 1
        assert time.monotonic() - started < 5
    elif policy == "eio":
        assert "read failed: Input/output error" in second.stdout + second.stderr
        # Serving goes on: the next read is right.
        assert "read 4096/4096 bytes at offset 393216" in second.stdout
        assert server.stop() == 1
    else:
        # The client got the reference's bytes.
        assert "read 16384/16384 bytes at offset 262144" in second.stdout
        assert "Pattern verification failed" not in second.stdout
        assert server.stop() == 1
    stderr = server.stderr()
    line = (
        f"blkverify: read sector_num={256 * KiB // 512} nb_sectors=32 "
        f"contents mismatch in sector {fired['first_sector']}"
    )
    assert line in stderr.splitlines(), stderr
    [finding] = [json.loads(x) for x in report.read_text().splitlines()]
    assert set(finding) == EXERCISE_KEYS | {"request", "connection", "mapping"}
    assert finding["message"] == line
    assert finding["sector"] == fired["first_sector"]
    assert finding["op"] == f"read {256 * KiB} {16 * KiB}"
    assert finding["connection"] == 2
    assert finding["op_number"] == finding["request"] > 0
    assert "1 finding" in stderr


@pytest.mark.parametrize("policy", ["stop", "eio", "reference"])
def test_a_lost_write_is_named_under_every_policy(
    tmp_path: Path, serve, bug_server, clusters: Path, policy: str
) -> None:
    raw, disk = bug_pair(clusters, tmp_path)
    bugs = bug_server(disk, bugs=[("lost-write", 1)])
    server = serve("--on-mismatch", policy, "--persistent", raw, bugs.uri)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0xa2 60k 8k", server.uri])
    read = run(["qemu-io", "-f", "raw", "-c", "read -P 0xa2 56k 16k", server.uri], check=False)
    [fired] = bugs.fired()
    assert fired["kind"] == "lost-write"
    if policy == "reference":
        assert "Pattern verification failed" in read.stdout  # 56k-60k was never 0xa2
        assert "read failed" not in read.stdout + read.stderr
    else:
        assert "read failed: Input/output error" in read.stdout + read.stderr
    status = server.wait(timeout=10) if policy == "stop" else server.stop()
    assert status == 1
    line = (
        f"blkverify: read sector_num={56 * KiB // 512} nb_sectors=32 "
        f"contents mismatch in sector {fired['first_sector']}"
    )
    assert line in server.stderr().splitlines(), server.stderr()


def flipped_qcow2(d: Path) -> tuple[Path, Path, int]:
    """A qcow2 and its raw copy with one data byte flipped in the qcow2 file;
    returns them and the guest byte (found through qemu-img map)."""
    raw, test = d / "raw.img", d / "test.qcow2"
    qemu_img("create", "-f", "qcow2", test, 8 * MiB)
    qemu_io(test, "write -P 0x3c 0 4M")
    qemu_img("convert", "-O", "raw", test, raw)
    guest = 3 * MiB + 777
    [extent] = [e for e in qemu_map(test) if e["start"] <= guest < e["start"] + e["length"]]
    host = extent["offset"] + guest - extent["start"]
    with open(test, "r+b") as f:
        f.seek(host)
        byte = f.read(1)
        f.seek(host)
        f.write(bytes([byte[0] ^ 0x10]))
    return raw, test, guest


@pytest.mark.parametrize("policy", ["stop", "eio", "reference"])
def test_a_flipped_qcow2_byte_is_named_under_every_policy(
    tmp_path: Path, serve, policy: str
) -> None:
    raw, test, guest = flipped_qcow2(tmp_path)
    report = tmp_path / "report.jsonl"
    server = serve("--on-mismatch", policy, "--persistent", "--report", report, raw, test)
    read = run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 3M 64k", server.uri], check=False)
    if policy == "reference":
        assert "read 65536/65536" in read.stdout and "verification failed" not in read.stdout
    else:
        assert "read failed: Input/output error" in read.stdout + read.stderr
    status = server.wait(timeout=10) if policy == "stop" else server.stop()
    assert status == 1
    [finding] = [json.loads(x) for x in report.read_text().splitlines()]
    assert finding["sector"] == guest // 512 and finding["first_byte"] == guest
    assert finding["mapping"]["kind"] == "data"
    assert finding["mapping"]["tables"][0]["table"] == "L1"
    assert finding["message"] == (
        f"blkverify: read sector_num={3 * MiB // 512} nb_sectors=128 "
        f"contents mismatch in sector {guest // 512}"
    )


def test_a_file_system_meets_the_corruption(tmp_path: Path, serve, nbdfuse) -> None:
    """An ext4 file system in a qcow2 with one byte of a file flipped: reading the
    tree back through nbdfuse meets it, serve names the sector, and under
    ``reference`` the files come back whole."""
    tree = make_tree(tmp_path / "tree")
    image = tmp_path / "fs.raw"
    qemu_img("create", "-f", "raw", image, SIZE)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, image])
    raw, test = tmp_path / "raw.img", tmp_path / "test.qcow2"
    shutil.copyfile(image, raw)
    qemu_img("convert", "-f", "raw", "-O", "qcow2", image, test)
    # The first block of a.bin, found by debugfs, then in the qcow2 by qemu-img map.
    blocks = run(["debugfs", "-R", "blocks /a.bin", image]).stdout.split()
    guest = int(blocks[0]) * 4096 + 100
    [extent] = [e for e in qemu_map(test) if e["start"] <= guest < e["start"] + e["length"]]
    with open(test, "r+b") as f:
        f.seek(extent["offset"] + guest - extent["start"])
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    report = tmp_path / "report.jsonl"
    server = serve("--on-mismatch", "reference", "--persistent", "--report", report, raw, test)
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    dump = tmp_path / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", mounted.path])
    run(["e2fsck", "-fn", mounted.path])
    mounted.unmount()
    assert same_tree(tree, dump)
    assert server.stop() == 1
    findings = [json.loads(x) for x in report.read_text().splitlines()]
    assert findings and all(f["sector"] == guest // 512 for f in findings), findings


def test_a_file_system_on_the_bug_server_meets_the_bug(
    tmp_path: Path, serve, bug_server, nbdfuse
) -> None:
    """ext4 built through nbdfuse on serve in front of the planted-bug server, then
    read back: the bug's corrupt read is caught at the sector its log names, and
    under ``reference`` the file system reads back whole."""
    raw, disk = tmp_path / "raw.img", tmp_path / "disk.raw"
    for p in (raw, disk):
        qemu_img("create", "-f", "raw", p, SIZE)
    tree = make_tree(tmp_path / "tree")
    bugs = bug_server(disk, bugs=[("neighbour-read", 40)])
    report = tmp_path / "report.jsonl"
    server = serve("--on-mismatch", "reference", "--persistent", "--report", report, raw, bugs.uri)
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, mounted.path])
    mounted.unmount()
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    dump = tmp_path / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", mounted.path])
    run(["e2fsck", "-fn", mounted.path])
    mounted.unmount()
    assert server.stop() == 1
    [fired] = bugs.fired()
    findings = [json.loads(x) for x in report.read_text().splitlines()]
    assert [f["sector"] for f in findings] == [fired["first_sector"]], (fired, findings)
    assert findings[0]["op"].startswith(f"read {fired['offset']} ")
    assert same_tree(tree, dump)


# --------------------------------------------------------------------------------------
# the command: signals, exit statuses, where it listens, what it refuses
# --------------------------------------------------------------------------------------


def test_sigint_stops_cleanly_with_a_summary(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", raw, test)
    run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "read -P 1 0 64k", server.uri])
    assert server.stop(signal.SIGINT) == 0
    lines = server.stderr().splitlines()
    assert lines[0].startswith("blkverify: serve: 3 requests from 1 client in "), lines
    assert "(1 read, 1 write, 1 flush); 0 findings; stopped by a signal (SIGINT)" in lines[0]
    assert lines[1].startswith(f"blkverify: serve: test {test} (qcow2): read 64.0 KiB, ")
    assert lines[2].startswith(f"blkverify: serve: raw {raw}: read 64.0 KiB, wrote 64.0 KiB")
    # The locks are gone: QEMU may write the image again.
    qemu_io(test, "write 0 512")


def test_a_second_signal_forces_the_exit(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", raw, test)
    # A client that asks for 256 MiB of replies and reads none: serve cannot
    # finish sending them, so the first signal's stop waits.
    s = nbd_connect(server.uri)
    for i in range(8):
        s.sendall(request(0, 0, 32 * MiB, cookie=i))
    time.sleep(0.5)
    os.kill(server.pid, signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None, "the first signal waits for the replies"
    started = time.monotonic()
    assert server.stop(signal.SIGTERM) == 2
    assert time.monotonic() - started < 5
    assert "second signal (SIGTERM)" in server.stderr()
    s.close()
    # Even a forced exit leaves no socket behind.
    socket_path = Path(server.uri.split("socket=", 1)[1])
    assert not socket_path.exists() and not socket_path.parent.exists()


def test_an_image_held_by_qemu_for_writing_is_refused(tmp_path: Path) -> None:
    raw, test = blank_pair(tmp_path)
    holder = subprocess.Popen(
        ["qemu-io", "-f", "qcow2", test], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdin is not None and holder.stdout is not None
        holder.stdin.write(b"length\n")
        holder.stdin.flush()
        assert holder.stdout.readline()
        refused = run_cli("serve", raw, test)
        assert refused.returncode == 2
        assert refused.stdout == ""
        assert 'Failed to get "write" lock' in refused.stderr, refused.stderr
    finally:
        holder.communicate(timeout=20)
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(timeout=20)


def test_tcp_on_a_free_port_and_without_persistent(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    server = serve("--port", "0", raw, test)
    assert server.uri.startswith("nbd://127.0.0.1:") and not server.uri.endswith(":0/")
    run(["qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", server.uri])
    # Not persistent: the last client left, serve ended by itself.
    assert server.wait(timeout=20) == 0
    assert "stopped by the last client left" in server.stderr()
    qemu_io(test, "read -P 9 0 4k")


def test_shared_limits_clients_and_multi_conn(tmp_path: Path, serve) -> None:
    raw, test = blank_pair(tmp_path)
    server = serve("--persistent", raw, test)
    holder = nbd_connect(server.uri)
    # libnbd shows the server's message in its debug output.
    refused = subprocess.run(
        ["nbdinfo", server.uri],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
    )
    assert refused.returncode != 0
    assert "serving its 1 client(s) already (--shared 1)" in refused.stderr, refused.stderr
    holder.close()
    info = run(["nbdinfo", "--json", server.uri]).stdout
    assert json.loads(info)["exports"][0]["can_multi_conn"] is False
    assert server.stop() == 0
    shared = serve("--persistent", "--shared", "2", raw, test)
    info = run(["nbdinfo", "--json", shared.uri]).stdout
    export = json.loads(info)["exports"][0]
    assert export["can_multi_conn"] is True
    assert export["block_size_minimum"] == 512
    assert shared.stop() == 0


def test_pid_file_report_and_export_name(tmp_path: Path, serve) -> None:
    raw, test, guest = flipped_qcow2(tmp_path)
    pid_file, report = tmp_path / "serve.pid", tmp_path / "findings.jsonl"
    server = serve(
        "--pid-file", pid_file, "--report", report, "--export-name", "disk one",
        "--on-mismatch", "eio", "--persistent", raw, test,
    )  # fmt: skip
    assert pid_file.read_text() == f"{server.pid}\n"
    assert server.uri.startswith("nbd+unix:///disk%20one?socket=")
    run(["qemu-io", "-f", "raw", "-c", "read 3M 4k", server.uri], check=False)
    run(["qemu-io", "-f", "raw", "-c", "read 3M 4k", server.uri], check=False)
    deadline = time.monotonic() + 10
    while len(report.read_text().splitlines()) < 2:
        assert time.monotonic() < deadline, "findings are written as they are found"
        time.sleep(0.05)
    assert server.stop() == 1
    assert not pid_file.exists()
    lines = [json.loads(x) for x in report.read_text().splitlines()]
    assert [f["connection"] for f in lines] == [1, 2]
    assert lines[0]["request"] < lines[1]["request"]
    assert all(f["sector"] == guest // 512 for f in lines)


def test_read_only_serves_a_format_we_only_read(tmp_path: Path, serve) -> None:
    raw, test = tmp_path / "raw.img", tmp_path / "test.vmdk"
    qemu_img("create", "-f", "raw", raw, 4 * MiB)
    qemu_io(raw, "write -P 0x5e 1M 1M", fmt="raw")
    qemu_img("convert", "-f", "raw", "-O", "vmdk", raw, test)
    refused = run_cli("serve", raw, test)
    assert refused.returncode == 2
    assert "blkverify cannot write vmdk images; serve it read-only (-r)" in refused.stderr
    server = serve("-r", "--persistent", raw, test)
    assert "Images are identical" in qemu_img("compare", "-F", "raw", raw, server.uri).stdout
    out = run(["qemu-io", "-f", "raw", "-c", "write 0 512", server.uri], check=False)
    assert out.returncode != 0
    assert server.stop() == 0


def test_errors_exit_2_before_listening(tmp_path: Path) -> None:
    raw, test = blank_pair(tmp_path)
    for args, fact in [
        ([raw, tmp_path / "missing.qcow2"], "No such file or directory"),
        (["--bind", "0.0.0.0", raw, test], "--bind needs --port"),
        (["blkverify:only-one"], "blkverify:RAW:TEST"),
        (["--socket", raw, raw, test], "already exists"),
    ]:
        out = run_cli("serve", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stdout == ""
        assert fact in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------
# the Python API, as a driver's test suite would use it
# --------------------------------------------------------------------------------------


def test_bv_serve_as_a_fixture(tmp_path: Path) -> None:
    raw, test, guest = flipped_qcow2(tmp_path)
    with bv.serve(raw, test, persistent=True, on_mismatch="eio") as server:
        assert isinstance(server, bv.Server)
        run(["qemu-io", "-f", "raw", "-c", "read -P 0x3c 0 64k", server.uri])
        assert server.findings == []
        run(["qemu-io", "-f", "raw", "-c", "read 3M 64k", server.uri], check=False)
        [finding] = server.findings
    assert isinstance(finding, bv.ServeFinding)
    assert finding.sector == guest // 512
    assert finding.connection == 2
    summary = server.summary
    assert isinstance(summary, bv.ServeSummary)
    assert summary.findings == 1 and summary.connections == 2
    assert summary.test["read"] == summary.raw["read"] == 2 * 64 * KiB
    assert summary.stopped_by == "the Python context ended"
    with pytest.raises(ValueError, match="blkverify:RAW:TEST"):
        bv.serve(raw)
    with pytest.raises(ValueError, match="on_mismatch"):
        bv.serve(raw, test, on_mismatch="panic")
