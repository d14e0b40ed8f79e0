"""Write the header and l2_entry regression inputs (fuzz/regressions/{header,l2_entry}/).

    python scripts/seed_regressions.py      (from the repository root; needs qemu-img)

`cargo test` replays every file there (tests/fuzz_regressions.rs). The header inputs are
small qcow2 images made by qemu-img, whole (named `valid-*`: they must parse), and copies
with one area of the header damaged (named `bad-*`: they must be refused with an error that
names the image). The l2_entry inputs are one L2 entry each, in the layout of
`blkverify_rs::fuzzing::l2_entry`, covering every kind of entry and every reason to refuse
one. The files are committed; rerun this only to change the set, and commit the result.
"""

from __future__ import annotations

import struct
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER_DIR = ROOT / "fuzz/regressions/header"
L2_DIR = ROOT / "fuzz/regressions/l2_entry"

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


if __name__ == "__main__":
    main()
