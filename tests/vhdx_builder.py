"""Build VHDX images from Microsoft's MS-VHDX specification, for the cases ``qemu-img`` cannot
make: differencing disks (with parent locators), 4096-byte logical sectors, partially present,
unmapped and undefined blocks, and images whose log must be replayed.

Written from the specification alone, independently of blkverify's Rust reader, so that a
shared misreading of the format cannot make a wrong read look right. The guest contents each
image must read as are computed here too (:meth:`Disk.expected`).
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB

# Block states (MS-VHDX 2.5.1.1).
NOT_PRESENT, UNDEFINED, ZERO, UNMAPPED, FULLY_PRESENT, PARTIALLY_PRESENT = 0, 1, 2, 3, 6, 7
SB_PRESENT = 6


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC-32C (Castagnoli), as every VHDX checksum."""
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283


def with_checksum(buf: bytearray, at: int = 4) -> bytearray:
    buf[at : at + 4] = b"\0\0\0\0"
    buf[at : at + 4] = struct.pack("<I", crc32c(bytes(buf)))
    return buf


def guid(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def guid_text(raw: bytes) -> str:
    return "{" + str(uuid.UUID(bytes_le=raw)) + "}"


BAT_GUID = guid("2DC27766-F623-4200-9D64-115E9BFD4A08")
METADATA_GUID = guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")
FILE_PARAMETERS = guid("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
VIRTUAL_DISK_SIZE = guid("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
PAGE_83 = guid("BECA12AB-B2E6-4523-93EF-C309E000C746")
LOGICAL_SECTOR_SIZE = guid("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
PHYSICAL_SECTOR_SIZE = guid("CDA348C7-445D-4471-9CC9-E9885251C556")
PARENT_LOCATOR = guid("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
VHDX_PARENT_TYPE = guid("B04AEFB7-D19E-4A81-B789-25B8E9445913")


def current_header(path) -> dict:
    """The current header of a VHDX file (valid checksum, larger sequence number)."""
    data = Path(path).read_bytes()
    best = None
    for which, off in ((1, 64 * KiB), (2, 128 * KiB)):
        buf = bytearray(data[off : off + 4 * KiB])
        stored = struct.unpack_from("<I", buf, 4)[0]
        if buf[:4] != b"head" or struct.unpack_from("<I", with_checksum(buf[:]), 4)[0] != stored:
            continue
        seq = struct.unpack_from("<Q", buf, 8)[0]
        h = {
            "which": which,
            "offset": off,
            "sequence": seq,
            "data_write_guid": bytes(buf[32:48]),
            "log_guid": bytes(buf[48:64]),
            "log_length": struct.unpack_from("<I", buf, 68)[0],
            "log_offset": struct.unpack_from("<Q", buf, 72)[0],
        }
        if best is None or seq > best["sequence"]:
            best = h
    assert best is not None, f"{path}: no valid header"
    return best


def bat_location(path) -> tuple[int, int]:
    """(offset, length) of the BAT region, from the first region table."""
    data = Path(path).read_bytes()
    rt = data[192 * KiB : 256 * KiB]
    for i in range(struct.unpack_from("<I", rt, 8)[0]):
        e = rt[16 + 32 * i : 48 + 32 * i]
        if e[:16] == BAT_GUID:
            off, length = struct.unpack_from("<QI", e, 16)
            return off, length
    raise AssertionError("no BAT region")


@dataclass
class Block:
    """One payload block: its state, its bytes (for present states) and, for a partially
    present block, which logical sectors are present."""

    state: int
    data: bytes = b""
    sectors: frozenset[int] = frozenset()
    file_offset: int | None = None  # set by the layout


@dataclass
class LogEntry:
    """A log entry to write at ``position`` (bytes into the log): data descriptors
    ``writes`` {file offset: 4 KiB page} and zero descriptors ``zeros`` [(offset, length)]."""

    position: int
    sequence: int
    tail: int
    writes: dict[int, bytes] = field(default_factory=dict)
    zeros: list[tuple[int, int]] = field(default_factory=list)
    log_guid: bytes | None = None  # default: the header's


@dataclass
class Disk:
    size: int
    block_size: int = 1 * MiB
    sector_size: int = 512
    physical_sector_size: int = 4096
    log_size: int = 1 * MiB
    fixed: bool = False
    blocks: dict[int, Block] = field(default_factory=dict)
    parent: dict[str, str] | None = None  # the parent locator's key/value pairs
    data_write_guid: bytes = field(default_factory=lambda: uuid.uuid4().bytes_le)
    log_guid: bytes = bytes(16)

    # ---- geometry (MS-VHDX 2.4, 2.5) ------------------------------------------------------

    @property
    def chunk_ratio(self) -> int:
        return (1 << 23) * self.sector_size // self.block_size

    @property
    def payload_blocks(self) -> int:
        return -(-self.size // self.block_size)

    @property
    def bat_entries(self) -> int:
        n, r = self.payload_blocks, self.chunk_ratio
        if self.parent is not None:
            return -(-n // r) * (r + 1)
        return n + (n - 1) // r

    def payload_index(self, block: int) -> int:
        return block + block // self.chunk_ratio

    def bitmap_index(self, chunk: int) -> int:
        return chunk * (self.chunk_ratio + 1) + self.chunk_ratio

    # ---- what the guest sees ----------------------------------------------------------------

    def expected(self, parent_bytes: bytes | None = None) -> bytes:
        """The guest contents: the parent's (or zeros) with this disk's blocks laid over."""
        base = parent_bytes if parent_bytes is not None else bytes(self.size)
        out = bytearray(base[: self.size].ljust(self.size, b"\0"))
        for n, b in self.blocks.items():
            start = n * self.block_size
            end = min(start + self.block_size, self.size)
            if b.state == FULLY_PRESENT:
                out[start:end] = b.data[: end - start]
            elif b.state == ZERO or (self.parent is None and b.state != PARTIALLY_PRESENT):
                out[start:end] = bytes(end - start)
            elif b.state == PARTIALLY_PRESENT:
                for s in b.sectors:
                    a = s * self.sector_size
                    if start + a < end:
                        out[start + a : start + a + self.sector_size] = b.data[
                            a : a + self.sector_size
                        ]
        return bytes(out)

    # ---- the file ---------------------------------------------------------------------------

    def build(self, path, log_entries: list[LogEntry] = (), stale_pages=None) -> dict:
        """Write the image to ``path``. ``stale_pages`` {file offset: bytes} overwrite parts
        of the file after it is laid out (the state a crash left before the log was applied).
        Returns the layout: region offsets and each block's file offset."""
        log_offset = 1 * MiB
        metadata_offset = log_offset + self.log_size
        bat_bytes = self.bat_entries * 8
        bat_offset = metadata_offset + 1 * MiB
        bat_length = max(1, -(-bat_bytes // MiB)) * MiB
        cursor = bat_offset + bat_length
        bat = [0] * self.bat_entries
        payload: list[tuple[int, bytes]] = []
        for n in sorted(self.blocks):
            b = self.blocks[n]
            if b.state in (FULLY_PRESENT, PARTIALLY_PRESENT):
                b.file_offset = cursor
                payload.append((cursor, b.data.ljust(self.block_size, b"\0")))
                cursor += self.block_size
                bat[self.payload_index(n)] = b.state | (b.file_offset // MiB) << 20
            else:
                offset = b.file_offset or 0
                bat[self.payload_index(n)] = b.state | (offset // MiB) << 20
        # Sector bitmaps for chunks with partially present blocks.
        bitmaps: dict[int, bytearray] = {}
        for n, b in self.blocks.items():
            if b.state != PARTIALLY_PRESENT:
                continue
            chunk = n // self.chunk_ratio
            bm = bitmaps.setdefault(chunk, bytearray(MiB))
            first = (n % self.chunk_ratio) * (self.block_size // self.sector_size)
            for s in b.sectors:
                bit = first + s
                bm[bit // 8] |= 1 << (bit % 8)
        for chunk, bm in sorted(bitmaps.items()):
            bat[self.bitmap_index(chunk)] = SB_PRESENT | (cursor // MiB) << 20
            payload.append((cursor, bytes(bm)))
            cursor += MiB
        file_len = cursor

        img = bytearray(file_len)
        img[0:8] = b"vhdxfile"
        creator = "blkverify-rs tests".encode("utf-16-le")
        img[8 : 8 + len(creator)] = creator
        for seq, off in ((7, 64 * KiB), (8, 128 * KiB)):
            h = bytearray(4 * KiB)
            h[0:4] = b"head"
            struct.pack_into("<Q", h, 8, seq)
            h[16:32] = uuid.uuid4().bytes_le
            h[32:48] = self.data_write_guid
            h[48:64] = self.log_guid
            struct.pack_into("<HHIQ", h, 64, 0, 1, self.log_size, log_offset)
            img[off : off + 4 * KiB] = with_checksum(h)
        rt = bytearray(64 * KiB)
        rt[0:4] = b"regi"
        struct.pack_into("<I", rt, 8, 2)
        rt[16:32] = BAT_GUID
        struct.pack_into("<QII", rt, 32, bat_offset, bat_length, 1)
        rt[48:64] = METADATA_GUID
        struct.pack_into("<QII", rt, 64, metadata_offset, 1 * MiB, 1)
        with_checksum(rt)
        img[192 * KiB : 256 * KiB] = rt
        img[256 * KiB : 320 * KiB] = rt
        img[metadata_offset : metadata_offset + MiB] = self._metadata()
        img[bat_offset : bat_offset + bat_bytes] = struct.pack(f"<{len(bat)}Q", *bat)
        for off, data in payload:
            img[off : off + len(data)] = data
        true_bytes = bytes(img)
        for entry in log_entries:
            self._write_log_entry(img, log_offset, entry)
        for off, data in (stale_pages or {}).items():
            img[off : off + len(data)] = data
        Path(path).write_bytes(img)
        return {
            "log_offset": log_offset,
            "metadata_offset": metadata_offset,
            "bat_offset": bat_offset,
            "file_len": file_len,
            "true_bytes": true_bytes,
        }

    def _metadata(self) -> bytes:
        items = [
            (FILE_PARAMETERS, 4, struct.pack("<II", self.block_size, self._param_bits())),
            (VIRTUAL_DISK_SIZE, 6, struct.pack("<Q", self.size)),
            (PAGE_83, 6, uuid.uuid4().bytes_le),
            (LOGICAL_SECTOR_SIZE, 6, struct.pack("<I", self.sector_size)),
            (PHYSICAL_SECTOR_SIZE, 6, struct.pack("<I", self.physical_sector_size)),
        ]
        if self.parent is not None:
            items.append((PARENT_LOCATOR, 4, parent_locator(self.parent)))
        region = bytearray(MiB)
        region[0:8] = b"metadata"
        struct.pack_into("<H", region, 10, len(items))
        at = 64 * KiB
        for i, (item_id, flags, data) in enumerate(items):
            e = 32 + 32 * i
            region[e : e + 16] = item_id
            struct.pack_into("<III", region, e + 16, at, len(data), flags)
            region[at : at + len(data)] = data
            at += len(data)
        return bytes(region)

    def _param_bits(self) -> int:
        return (1 if self.fixed else 0) | (2 if self.parent is not None else 0)

    def _write_log_entry(self, img: bytearray, log_offset: int, entry: LogEntry) -> None:
        descriptors = [("zero", off, length) for off, length in entry.zeros]
        descriptors += [("desc", off, page) for off, page in sorted(entry.writes.items())]
        count = len(descriptors)
        desc_sectors = -(-(count + 2) // 128)
        data_sectors = sum(1 for d in descriptors if d[0] == "desc")
        length = (desc_sectors + data_sectors) * 4 * KiB
        buf = bytearray(length)
        buf[0:4] = b"loge"
        struct.pack_into("<IIQI", buf, 8, length, entry.tail, entry.sequence, count)
        buf[32:48] = entry.log_guid or self.log_guid
        struct.pack_into("<QQ", buf, 48, len(img), len(img))
        data_at = desc_sectors * 4 * KiB
        for i, (kind, off, arg) in enumerate(descriptors):
            d = (i + 2) * 32
            if kind == "zero":
                buf[d : d + 4] = b"zero"
                struct.pack_into("<QQQ", buf, d + 8, arg, off, entry.sequence)
            else:
                page = arg
                assert len(page) == 4 * KiB
                buf[d : d + 4] = b"desc"
                buf[d + 4 : d + 8] = page[4092:4096]
                buf[d + 8 : d + 16] = page[0:8]
                struct.pack_into("<QQ", buf, d + 16, off, entry.sequence)
                sector = bytearray(4 * KiB)
                sector[0:4] = b"data"
                struct.pack_into("<I", sector, 4, entry.sequence >> 32)
                sector[8:4092] = page[8:4092]
                struct.pack_into("<I", sector, 4092, entry.sequence & 0xFFFFFFFF)
                buf[data_at : data_at + 4 * KiB] = sector
                data_at += 4 * KiB
        with_checksum(buf)
        # The log is a ring: an entry may run past its end and continue at its start.
        for k in range(0, length, 4 * KiB):
            pos = (entry.position + k) % self.log_size
            img[log_offset + pos : log_offset + pos + 4 * KiB] = buf[k : k + 4 * KiB]


def parent_locator(pairs: dict[str, str]) -> bytes:
    """A VHDX parent locator item (MS-VHDX 2.6.2.6) holding ``pairs``."""
    header = bytearray(20)
    header[0:16] = VHDX_PARENT_TYPE
    struct.pack_into("<HH", header, 16, 0, len(pairs))
    strings = bytearray()
    entries = bytearray()
    base = 20 + 12 * len(pairs)
    for key, value in pairs.items():
        k = key.encode("utf-16-le")
        v = value.encode("utf-16-le")
        key_off = base + len(strings)
        strings += k
        value_off = base + len(strings)
        strings += v
        entries += struct.pack("<IIHH", key_off, value_off, len(k), len(v))
    return bytes(header + entries + strings)


def pattern(seed: int, length: int) -> bytes:
    """Distinct, recognisable bytes: every 8-byte word names the seed and its offset."""
    return b"".join(struct.pack("<II", seed, i) for i in range(length // 8))
