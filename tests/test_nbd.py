"""The NBD client driver, against real servers (qemu-nbd) and a misbehaving one.

qemu-nbd serves images with QEMU's own drivers; reading them through our client
must give exactly what ``qemu-img convert -O raw`` gives, and verify must work
with an NBD test side. A fake server checks that protocol faults give a clear
error and never a hang.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, flip_byte, qemu_img, qemu_io, qemu_map, run_cli, stopped_at_teardown

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054


def wait_listening(sock: Path, proc: subprocess.Popen, what: str) -> None:
    """Wait until the server accepts connections (the socket file appears at bind(),
    a moment before listen())."""
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        if sock.exists():
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(sock))
                return
            except OSError:
                pass
            finally:
                probe.close()
        time.sleep(0.02)


class QemuNbd:
    """``qemu-nbd --persistent`` on a unix socket, stopped on exit."""

    def __init__(self, image: Path, fmt: str, sock: Path, *extra: str) -> None:
        self.sock = sock
        self.log = sock.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [
                    "qemu-nbd",
                    "--persistent",
                    "--shared=4",
                    "-k",
                    str(sock),
                    "-f",
                    fmt,
                    *extra,
                    str(image),
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        try:
            wait_listening(sock, self.proc, "qemu-nbd")
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"qemu-nbd did not start: {self.log.read_text()!r}") from None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., QemuNbd]]:
    sockets = (tmp_path / f"nbd{i}.sock" for i in itertools.count())

    def make(image: Path, fmt: str = "qcow2", *extra: str) -> QemuNbd:
        return QemuNbd(image, fmt, next(sockets), *extra)

    with stopped_at_teardown(make, QemuNbd.stop) as start:
        yield start


@pytest.mark.parametrize(
    "name", ["qcow2_c64k", "qcow2_zstd", "qcow2_extl2_backing", "chain_3level", "raw_sparse"]
)
def test_reads_match_qemu_img_convert(zoo, served, name: str) -> None:
    entry = zoo[name]
    server = served(entry.path, entry.fmt)
    expected = entry.expected.read_bytes()
    with bv.open(server.uri) as img:
        assert img.format == "nbd"
        assert img.size == len(expected)
        assert img.read(0, img.size) == expected
        assert img.read(12345, 70000) == expected[12345 : 12345 + 70000]


def test_verify_through_nbd_finds_the_flipped_byte(zoo, served, tmp_path: Path) -> None:
    entry = zoo["qcow2_c64k"]
    image = tmp_path / "flip.qcow2"
    image.write_bytes(entry.path.read_bytes())
    extent = next(e for e in qemu_map(image) if e["data"] and "offset" in e)
    guest = extent["start"] + 700
    flip_byte(image, extent["offset"] + 700)
    server = served(image, "qcow2")
    rep = bv.verify(entry.expected, server.uri)
    assert not rep.identical
    assert rep.test_format == "nbd"
    assert rep.mismatches[0].first_byte == guest
    assert rep.mismatches[0].sector == guest // 512
    cli = run_cli("verify", "--json", entry.expected, server.uri)
    assert cli.returncode == 1, cli.stderr


def test_writes_through_nbd_land_in_the_image(served, tmp_path: Path) -> None:
    image = tmp_path / "w.qcow2"
    qemu_img("create", "-f", "qcow2", image, "4M")
    server = served(image, "qcow2")
    with bv.open(server.uri, read_only=False) as img:
        img.write(4096 + 3, b"hello nbd")
        img.write_zeroes(1 * MiB, 64 * 1024)
        img.discard(2 * MiB, 64 * 1024)
        img.flush()
        assert img.read(4096, 16) == b"\0\0\0hello nbd\0\0\0\0"
    server.stop()
    out = qemu_io(image, "read -P 0x68 4099 1", "read -P 0 1M 64k").stdout
    assert "Pattern verification failed" not in out
    check = subprocess.run(["qemu-img", "check", str(image)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_read_only_export_refuses_a_writable_open(zoo, served) -> None:
    server = served(zoo["qcow2_c64k"].path, "qcow2", "--read-only")
    with pytest.raises(OSError) as info:
        bv.open(server.uri, read_only=False)
    assert info.value.errno == 30  # EROFS
    with bv.open(server.uri) as img:
        with pytest.raises(OSError):
            img.write(0, b"x")


# ---------------------------------------------------------------------------------------------
# A misbehaving server
# ---------------------------------------------------------------------------------------------


class FakeServer:
    """A unix-socket server that runs ``behaviour(conn)`` for each client."""

    def __init__(self, path: Path, behaviour: Callable[[socket.socket], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.path = path
        self.behaviour = behaviour
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            try:
                self.behaviour(conn)
            except OSError:
                pass

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


def recv_exact(conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise OSError("client left")
        data += chunk
    return data


def handshake(conn: socket.socket, size: int = 1 * MiB) -> None:
    """A minimal fixed-newstyle server: refuses structured replies, answers GO."""
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1))
    recv_exact(conn, 4)
    while True:
        _, opt, length = struct.unpack(">QII", recv_exact(conn, 16))
        recv_exact(conn, length)
        reply_magic = 0x3E889045565A9
        if opt == 7:  # GO
            info = struct.pack(">HQH", 0, size, 1 | 4)
            conn.sendall(struct.pack(">QIII", reply_magic, opt, 3, len(info)) + info)
            conn.sendall(struct.pack(">QIII", reply_magic, opt, 1, 0))
            return
        conn.sendall(struct.pack(">QIII", reply_magic, opt, (1 << 31) | 1, 0))


def read_request(conn: socket.socket) -> tuple[int, int, int, int]:
    _, _, cmd, cookie, offset, length = struct.unpack(">IHHQQI", recv_exact(conn, 28))
    return cmd, cookie, offset, length


def _bad_greeting(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    time.sleep(2)


def _drop_after_handshake(conn: socket.socket) -> None:
    handshake(conn)
    read_request(conn)
    conn.close()


def _short_reply(conn: socket.socket) -> None:
    handshake(conn)
    _, cookie, _, length = read_request(conn)
    conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie) + b"\0" * (length // 2))
    conn.close()


def _bad_reply_magic(conn: socket.socket) -> None:
    handshake(conn)
    _, cookie, _, _ = read_request(conn)
    conn.sendall(struct.pack(">IIQ", 0xDEADBEEF, 0, cookie))
    time.sleep(2)


def _wrong_cookie(conn: socket.socket) -> None:
    handshake(conn)
    _, cookie, _, length = read_request(conn)
    conn.sendall(struct.pack(">IIQ", 0x67446698, 0, cookie + 99) + b"\0" * length)
    time.sleep(2)


def _silent(conn: socket.socket) -> None:
    handshake(conn)
    read_request(conn)
    time.sleep(5)


def _server_error(conn: socket.socket) -> None:
    handshake(conn)
    while True:
        _, cookie, _, _ = read_request(conn)
        conn.sendall(struct.pack(">IIQ", 0x67446698, 5, cookie))  # EIO


@pytest.mark.parametrize(
    ("behaviour", "during_open", "words"),
    [
        (_bad_greeting, True, "bad magic"),
        (_drop_after_handshake, False, "closed the connection"),
        (_short_reply, False, "closed the connection"),
        (_bad_reply_magic, False, "bad magic"),
        (_wrong_cookie, False, "replied to cookie"),
        (_silent, False, "did not answer"),
    ],
)
def test_misbehaving_server_gives_a_clear_error_quickly(
    tmp_path: Path, behaviour, during_open: bool, words: str
) -> None:
    server = FakeServer(tmp_path / "fake.sock", behaviour)
    uri = f"nbd+unix:///?socket={server.path}"
    started = time.monotonic()
    try:
        with pytest.raises((bv.Error, OSError)) as info:
            img = bv.open(uri, timeout=1.0)
            assert not during_open, "open should have failed"
            img.read(0, 4096)
        assert words in str(info.value)
    finally:
        server.close()
    assert time.monotonic() - started < 4


def test_server_errors_are_os_errors_with_errno(tmp_path: Path) -> None:
    server = FakeServer(tmp_path / "err.sock", _server_error)
    try:
        with bv.open(f"nbd+unix:///?socket={server.path}", timeout=2.0) as img:
            for _ in range(2):  # the connection stays usable after a server error
                with pytest.raises(OSError) as info:
                    img.read(0, 512)
                assert info.value.errno == 5
    finally:
        server.close()


# ---------------------------------------------------------------------------------------------
# Many requests in flight on one connection
# ---------------------------------------------------------------------------------------------

SIMPLE_REPLY = 0x67446698
STRUCTURED_REPLY = 0x668E33EF


class HoldingServer:
    """A fake NBD server over a bytearray that holds back its replies until ``hold``
    requests are outstanding (or none has arrived for ``idle`` seconds), then answers
    them newest first. A client with one request in flight would see every reply
    ``idle`` late; one that keeps ``hold`` in flight is answered at once, out of order.
    ``max_outstanding`` is the most requests it ever held at once."""

    def __init__(self, path: Path, size: int, hold: int, idle: float = 0.05) -> None:
        self.data = bytearray(size)
        self.hold, self.idle = hold, idle
        self.max_outstanding = 0
        self.server = FakeServer(path, self._serve)
        self.uri = f"nbd+unix:///?socket={path}"

    def _serve(self, conn: socket.socket) -> None:
        handshake(conn, len(self.data))
        conn.settimeout(self.idle)
        pending: list[tuple[int, int, int, int, bytes]] = []
        while True:
            try:
                cmd, cookie, offset, length = read_request(conn)
            except TimeoutError:
                self._answer(conn, pending)
                continue
            if cmd == 2:  # disconnect
                return
            payload = recv_exact(conn, length) if cmd == 1 else b""
            pending.append((cmd, cookie, offset, length, payload))
            self.max_outstanding = max(self.max_outstanding, len(pending))
            if len(pending) >= self.hold:
                self._answer(conn, pending)

    def _answer(self, conn: socket.socket, pending: list) -> None:
        conn.settimeout(None)  # the idle timeout is for waiting, not for sending
        for cmd, cookie, offset, length, payload in reversed(pending):
            data = b""
            if cmd == 0:
                data = bytes(self.data[offset : offset + length])
            elif cmd == 1:
                self.data[offset : offset + length] = payload
            conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, 0, cookie) + data)
        pending.clear()
        conn.settimeout(self.idle)

    def close(self) -> None:
        self.server.close()


def test_exercise_keeps_queue_depth_requests_in_flight_on_one_connection(
    tmp_path: Path,
) -> None:
    size = 8 * MiB
    server = HoldingServer(tmp_path / "hold.sock", size, hold=8)
    raw = tmp_path / "hold.raw"
    raw.write_bytes(bytes(size))
    try:
        res = bv.exercise(
            f"blkverify:{raw}:{server.uri}",
            ops=400,
            seed=7,
            mix="read=70,write=30",
            size_mix="4k=1",
            queue_depth=8,
            timeout=5.0,
        )
    finally:
        server.close()
    assert res.clean, res.mismatches
    assert server.max_outstanding == 8
    assert bytes(server.data) == raw.read_bytes()  # and every write landed


def _concurrent_reads(uri: str, offsets: list[int], length: int = 4096) -> list:
    """Read at each offset from its own thread on one image; each result is the
    bytes read or the exception raised."""
    results: list = [None] * len(offsets)
    with bv.open(uri, timeout=1.0) as img:

        def read(i: int) -> None:
            try:
                results[i] = img.read(offsets[i], length)
            except (bv.Error, OSError) as e:
                results[i] = e

        threads = [threading.Thread(target=read, args=(i,)) for i in range(len(offsets))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=10)
    return results


def test_replies_in_any_order_reach_their_requests(tmp_path: Path) -> None:
    server = HoldingServer(tmp_path / "order.sock", 1 * MiB, hold=4, idle=2.0)
    for i in range(16):
        server.data[i * 4096 : (i + 1) * 4096] = bytes([i + 1]) * 4096
    offsets = [3 * 4096, 9 * 4096, 0, 14 * 4096]
    try:
        results = _concurrent_reads(server.uri, offsets)
    finally:
        server.close()
    assert [r[:1] for r in results] == [bytes([o // 4096 + 1]) for o in offsets]
    assert server.max_outstanding == 4  # all four were in flight, answered newest first


def _structured_handshake(conn: socket.socket, size: int) -> None:
    """A fixed-newstyle server that accepts structured replies, then GO."""
    conn.sendall(struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 1))
    recv_exact(conn, 4)
    reply_magic = 0x3E889045565A9
    while True:
        _, opt, length = struct.unpack(">QII", recv_exact(conn, 16))
        recv_exact(conn, length)
        if opt == 8:  # STRUCTURED_REPLY: yes
            conn.sendall(struct.pack(">QIII", reply_magic, opt, 1, 0))
            continue
        if opt != 7:  # anything but GO (block status contexts): unsupported
            conn.sendall(struct.pack(">QIII", reply_magic, opt, (1 << 31) | 1, 0))
            continue
        info = struct.pack(">HQH", 0, size, 1 | 4)
        conn.sendall(struct.pack(">QIII", reply_magic, opt, 3, len(info)) + info)
        conn.sendall(struct.pack(">QIII", reply_magic, opt, 1, 0))
        return


def _chunk(cookie: int, kind: int, payload: bytes, done: bool = False) -> bytes:
    return struct.pack(">IHHQI", STRUCTURED_REPLY, int(done), kind, cookie, len(payload)) + payload


def _interleaved_chunks(conn: socket.socket) -> None:
    """Two reads' structured replies, chunks interleaved and finished in reverse."""
    _structured_handshake(conn, 1 * MiB)
    (_, a, off_a, len_a), (_, b, off_b, len_b) = read_request(conn), read_request(conn)
    half = len_b // 2
    conn.sendall(
        _chunk(b, 1, struct.pack(">Q", off_b) + b"B" * half)  # DATA, b's first half
        + _chunk(a, 1, struct.pack(">Q", off_a) + b"A" * len_a)  # DATA, all of a
        + _chunk(b, 2, struct.pack(">QI", off_b + half, len_b - half))  # HOLE, b's rest
        + _chunk(b, 0, b"", done=True)
        + _chunk(a, 0, b"", done=True)
    )
    time.sleep(2)


def test_structured_chunks_of_two_requests_interleaved(tmp_path: Path) -> None:
    server = FakeServer(tmp_path / "chunks.sock", _interleaved_chunks)
    try:
        results = _concurrent_reads(f"nbd+unix:///?socket={server.path}", [0, 64 * 1024])
    finally:
        server.close()
    got = sorted(results, key=lambda r: r[:1])
    assert got == [b"A" * 4096, b"B" * 2048 + bytes(2048)]


def _unknown_cookie_after_four(conn: socket.socket) -> None:
    handshake(conn)
    for _ in range(4):
        read_request(conn)
    conn.sendall(struct.pack(">IIQ", SIMPLE_REPLY, 0, 0xBAD) + bytes(4096))
    time.sleep(3)


def _drop_after_four(conn: socket.socket) -> None:
    handshake(conn)
    for _ in range(4):
        read_request(conn)
    conn.close()


def _silent_after_four(conn: socket.socket) -> None:
    handshake(conn)
    for _ in range(4):
        read_request(conn)
    time.sleep(5)


@pytest.mark.parametrize(
    ("behaviour", "words"),
    [
        (
            _unknown_cookie_after_four,
            "the server replied to cookie 0xbad, which no request in flight has",
        ),
        (_drop_after_four, "the server closed the connection"),
        (_silent_after_four, "the server did not answer within 1 s"),
    ],
)
def test_a_failing_connection_fails_every_request_in_flight_by_name(
    tmp_path: Path, behaviour, words: str
) -> None:
    server = FakeServer(tmp_path / "f.sock", behaviour)
    offsets = [0, 8192, 65536, 12288]
    started = time.monotonic()
    try:
        results = _concurrent_reads(f"nbd+unix:///?socket={server.path}", offsets)
    finally:
        server.close()
    assert time.monotonic() - started < 4
    for offset, result in zip(offsets, results, strict=True):
        assert isinstance(result, OSError), result
        assert f"nbd: read at offset {offset:#x} (4096 bytes): {words}" in str(result)


def test_cli_error_for_unreachable_server(tmp_path: Path) -> None:
    raw = tmp_path / "r.raw"
    raw.write_bytes(bytes(4096))
    uri = f"nbd+unix:///?socket={tmp_path / 'nobody.sock'}"
    result = run_cli("verify", raw, uri)
    assert result.returncode == 2
    assert result.stderr.startswith("blkverify: error:")
    assert "nobody.sock" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.path.exists(raw)


class Nbdkit:
    """``nbdkit`` on a unix socket in the foreground, stopped on exit."""

    def __init__(self, sock: Path, *plugin_args: str) -> None:
        self.sock = sock
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "-U", str(sock), *plugin_args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(sock, self.proc, "nbdkit")
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"nbdkit did not start: {plugin_args}") from None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


def test_nbdkit_memory_is_a_second_independent_server(tmp_path: Path) -> None:
    server = Nbdkit(tmp_path / "mem.sock", "memory", "4M")
    reference = bytearray(4 * MiB)
    try:
        with bv.open(server.uri, read_only=False) as img:
            assert img.size == 4 * MiB
            for offset, data in [
                (0, b"\x11" * 4096),
                (5000, b"abc" * 1000),
                (3 * MiB, b"z" * 65536),
            ]:
                img.write(offset, data)
                reference[offset : offset + len(data)] = data
            img.write_zeroes(5000, 100)
            reference[5000:5100] = bytes(100)
            img.flush()
            assert img.read(0, img.size) == bytes(reference)
        raw = tmp_path / "ref.raw"
        raw.write_bytes(bytes(reference))
        rep = bv.verify(raw, server.uri)
        assert rep.identical
        reference[3 * MiB + 10] ^= 1
        raw.write_bytes(bytes(reference))
        rep = bv.verify(raw, server.uri)
        assert rep.mismatches[0].first_byte == 3 * MiB + 10
    finally:
        server.stop()


def test_exercise_at_queue_depth_8_against_qemu_nbd(served, tmp_path: Path) -> None:
    image = tmp_path / "qd.qcow2"
    raw = tmp_path / "qd.raw"
    qemu_img("create", "-f", "qcow2", image, "8M")
    raw.write_bytes(bytes(8 * MiB))
    server = served(image, "qcow2", "--cache=writeback")
    result = run_cli(
        "exercise",
        "--json",
        "--ops",
        "1500",
        "--seed",
        "5",
        "--queue-depth",
        "8",
        "--mix",
        "read=70,write=30",
        "--size-mix",
        "4k=1",
        f"blkverify:{raw}:{server.uri}",
    )
    assert result.returncode == 0, result.stderr
    server.stop()
    # QEMU agrees: the image it served now holds the reference's bytes.
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, image],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_nbdkit_answers_a_later_read_before_a_slow_write(tmp_path: Path) -> None:
    # nbdkit runs requests on a pool of threads: with writes delayed, the read
    # sent after the write is answered first, on the same connection.
    server = Nbdkit(tmp_path / "slow.sock", "--filter=delay", "memory", "1M", "delay-write=800ms")
    finished: list[str] = []
    try:
        with bv.open(server.uri, read_only=False, timeout=5.0) as img:
            writer = threading.Thread(
                target=lambda: (img.write(0, b"w" * 4096), finished.append("write"))
            )
            writer.start()
            time.sleep(0.2)
            assert img.read(65536, 4096) == bytes(4096)
            finished.append("read")
            writer.join(timeout=10)
            assert img.read(0, 4096) == b"w" * 4096
    finally:
        server.stop()
    assert finished == ["read", "write"]


def test_exercise_at_queue_depth_8_against_nbdkit_with_slow_writes(tmp_path: Path) -> None:
    raw = tmp_path / "slow.raw"
    raw.write_bytes(bytes(4 * MiB))
    server = Nbdkit(tmp_path / "qd.sock", "--filter=delay", "memory", "4M", "delay-write=2ms")
    try:
        res = bv.exercise(
            f"blkverify:{raw}:{server.uri}",
            ops=600,
            seed=9,
            mix="read=70,write=30",
            size_mix="4k=1",
            queue_depth=8,
        )
        assert res.clean, res.mismatches
        assert res.verified and res.ops == 600
        assert bv.verify(raw, server.uri).identical
    finally:
        server.stop()


def test_nbdkit_error_filter_fails_reads_with_eio(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(b"\x5a" * MiB)
    server = Nbdkit(
        tmp_path / "err.sock",
        "--filter=error",
        "file",
        str(image),
        "error-pread=EIO",
        "error-pread-rate=100%",
    )
    try:
        with bv.open(server.uri) as img:
            with pytest.raises(OSError) as info:
                img.read(0, 4096)
            assert info.value.errno == 5
        # A test side that fails to read is a finding (exit 1), not an error.
        result = run_cli("verify", image, server.uri)
        assert result.returncode == 1, result.stderr
        assert "read error in sector 0" in result.stdout
    finally:
        server.stop()
