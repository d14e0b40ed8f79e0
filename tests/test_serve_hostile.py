"""``blkverify serve`` against hostile clients, in raw bytes over its socket (issue
21): each bad request gets the protocol's error or a hang-up, ``blkverify serve``
stays up, and the next client (``qemu-io``) works. Nothing outside a request's
range is ever written: around refused requests and at the very end of the export,
both images stay byte-identical to what they held, but for the bytes the accepted
writes named. The Rust tests (src/serve/tests/hostile.rs) go through every case
one by one; these run the command a user runs.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

from conftest import KiB, MiB, qemu_img, qemu_io, run
from test_serve import recv_exactly, request

SIZE = 40 * MiB
READ, WRITE, DISC, FLUSH, TRIM, CACHE, WRITE_ZEROES, BLOCK_STATUS = range(8)
FLAG_NO_HOLE, FLAG_DF = 2, 4
NBD_EINVAL, NBD_ENOSPC, NBD_EOVERFLOW = 22, 28, 75


def structured_connect(uri: str) -> socket.socket:
    """Through the handshake with structured replies, asking for the block size
    (so the server holds the client to 512-byte alignment)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(uri.split("socket=", 1)[1])
    assert recv_exactly(s, 18)[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 3))
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 8, 0))
    assert struct.unpack(">QIII", recv_exactly(s, 20))[2] == 1
    go = struct.pack(">IHH", 0, 1, 3)
    s.sendall(struct.pack(">QII", 0x49484156454F5054, 7, len(go)) + go)
    while True:
        _, _, reply, length = struct.unpack(">QIII", recv_exactly(s, 20))
        recv_exactly(s, length)
        if reply == 1:
            return s
        assert reply == 3, reply


def error_of(s: socket.socket, command: int, offset: int, length: int, flags: int = 0,
             data: bytes = b"") -> int:  # fmt: skip
    """Send one request (a write's data too) and take its reply's error: a simple
    reply (serve answers writes with one) or structured chunks."""
    s.sendall(request(command, offset, length, cookie=9, flags=flags) + data)
    error = 0
    while True:
        magic = struct.unpack(">I", recv_exactly(s, 4))[0]
        if magic == 0x67446698:
            error, cookie = struct.unpack(">IQ", recv_exactly(s, 12))
            assert cookie == 9 and (error or command != READ)
            return error
        assert magic == 0x668E33EF, hex(magic)
        chunk_flags, kind, cookie, length = struct.unpack(">HHQI", recv_exactly(s, 16))
        assert cookie == 9
        payload = recv_exactly(s, length)
        if kind & 0x8000:
            error = struct.unpack(">I", payload[:4])[0]
        if chunk_flags & 1:
            return error


def closed(s: socket.socket) -> bool:
    """The server hung up: the next read gives EOF (or a reset)."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def pattern_pair(d: Path) -> tuple[Path, Path, bytes]:
    """A raw reference and a qcow2 holding the same non-zero bytes everywhere (so
    that a stray write of anything shows), and those bytes."""
    raw, test = d / "raw.img", d / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, SIZE)
    qemu_img("create", "-f", "qcow2", test, SIZE)
    qemu_io(raw, f"write -P 0xa5 0 {SIZE}", fmt="raw")
    qemu_io(test, f"write -P 0xa5 0 {SIZE}")
    return raw, test, raw.read_bytes()


def qemu_io_works(uri: str, offset: int) -> None:
    out = run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5c {offset} 4k",
               "-c", f"read -P 0x5c {offset} 4k", uri])  # fmt: skip
    assert "failed" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_nothing_outside_a_requests_range_is_written(tmp_path: Path, serve) -> None:
    raw, test, before = pattern_pair(tmp_path)
    server = serve("--persistent", raw, test)
    s = structured_connect(server.uri)
    end = SIZE
    # Accepted: the last 4 KiB, then the very last sector, then a write between
    # two refused ones.
    assert error_of(s, WRITE, end - 4 * KiB, 4 * KiB, data=b"\x11" * (4 * KiB)) == 0
    assert error_of(s, WRITE, end - 512, 512, data=b"\x22" * 512) == 0
    # Refused, their data read through and thrown away: past the end, straddling
    # it, a flag on the wrong command, unaligned, over 32 MiB.
    assert error_of(s, WRITE, end, 512, data=b"\x33" * 512) == NBD_ENOSPC
    assert error_of(s, WRITE, end - 512, 1024, data=b"\x33" * 1024) == NBD_ENOSPC
    assert error_of(s, WRITE, 1 * MiB, 4 * KiB, FLAG_NO_HOLE, b"\x33" * (4 * KiB)) == NBD_EINVAL
    assert error_of(s, WRITE, 1 * MiB, 4 * KiB, FLAG_DF, b"\x33" * (4 * KiB)) == NBD_EINVAL
    assert error_of(s, WRITE, 2 * MiB + 100, 512, data=b"\x33" * 512) == NBD_EINVAL
    big = 32 * MiB + 512
    assert error_of(s, WRITE, 0, big, data=b"\x33" * big) == NBD_EINVAL
    assert error_of(s, WRITE_ZEROES, end - 512, 1024) == NBD_ENOSPC
    assert error_of(s, WRITE_ZEROES, 0, big) == NBD_EOVERFLOW
    assert error_of(s, TRIM, end - 512, 1024) == NBD_EINVAL
    assert error_of(s, CACHE, 0, big) == NBD_EOVERFLOW
    assert error_of(s, WRITE, 2 * MiB, 4 * KiB, data=b"\x55" * (4 * KiB)) == 0
    assert error_of(s, WRITE, 2 * MiB + 4 * KiB, 4 * KiB, 0x40, b"\x33" * (4 * KiB)) == NBD_EINVAL
    # Bad magic: hung up on, the rest never read.
    s.sendall(b"\x00" * 28 + request(WRITE, 0, 512) + b"\x33" * 512)
    assert closed(s)
    s.close()
    qemu_io_works(server.uri, 3 * MiB)
    assert server.stop() == 0
    stderr = server.stderr()
    assert "0 findings" in stderr and "11 requests refused" in stderr, stderr
    expected = bytearray(before)
    expected[end - 4 * KiB : end - 512] = b"\x11" * (4 * KiB - 512)
    expected[end - 512 : end] = b"\x22" * 512
    expected[2 * MiB : 2 * MiB + 4 * KiB] = b"\x55" * (4 * KiB)
    expected[3 * MiB : 3 * MiB + 4 * KiB] = b"\x5c" * (4 * KiB)
    assert raw.read_bytes() == expected
    back = tmp_path / "test-back.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", test, back)
    assert back.read_bytes() == expected
    qemu_img("check", test)


def test_hostile_sessions_leave_serve_up_for_the_next_client(tmp_path: Path, serve) -> None:
    raw, test, _ = pattern_pair(tmp_path)
    server = serve("--persistent", "--shared", "2", raw, test)
    path = server.uri.split("socket=", 1)[1]

    def raw_client() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(path)
        return s

    sessions = [
        # Not NBD at all: an HTTP request instead of the client flags.
        lambda s: s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        # Unknown client flags.
        lambda s: (recv_exactly(s, 18), s.sendall(struct.pack(">I", 0xFFFF))),
        # An option with a bad magic.
        lambda s: (recv_exactly(s, 18), s.sendall(struct.pack(">I", 3) + b"\x00" * 16)),
        # An option claiming 1 GiB of data.
        lambda s: (
            recv_exactly(s, 18),
            s.sendall(struct.pack(">IQII", 3, 0x49484156454F5054, 7, 1 << 30)),
        ),
        # 300 options without ever choosing an export.
        lambda s: (
            recv_exactly(s, 18),
            s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 3, 0) * 300),
        ),
    ]
    for i, session in enumerate(sessions):
        s = raw_client()
        try:
            session(s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        # The server hangs up (after any replies it owed).
        s.settimeout(30)
        try:
            while s.recv(1 << 16):
                pass
        except ConnectionResetError:
            pass
        s.close()
        qemu_io_works(server.uri, i * 64 * KiB)
    # In transmission: a truncated header, then the client leaves.
    s = structured_connect(server.uri)
    s.sendall(request(WRITE, 0, 4096)[:13])
    s.close()
    qemu_io_works(server.uri, 1 * MiB)
    assert server.stop() == 0
    stderr = server.stderr()
    assert "0 findings" in stderr and "1 requests cut short" in stderr, stderr
    assert "Traceback" not in stderr and "panicked" not in stderr
