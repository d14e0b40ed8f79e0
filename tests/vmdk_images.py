"""VMDK test images and the byte-level helpers the vmdk tests share.

Every disk is made by ``qemu-img create``/``convert`` and ``qemu-io`` writes; its
expected contents is ``qemu-img convert -O raw``. The one exception is the
stream-optimized layout with a footer, which QEMU reads but does not write (VMware's
tools do): :func:`to_footer_layout` moves a QEMU-written stream's grain directory and
tables behind the grains, as VMware's writers put them. The helpers here read VMDK
structures independently of the code under test (Python ``struct``, from VMware's
specification) so that tests can find grains and damage them.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from conftest import MiB, qemu_img, qemu_io

GiB = 1024 * MiB
SECTOR = 512
GD_AT_END = 0xFFFF_FFFF_FFFF_FFFF

# name: (struct format, byte offset) of the sparse extent header (little-endian)
HEADER_FIELDS = {
    "magic": ("4s", 0),
    "version": ("<I", 4),
    "flags": ("<I", 8),
    "capacity": ("<Q", 12),
    "grain_size": ("<Q", 20),
    "descriptor_offset": ("<Q", 28),
    "descriptor_size": ("<Q", 36),
    "gtes_per_gt": ("<I", 44),
    "rgd_offset": ("<Q", 48),
    "gd_offset": ("<Q", 56),
    "overhead": ("<Q", 64),
    "unclean_shutdown": ("<B", 72),
    "check_bytes": ("4s", 73),
    "compress_algorithm": ("<H", 77),
}


def read_at(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    write_at(path, offset, bytes([read_at(path, offset, 1)[0] ^ 0xFF]))


def header(path: Path, at: int = 0) -> dict:
    data = read_at(path, at, SECTOR)
    return {name: struct.unpack_from(fmt, data, o)[0] for name, (fmt, o) in HEADER_FIELDS.items()}


def patch_header(path: Path, name: str, value, at: int = 0) -> None:
    fmt, off = HEADER_FIELDS[name]
    write_at(path, at + off, struct.pack(fmt, value))


def grain_directory(path: Path, hdr: dict | None = None) -> list[int]:
    """The GD entries (sectors of grain tables) of a sparse extent."""
    hdr = hdr or header(path)
    span = hdr["gtes_per_gt"] * hdr["grain_size"]
    n = -(-hdr["capacity"] // span)
    return list(struct.unpack(f"<{n}I", read_at(path, hdr["gd_offset"] * SECTOR, 4 * n)))


def effective_header(path: Path) -> dict:
    """The header, or the footer's copy when the grain directory is at the end."""
    hdr = header(path)
    if hdr["gd_offset"] == GD_AT_END:
        hdr = header(path, at=path.stat().st_size - 2 * SECTOR)
    return hdr


def gte_offset(path: Path, guest: int) -> int:
    """The file offset of the grain table entry that maps extent offset ``guest``."""
    hdr = effective_header(path)
    grain = guest // (hdr["grain_size"] * SECTOR)
    gd = grain_directory(path, hdr)
    gt = gd[grain // hdr["gtes_per_gt"]]
    assert gt, "the grain table is not allocated"
    return gt * SECTOR + 4 * (grain % hdr["gtes_per_gt"])


def grains(path: Path) -> list[tuple[int, int]]:
    """(extent offset, grain table entry) of every allocated grain, in guest order."""
    hdr = effective_header(path)
    grain_bytes = hdr["grain_size"] * SECTOR
    out = []
    for gd_index, gt in enumerate(grain_directory(path, hdr)):
        if not gt:
            continue
        table = struct.unpack(
            f"<{hdr['gtes_per_gt']}I", read_at(path, gt * SECTOR, 4 * hdr["gtes_per_gt"])
        )
        for gt_index, entry in enumerate(table):
            if entry:
                grain = gd_index * hdr["gtes_per_gt"] + gt_index
                out.append((grain * grain_bytes, entry))
    return out


def grain_marker(path: Path, sector: int) -> tuple[int, int]:
    """(lba, size) of the grain marker at ``sector``."""
    return struct.unpack("<QI", read_at(path, sector * SECTOR, 12))


def embedded_descriptor(path: Path) -> tuple[int, int, str]:
    hdr = header(path)
    at, size = hdr["descriptor_offset"] * SECTOR, hdr["descriptor_size"] * SECTOR
    return at, size, read_at(path, at, size).split(b"\0", 1)[0].decode()


def set_embedded_descriptor(path: Path, text: str) -> None:
    at, size, _ = embedded_descriptor(path)
    data = text.encode()
    assert len(data) <= size, "the descriptor does not fit its sectors"
    write_at(path, at, data + b"\0" * (size - len(data)))


def edit_descriptor(path: Path, old: str, new: str, count: int = 1) -> None:
    """Replace text in a disk's descriptor, embedded or a file of its own."""
    if read_at(path, 0, 4) == b"KDMV":
        _, _, text = embedded_descriptor(path)
        assert old in text, (old, text)
        set_embedded_descriptor(path, text.replace(old, new, count))
    else:
        text = path.read_bytes().split(b"\0", 1)[0].decode()
        assert old in text, (old, text)
        path.write_text(text.replace(old, new, count))


def descriptor_text(path: Path) -> str:
    if read_at(path, 0, 4) == b"KDMV":
        return embedded_descriptor(path)[2]
    return path.read_bytes().split(b"\0", 1)[0].decode()


EXTENT_LINE = re.compile(r'^(RW|RDONLY)\s+(\d+)\s+(FLAT|SPARSE)\s+"([^"]+)"(?:\s+(\d+))?\s*$')


def extents(path: Path) -> list[tuple[int, int, str, Path, int]]:
    """(guest start, bytes, type, file, byte offset in the file) of each extent."""
    out = []
    start = 0
    for line in descriptor_text(path).splitlines():
        m = EXTENT_LINE.match(line.strip())
        if not m:
            continue
        size = int(m.group(2)) * SECTOR
        offset = int(m.group(5) or 0) * SECTOR
        out.append((start, size, m.group(3), path.parent / m.group(4), offset))
        start += size
    return out


def host_location(path: Path, guest: int) -> tuple[Path, int]:
    """The file and file offset holding guest byte ``guest`` (data, not compressed),
    found through ``qemu-img map --output=json`` and the descriptor's extent list."""
    import json

    entries = json.loads(qemu_img("map", "--output=json", path, cwd=path.parent).stdout)
    [entry] = [e for e in entries if e["start"] <= guest < e["start"] + e["length"]]
    assert entry["data"] and "offset" in entry, entry
    host = entry["offset"] + guest - entry["start"]
    if read_at(path, 0, 4) == b"KDMV":
        return path, host
    [(_, _, _, file, _)] = [e for e in extents(path) if e[0] <= guest < e[0] + e[1]]
    return file, host


# --------------------------------------------------------------------------------------------
# the stream-optimized layout with a footer (VMware's)
# --------------------------------------------------------------------------------------------


def _marker(sectors: int, kind: int) -> bytes:
    return struct.pack("<QII", sectors, 0, kind) + b"\0" * (SECTOR - 16)


def to_footer_layout(src: Path, dst: Path) -> None:
    """Rewrite QEMU's stream-optimized ``src`` as VMware lays a stream out: the
    header's gdOffset says "at the end", the grain tables and directory follow the
    grains behind their markers, and a footer (the header with the real gdOffset)
    and an end-of-stream marker end the file. The old in-place tables are zeroed, so
    a reader that ignored the footer would read nothing."""
    data = bytearray(src.read_bytes())
    hdr = header(src)
    assert hdr["compress_algorithm"] == 1
    gd = grain_directory(src, hdr)
    gt_sectors = -(-hdr["gtes_per_gt"] * 4 // SECTOR)
    tables = [bytes(data[gt * SECTOR : (gt + gt_sectors) * SECTOR]) for gt in gd]
    # Blank the directories and tables QEMU put in place.
    first = min(x for x in (hdr["rgd_offset"], hdr["gd_offset"]) if x) * SECTOR
    data[first : hdr["overhead"] * SECTOR] = bytes(hdr["overhead"] * SECTOR - first)
    assert len(data) % SECTOR == 0
    new_gd = []
    for table in tables:
        data += _marker(gt_sectors, 1)
        new_gd.append(len(data) // SECTOR)
        data += table
    gd_bytes = struct.pack(f"<{len(new_gd)}I", *new_gd)
    gd_bytes += b"\0" * (-len(gd_bytes) % SECTOR)
    data += _marker(len(gd_bytes) // SECTOR, 2)
    gd_sector = len(data) // SECTOR
    data += gd_bytes
    flags = hdr["flags"] & ~2  # no redundant grain directory in a stream
    first_sector = bytearray(data[:SECTOR])
    struct.pack_into("<I", first_sector, 8, flags)
    struct.pack_into("<Q", first_sector, 48, 0)
    footer = bytearray(first_sector)
    struct.pack_into("<Q", footer, 56, gd_sector)
    struct.pack_into("<Q", first_sector, 56, GD_AT_END)
    data[:SECTOR] = first_sector
    data += _marker(1, 3) + footer + bytes(SECTOR)
    dst.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------
# the disks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Disk:
    name: str
    path: Path  # the file to open: the sparse file or the descriptor
    expected: Path  # qemu-img convert -O raw
    subformat: str
    files: tuple[Path, ...] = field(default=())
    big: bool = False  # too big to read whole in a test: verify it instead


# Writes every disk gets: whole and partial grains, a zero write, data near the end.
def standard_writes(size: int) -> list[str]:
    return [
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 12k",
        "write -z 1M 128k",
        "write -P 0x33 1200k 64k",
        f"write -P 0x44 {size - 70 * 1024} {70 * 1024}",
    ]


def _expected(d: Path, img: Path) -> Path:
    out = d / f"{img.stem}.expected.raw"
    qemu_img("convert", "-f", "vmdk", "-O", "raw", img, out, cwd=d)
    return out


def _files(d: Path, stem: str) -> tuple[Path, ...]:
    return tuple(sorted(p for p in d.iterdir() if p.name.startswith(stem)))


def _created(d: Path, name: str, subformat: str, size: int, *opts: str, writes=None) -> Disk:
    img = d / f"{name}.vmdk"
    options = ",".join([f"subformat={subformat}", *opts])
    qemu_img("create", "-q", "-f", "vmdk", "-o", options, img.name, str(size), cwd=d)
    qemu_io(img.name, *(writes or standard_writes(size)), fmt="vmdk", cwd=d)
    return Disk(name, img, _expected(d, img), subformat, _files(d, name), big=size > 64 * MiB)


def _source_raw(d: Path, size: int) -> Path:
    """A raw disk with random data, a hole, patterns and a partial last grain."""
    src = d / "source.raw"
    if not src.exists():
        with open(src, "wb") as f:
            f.write(os.urandom(3 * MiB + 4096))
            f.truncate(size)
        qemu_io(src, "write -P 0x5a 3600k 4k", f"write -P 0x66 {size - 3584} 3584", fmt="raw")
    return src


def _converted(d: Path, name: str, subformat: str, size: int) -> Disk:
    img = d / f"{name}.vmdk"
    qemu_img(
        "convert", "-f", "raw", "-O", "vmdk", "-o", f"subformat={subformat}",
        _source_raw(d, size), img.name, cwd=d,
    )  # fmt: skip
    return Disk(name, img, _expected(d, img), subformat, _files(d, name))


SMALL = 4 * MiB + 3584  # not a whole number of grains: the last grain is partial
BIG = 4 * GiB + 512 * MiB  # three 2 GiB extents in the twoGbMaxExtent subformats
BIG_WRITES = [
    "write -P 0x11 0 64k",
    "write -P 0x22 2047M 2M",  # across the first extent boundary
    "write -z 3G 128k",
    f"write -P 0x44 {BIG - 70 * 1024} {70 * 1024}",
]


def build_disks(d: Path) -> dict[str, Disk]:
    disks = [
        _created(d, "sparse", "monolithicSparse", SMALL),
        _created(d, "sparse-zg", "monolithicSparse", SMALL, "zeroed_grain=on"),
        _created(d, "flat", "monolithicFlat", SMALL),
        _created(d, "split-sparse", "twoGbMaxExtentSparse", BIG, writes=BIG_WRITES),
        _created(d, "split-flat", "twoGbMaxExtentFlat", BIG, writes=BIG_WRITES),
        _converted(d, "conv-sparse", "monolithicSparse", SMALL),
        _converted(d, "stream", "streamOptimized", SMALL),
    ]
    out = {disk.name: disk for disk in disks}
    footer = d / "stream-footer.vmdk"
    to_footer_layout(out["stream"].path, footer)
    out["stream-footer"] = Disk(
        "stream-footer", footer, _expected(d, footer), "streamOptimized", (footer,)
    )
    return out


def build_chain(d: Path) -> list[Path]:
    """base <- mid <- top, each a monolithicSparse differencing disk of the one before."""
    qemu_img("create", "-q", "-f", "vmdk", "base.vmdk", "4M", cwd=d)
    qemu_io("base.vmdk", "write -P 0x01 0 4M", fmt="vmdk", cwd=d)
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", "mid.vmdk", cwd=d)
    qemu_io("mid.vmdk", "write -P 0x02 64k 64k", "write -P 0x22 1M 4k", fmt="vmdk", cwd=d)
    qemu_img("create", "-q", "-f", "vmdk", "-b", "mid.vmdk", "-F", "vmdk", "top.vmdk", cwd=d)
    qemu_io("top.vmdk", "write -P 0x03 128k 64k", fmt="vmdk", cwd=d)
    return [d / "top.vmdk", d / "mid.vmdk", d / "base.vmdk"]
