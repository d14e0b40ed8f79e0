"""Build dynamic and differencing VHD files from the specification.

``qemu-img`` cannot make differencing VHDs, nor blocks whose sector bitmap is partly
set, so the tests build those here, straight from Microsoft's "Virtual Hard Disk Image
Format Specification" and independently of the Rust reader: a footer copy at 0, the
dynamic disk header at 512, the BAT after it, then each block (its sector bitmap, then
its data), the parent locators' data, and the footer at the end.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
FIXED, DYNAMIC, DIFFERENCING = 2, 3, 4


def vhd_checksum(data: bytes, at: int) -> int:
    """One's complement of the byte sum, the checksum field counted as zeros."""
    return ~(sum(data) - sum(data[at : at + 4])) & 0xFFFFFFFF


def geometry(sectors: int) -> tuple[int, int, int]:
    """The specification's CHS algorithm (appendix: CHS calculation)."""
    sectors = min(sectors, 65535 * 16 * 255)
    if sectors >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cth = sectors // spt
    else:
        spt = 17
        cth = sectors // spt
        heads = max((cth + 1023) // 1024, 4)
        if cth >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cth = sectors // spt
        if cth >= heads * 1024:
            spt, heads = 63, 16
            cth = sectors // spt
    return cth // heads, heads, spt


def footer(
    size: int, disk_type: int, unique_id: bytes, creator: bytes = b"tst ", data_offset: int = 512
) -> bytes:
    cyls, heads, spt = geometry(size // SECTOR)
    b = bytearray(SECTOR)
    b[0:8] = b"conectix"
    struct.pack_into(">IIQI", b, 8, 2, 0x00010000, data_offset, 0)
    b[28:32] = creator
    struct.pack_into(
        ">I4sQQHBBI", b, 32, 0x000A0000, b"Wi2k", size, size, cyls, heads, spt, disk_type
    )
    b[68:84] = unique_id
    struct.pack_into(">I", b, 64, vhd_checksum(bytes(b), 64))
    return bytes(b)


def fixed_footer(size: int, unique_id: bytes | None = None, creator: bytes = b"tst ") -> bytes:
    return footer(size, FIXED, unique_id or uuid.uuid4().bytes, creator, 0xFFFFFFFFFFFFFFFF)


@dataclass
class Locator:
    platform: bytes  # b"W2ru", b"W2ku", b"MacX", ...
    data: bytes  # already encoded (UTF-16LE for W2*, UTF-8 for MacX)


def w2(name: str) -> bytes:
    return name.encode("utf-16-le")


@dataclass
class Block:
    """One allocated block: which of its sectors are present, and its data."""

    present: set[int]  # sector numbers inside the block whose bitmap bit is set
    data: bytes  # block_size bytes (sectors not present may hold anything)


@dataclass
class Vhd:
    size: int
    block_size: int = 2 << 20
    disk_type: int = DYNAMIC
    unique_id: bytes = field(default_factory=lambda: uuid.uuid4().bytes)
    parent_id: bytes = bytes(16)
    parent_name: str = ""
    locators: list[Locator] = field(default_factory=list)
    blocks: dict[int, Block] = field(default_factory=dict)
    creator: bytes = b"tst "

    def bitmap(self, block: Block) -> bytes:
        sectors = self.block_size // SECTOR
        bits_bytes = (sectors + 7) // 8
        size = (bits_bytes + SECTOR - 1) // SECTOR * SECTOR
        bits = bytearray(size)
        for s in block.present:
            bits[s // 8] |= 0x80 >> (s % 8)
        return bytes(bits)

    def write(self, path: Path) -> None:
        entries = -(-self.size // self.block_size)
        bat_at = 3 * SECTOR
        bat_len = -(-entries * 4 // SECTOR) * SECTOR
        at = bat_at + bat_len
        body = bytearray()
        bat = [0xFFFFFFFF] * entries
        for index in sorted(self.blocks):
            block = self.blocks[index]
            assert len(block.data) == self.block_size
            bat[index] = (at + len(body)) // SECTOR
            body += self.bitmap(block) + block.data
        locator_entries = bytearray()
        for loc in self.locators:
            offset = at + len(body)
            space = -(-len(loc.data) // SECTOR) * SECTOR
            body += loc.data + bytes(space - len(loc.data))
            locator_entries += struct.pack(">4sIIIQ", loc.platform, space, len(loc.data), 0, offset)
        header = bytearray(1024)
        header[0:8] = b"cxsparse"
        struct.pack_into(
            ">QQIII", header, 8, 0xFFFFFFFFFFFFFFFF, bat_at, 0x00010000, entries, self.block_size
        )
        header[40:56] = self.parent_id
        name = self.parent_name.encode("utf-16-be")[:512]
        header[64 : 64 + len(name)] = name
        header[576 : 576 + len(locator_entries)] = locator_entries
        struct.pack_into(">I", header, 36, vhd_checksum(bytes(header), 36))
        foot = footer(self.size, self.disk_type, self.unique_id, self.creator)
        bat_bytes = b"".join(struct.pack(">I", e) for e in bat)
        out = foot + header + bat_bytes + bytes(bat_len - len(bat_bytes)) + body + foot
        Path(path).write_bytes(out)

    def expected(self, parent: bytes | None) -> bytes:
        """The guest bytes, computed from the blocks: present sectors from here, the
        rest from ``parent`` (or zeros)."""
        base = bytearray(parent[: self.size] if parent is not None else b"")
        base += bytes(self.size - len(base))
        per_block = self.block_size // SECTOR
        for index, block in self.blocks.items():
            for s in block.present:
                guest = (index * per_block + s) * SECTOR
                if guest < self.size:
                    base[guest : guest + SECTOR] = block.data[s * SECTOR : (s + 1) * SECTOR]
        return bytes(base)


def read_unique_id(path: Path) -> bytes:
    """The unique id in a VHD's footer (the copy at 0, else the last sector)."""
    data = Path(path).read_bytes()
    head = data[:SECTOR] if data[:8] == b"conectix" else data[-SECTOR:]
    return head[68:84]
