"""Write the trace_file regression inputs (fuzz/regressions/trace_file/).

    python scripts/seed_trace_regressions.py   (from the repository root; needs qemu-img,
                                                qemu-io, and blkverify installed)

`cargo test` replays every file there (tests/fuzz_regressions.rs). The `valid-*` inputs are
traces `blkverify serve --trace` recorded of qemu-io and qemu-img clients (one cut short
in a record, as a kill leaves it: it must parse, up to its last whole record); the `bad-*`
inputs are copies with one record damaged, most with their checksum redone so that the
damage itself is what is found, and must be refused with an error naming the file. The
files are committed; rerun this only to change the set, and commit the result.
"""

from __future__ import annotations

import random
import struct
import subprocess
import tempfile
from pathlib import Path

import blkverify_rs as bv

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fuzz/regressions/trace_file"
PREAMBLE = 12


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def records(trace: bytes) -> list[bytes]:
    """The payloads of ``trace``'s whole records."""
    out, at = [], PREAMBLE
    while at + 8 <= len(trace):
        (length,) = struct.unpack_from("<I", trace, at)
        out.append(trace[at + 8 : at + 8 + length])
        at += 8 + length
    return out


def assemble(payloads: list[bytes], preamble: bytes = b"BVTRACE\0" + struct.pack("<I", 1)) -> bytes:
    """A trace of ``payloads``, each framed with its checksum."""
    out = bytearray(preamble)
    for p in payloads:
        length = struct.pack("<I", len(p))
        out += length + struct.pack("<I", crc32c(length + p)) + p
    return bytes(out)


def request_fields(p: bytes) -> tuple[int, int, int, int, int, int]:
    """number, connection, command, flags, offset, length of a request payload."""
    return struct.unpack_from("<QQHHQI", p, 1)


def with_fields(p: bytes, **changes: int) -> bytes:
    names = ("number", "connection", "command", "flags", "offset", "length")
    values = dict(zip(names, request_fields(p), strict=True))
    values.update(changes)
    return p[:1] + struct.pack("<QQHHQI", *(values[n] for n in names)) + p[33:]


def record_traces(tmp: Path) -> dict[str, bytes]:
    raw, test = tmp / "raw.img", tmp / "test.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", raw, "4M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", test, "4M"], check=True)
    small = tmp / "small.bvt"
    with bv.serve(raw, test, trace=small, persistent=True) as server:
        commands = [
            "write -P 0x11 0 64k",  # 16 blocks, 15 of them repeats
            "write -P 0x11 128k 8k",  # repeats of an earlier write's block
            "write -z 256k 64k",
            "write -P 0x22 -f 300k 1000",  # FUA, a short tail
            "discard 64k 64k",
            "flush",
            "read 0 64k",
            "aio_write -P 0x33 1M 4k",
            "aio_flush",
        ]
        subprocess.run(
            ["qemu-io", "-f", "raw", *(a for c in commands for a in ("-c", c)), server.uri],
            check=True,
            capture_output=True,
        )
        # Bytes that do not compress (stored as they are), text that does, and
        # block status (qemu-img map).
        noise = tmp / "noise.raw"
        noise.write_bytes(random.Random(22).randbytes(4096))
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -s {noise} 3M 4k", server.uri],
            check=True,
            capture_output=True,
        )
        text = tmp / "text.raw"
        text.write_bytes(b"".join(b"blkverify trace line %d\n" % i for i in range(3000)))
        subprocess.run(
            ["qemu-io", "-f", "raw", "-c", f"write -s {text} 2M 64k", server.uri],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            ["qemu-img", "map", "-f", "raw", server.uri], check=True, capture_output=True
        )
    empty = tmp / "empty.bvt"
    with bv.serve(raw, test, trace=empty, persistent=True):
        pass
    return {"small": small.read_bytes(), "empty": empty.read_bytes()}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        traces = record_traces(Path(d))
    small = traces["small"]
    payloads = records(small)
    header, requests, end = payloads[0], payloads[1:-1], payloads[-1]
    writes = [i for i, p in enumerate(requests) if request_fields(p)[2] == 1]
    no_data = next(p for p in requests if request_fields(p)[2] != 1)
    # A write stored as it is whose first block is new (its bytes follow the tags).
    stored = next(requests[i] for i in writes if requests[i][33:35] == b"\0\0")
    inputs: dict[str, bytes] = {
        "valid-small": small,
        "valid-empty": traces["empty"],
        # Cut inside the third request record: read up to the second.
        "valid-cut": small[: len(assemble(payloads[:3])) + 20],
        # Cut before the end record: no end record.
        "valid-no-end": assemble(payloads[:-1]),
        # The file system extended the file, the data never came: zeros to the end.
        "valid-zero-tail": assemble(payloads[:-1]) + bytes(4096),
        "bad-magic": b"BVTRACX\0" + small[8:],
        "bad-version": small[:8] + struct.pack("<I", 9) + small[12:],
        "bad-truncated-header": small[:6],
        "bad-torn-header-record": small[: PREAMBLE + 30],
        "bad-checksum": bytearray(small),
        "bad-absurd-length": bytearray(small),
        "bad-zero-length": bytearray(small),
        "bad-record-type": assemble([header, b"\x09" + requests[0][1:], *requests[1:], end]),
        "bad-second-header": assemble([header, header, *requests, end]),
        "bad-block-size": assemble([header[:17] + struct.pack("<I", 512) + header[21:], end]),
        "bad-command": assemble([header, with_fields(requests[0], command=2), *requests[1:], end]),
        "bad-flags": assemble([header, with_fields(requests[0], flags=0x80), *requests[1:], end]),
        "bad-past-the-export": assemble(
            [header, with_fields(requests[1], offset=4 << 20), *requests[2:], end]
        ),
        "bad-numbers-do-not-grow": assemble(
            [header, requests[0], with_fields(no_data, number=request_fields(requests[0])[0])]
        ),
        "bad-flush-with-range": assemble(
            [
                header,
                *(
                    with_fields(p, offset=512, length=512) if request_fields(p)[2] == 3 else p
                    for p in requests
                ),
            ]
        ),
        "bad-record-after-end": assemble([*payloads, requests[-1]]),
        "bad-end-miscounts": assemble([header, *requests[:-1], end]),
        "bad-data-after-a-read": assemble(
            [header, *(p + b"x" if request_fields(p)[2] == 0 else p for p in requests), end]
        ),
        "bad-write-without-data": assemble(
            [header, requests[writes[0]][:33], *requests[writes[0] + 1 :]]
        ),
        "bad-data-encoding": assemble(
            [header, requests[writes[0]][:33] + b"\x07" + requests[writes[0]][34:]]
        ),
        "bad-repeat-of-an-unknown-block": assemble(
            [header, *(p for i, p in enumerate(requests) if i != writes[0])]
        ),
        "bad-short-data": assemble([header, stored[:-10]]),
        "bad-long-data": assemble([header, stored + b"more"]),
    }
    # Damage inside a record, with the checksum left as it was.
    middle = len(small) // 2
    inputs["bad-checksum"][middle] ^= 0x5A
    second = PREAMBLE + 8 + len(header)
    inputs["bad-absurd-length"][second : second + 4] = struct.pack("<I", 0xFFFFFFF0)
    inputs["bad-zero-length"][second : second + 4] = struct.pack("<I", 0)
    for name, data in inputs.items():
        (OUT / name).write_bytes(bytes(data))
    print(f"wrote {len(inputs)} inputs to {OUT}")


if __name__ == "__main__":
    main()
