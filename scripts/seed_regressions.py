"""Write the header, l2_entry and digests_file regression inputs
(fuzz/regressions/{header,l2_entry,digests_file}/).

    python scripts/seed_regressions.py      (from the repository root; needs qemu-img,
                                             and blkverify installed for the digests files)

`cargo test` replays every file there (tests/fuzz_regressions.rs). The header inputs are
small qcow2 images made by qemu-img, whole (named `valid-*`: they must parse), and copies
with one area of the header damaged (named `bad-*`: they must be refused with an error that
names the image). The l2_entry inputs are one L2 entry each, in the layout of
`blkverify_rs::fuzzing::l2_entry`, covering every kind of entry and every reason to refuse
one. The files are committed; rerun this only to change the set, and commit the result.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER_DIR = ROOT / "fuzz/regressions/header"
L2_DIR = ROOT / "fuzz/regressions/l2_entry"
DIGESTS_DIR = ROOT / "fuzz/regressions/digests_file"

EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO = 0x0537BE77


def qemu_image(tmp: Path, options: str, extra: list[str] | None = None) -> bytearray:
    path = tmp / "t.qcow2"
    path.unlink(missing_ok=True)
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(path)]
    # Run in tmp: relative names in options (data_file=t.data) land there, not in the cwd.
    subprocess.run([*cmd, *(extra or ["1M"])], check=True, cwd=tmp)
    return bytearray(path.read_bytes())


def put32(buf: bytearray, at: int, value: int) -> bytearray:
    out = bytearray(buf)
    out[at : at + 4] = struct.pack(">I", value)
    return out


def put64(buf: bytearray, at: int, value: int) -> bytearray:
    out = bytearray(buf)
    out[at : at + 8] = struct.pack(">Q", value)
    return out


def extension(ext_type: int, data: bytes) -> bytes:
    padded = data + b"\0" * (-len(data) % 8)
    return struct.pack(">II", ext_type, len(data)) + padded


def with_extensions(base: bytearray, *exts: bytes) -> bytearray:
    """`base` (a v3 image with 512-byte clusters and no extensions) with `exts` after its
    header, then the end marker."""
    out = bytearray(base)
    header_length = struct.unpack(">I", out[100:104])[0]
    blob = b"".join(exts) + b"\0" * 8
    out[header_length : header_length + len(blob)] = blob
    return out


def header_inputs(tmp: Path) -> dict[str, bytes]:
    c512 = qemu_image(tmp, "cluster_size=512")
    raw = tmp / "base.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "1M"], check=True)
    backed = qemu_image(tmp, "cluster_size=512", ["-b", str(raw.name), "-F", "raw"])
    c64k = qemu_image(tmp, "cluster_size=64k")
    inputs = {
        "valid-v3-c512": c512,
        "valid-v2-c512": qemu_image(tmp, "cluster_size=512,compat=0.10"),
        "valid-zstd-c512": qemu_image(tmp, "cluster_size=512,compression_type=zstd"),
        "valid-refcount1-c512": qemu_image(tmp, "cluster_size=512,refcount_bits=1"),
        "valid-refcount64-lazy-c512": qemu_image(
            tmp, "cluster_size=512,refcount_bits=64,lazy_refcounts=on"
        ),
        "valid-extl2-c16k": qemu_image(tmp, "cluster_size=16k,extended_l2=on"),
        "valid-backing-c512": backed,
        "valid-data-file-c512": qemu_image(tmp, "cluster_size=512,data_file=t.data"),
        # The header cluster of a 64 KiB-cluster image (with its feature name table): the
        # extensions parse, then the L1 table lies past the end of this short input.
        "bad-c64k-header-cluster-only": c64k[:65536],
    }
    # One area of the header damaged at a time.
    bad = {
        "bad-magic": put32(c512, 0, 0x514649FC),
        "bad-version-1": put32(c512, 4, 1),
        "bad-truncated-in-common-fields": c512[:40],
        "bad-truncated-in-v3-fields": c512[:90],
        "bad-cluster-bits-8": put32(c512, 20, 8),
        "bad-cluster-bits-22": put32(c512, 20, 22),
        "bad-size-past-i64": put64(c512, 24, 1 << 63),
        "bad-crypt-luks": put32(c512, 32, 2),
        "bad-header-length-short": put32(c512, 100, 96),
        "bad-header-length-past-cluster": put32(c512, 100, 520),
        "bad-refcount-order-7": put32(c512, 96, 7),
        "bad-unknown-incompatible-bit-named": put64(
            with_extensions(
                c512,
                extension(EXT_FEATURE_TABLE, bytes([0, 40]) + b"future feature".ljust(46, b"\0")),
            ),
            72,
            1 << 40,
        ),
        "bad-compression-type-2": put32(put64(c512, 72, 1 << 3), 104, 2 << 24),
        "bad-compression-bit-without-type": put64(c512, 72, 1 << 3),
        "bad-extl2-small-clusters": put64(c512, 72, 1 << 4),
        "bad-data-file-bit-without-name": put64(c512, 72, 1 << 2),
        "bad-crypto-extension": with_extensions(c512, extension(EXT_CRYPTO, bytes(16))),
        "bad-extension-length-past-area": put32(put32(c512, 112, EXT_BACKING_FORMAT), 116, 1000),
        "bad-backing-format-too-long": with_extensions(
            c512, extension(EXT_BACKING_FORMAT, b"a-format-name-of-20")
        ),
        "bad-backing-name-past-cluster": put32(backed, 16, 600),
        "bad-backing-name-inside-header": put64(backed, 8, 64),
        "bad-backing-name-too-long": put32(backed, 16, 1024),
        "bad-l1-size-too-small": put32(c512, 36, 1),
        "bad-l1-table-unaligned": put64(c512, 40, 0x201),
        "bad-refcount-table-clusters-0": put32(c512, 56, 0),
        "bad-l1-table-overlaps-refcount-table": put64(
            c512, 40, struct.unpack(">Q", c512[48:56])[0]
        ),
        "bad-snapshot-table-past-eof": put64(put32(c512, 60, 3), 64, 1 << 40),
    }
    # The backing name with a NUL byte, and with bytes that are not UTF-8.
    name_at = struct.unpack(">Q", backed[8:16])[0]
    nul = bytearray(backed)
    nul[name_at + 1] = 0
    bad["bad-backing-name-nul"] = nul
    latin = bytearray(backed)
    latin[name_at] = 0xFF
    bad["bad-backing-name-not-utf8"] = latin
    # Cut just inside the extension header, so the end-of-extensions marker is cut short.
    bad["bad-extension-truncated"] = c512[:116]
    inputs.update(bad)
    return {name: bytes(data) for name, data in inputs.items()}


# l2_entry inputs: entry (u64 BE), bitmap (u64 BE), cluster_bits - 9, subcluster index,
# flags (bit 0: external data file).
COPIED = 1 << 63
COMPRESSED = 1 << 62


def l2_input(entry: int, bitmap: int, cluster_bits: int, sub: int, data_file: bool) -> bytes:
    return struct.pack(">QQBBB", entry, bitmap, cluster_bits - 9, sub, int(data_file))


def l2_inputs() -> dict[str, bytes]:
    return {
        "unallocated": l2_input(0, 0, 16, 0, False),
        "zero-plain": l2_input(1, 0, 16, 0, False),
        "zero-allocated": l2_input(COPIED | 0x5_0000 | 1, 0, 16, 0, False),
        "data": l2_input(COPIED | 0x5_0000, 0, 16, 0, False),
        "data-file-offset-0": l2_input(COPIED, 0, 16, 0, True),
        "unaligned-offset": l2_input(0x5_0200, 0, 16, 0, False),
        "reserved-bits": l2_input(0x5_0000 | 2, 0, 16, 0, False),
        "reserved-high-bits": l2_input(0x3F00_0000_0000_0000 | 0x5_0000, 0, 16, 0, False),
        "compressed": l2_input(COMPRESSED | (3 << 54) | 0x1_2345, 0, 16, 0, False),
        "compressed-c512-max-sectors": l2_input(COMPRESSED | (1 << 61) | 512, 0, 9, 0, False),
        "compressed-c2m": l2_input(COMPRESSED | (0x1FFF << 49) | 0x7_0000_0001, 0, 21, 0, False),
        "compressed-with-data-file": l2_input(COMPRESSED | 512, 0, 16, 0, True),
        "compressed-with-bitmap": l2_input(COMPRESSED | 512, 1, 16, 0, False),
        "subcluster-allocated": l2_input(COPIED | 0x10_0000, 1 << 31, 16, 31, False),
        "subcluster-zero": l2_input(COPIED | 0x10_0000, 1 << 33, 16, 1, False),
        "subcluster-allocated-and-zero": l2_input(COPIED | 0x10_0000, 1 | (1 << 32), 16, 0, False),
        "subcluster-unallocated-with-alloc-bits": l2_input(0, 1, 16, 0, False),
        "subcluster-zero-flag-reserved": l2_input(1, 0, 16, 0, False),
        "subcluster-zero-unallocated": l2_input(0, 1 << 40, 16, 8, False),
        "l1-reserved-bits": l2_input(0x3_0001, 0, 16, 0, False),
        "all-ones": b"\xff" * 19,
        "short": b"\x80",
    }


def digests_inputs(tmp: Path) -> dict[str, bytes]:
    """Block digests files written by `blkverify digest --blocks` (valid-*), and copies
    with one field damaged (bad-*). Most damaged copies get their checksum redone, so
    that the damage itself is what the parser must find."""

    def written(name: str, size: int, writes: list[str], *args: str) -> bytes:
        image = tmp / f"{name}.raw"
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(image), str(size)], check=True)
        if writes:
            cmds = [x for w in writes for x in ("-c", w)]
            subprocess.run(
                ["qemu-io", "-f", "raw", *cmds, str(image)], check=True, stdout=subprocess.DEVNULL
            )
        out = tmp / f"{name}.digests"
        subprocess.run(
            [sys.executable, "-m", "blkverify_rs", "digest", "--blocks", str(out), *args,
             str(image)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        return out.read_bytes()

    def resum(data: bytes) -> bytes:
        return data[:-32] + hashlib.sha256(data[:-32]).digest()

    def put(data: bytes, at: int, fmt: str, value: int | bytes) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, at, value)
        return resum(bytes(out))

    sparse = written(
        "sparse",
        8 * 1024 * 1024 + 1000,
        ["write -P 0x11 0 100k", "write -P 0x22 3M 64k", "write -P 0x33 8388600 1000"],
    )
    flipped = bytearray(sparse)
    flipped[170] ^= 1
    first_run = struct.unpack_from("<Q", sparse, 160)[0]
    return {
        "valid-sparse": sparse,
        "valid-blake3": written("b3", 1024 * 1024, ["write -P 0x44 5000 70000"], "-d", "blake3"),
        "valid-empty": written("empty", 0, []),
        "valid-short": written("short", 1000, ["write -P 0x55 0 10"]),
        "bad-foreign": qemu_image(tmp, "cluster_size=65536")[:4096],
        "bad-empty": b"",
        "bad-truncated-header": sparse[:100],
        "bad-truncated": sparse[:-1],
        "bad-data-after-end": sparse + b"\0",
        "bad-checksum": bytes(flipped),
        "bad-version": put(sparse, 8, "<I", 2),
        "bad-header-length": put(sparse, 12, "<I", 168),
        "bad-algorithm": put(sparse, 16, "16s", b"md5"),
        "bad-block-size": put(sparse, 32, "<I", 65535),
        "bad-digest-length": put(sparse, 36, "<I", 20),
        "bad-block-count": put(sparse, 48, "<Q", 999),
        "bad-run-count-huge": put(sparse, 56, "<Q", 1 << 61),
        "bad-digest-count": put(sparse, 64, "<Q", 1),
        "bad-zero-digest": put(sparse, 104, "32s", b"\1" * 32),
        "bad-reserved": put(sparse, 150, "<B", 1),
        "bad-run-of-zero-blocks": put(sparse, 160, "<Q", first_run & ~((1 << 63) - 1)),
        "bad-run-past-the-end": put(sparse, 160, "<Q", (first_run & (1 << 63)) | 100000),
        "bad-zero-run-over-short-tail": zero_run_over_tail(
            written("tail", 65536 + 1000, ["write -P 0x66 0 4k"]), resum
        ),
    }


def zero_run_over_tail(data: bytes, resum) -> bytes:
    """``data`` (two blocks, the second short, one data run of both) rewritten as a data
    run of one block and a zero run over the short block, with a valid checksum."""
    header = bytearray(data[:160])
    struct.pack_into("<QQ", header, 56, 2, 1)  # two runs, one stored digest
    first_digest = data[168:200]
    body = struct.pack("<Q", 1) + first_digest + struct.pack("<Q", (1 << 63) | 1)
    return resum(bytes(header) + body + bytes(32))


def write_dir(directory: Path, files: dict[str, bytes]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.iterdir():
        if old.is_file() and old.suffix != ".md":
            old.unlink()
    for name, data in files.items():
        (directory / name).write_bytes(data)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        write_dir(HEADER_DIR, header_inputs(Path(tmp)))
    write_dir(L2_DIR, l2_inputs())
    with tempfile.TemporaryDirectory() as tmp:
        write_dir(DIGESTS_DIR, digests_inputs(Path(tmp)))


if __name__ == "__main__":
    main()
