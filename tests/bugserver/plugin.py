"""An nbdkit Python plugin: a plain file served over NBD, with planted bugs.

This is the "driver with a known bug" of issue 20 (section 4): a test side that is
wrong the way real drivers go wrong, deterministically, and that says where it went
wrong.  Run it with nbdkit's Python plugin (tests/bug_server.py does):

    nbdkit -f -t 1 -U SOCK python tests/bugserver/plugin.py \
        file=IMAGE [bug=KIND@N ...] [log=LOG.jsonl] [stats=STATS.json]

Without ``bug=`` it is a correct server of IMAGE: reads and writes go to the file,
write-zeroes and trim punch holes (or write zeros where the file system cannot punch),
flush is fdatasync, FUA is emulated by a flush, multi-conn is off, no block status.

Each ``bug=KIND@N`` (repeatable, several at once) arms one bug from the Nth counted
request of its kind.  Requests are counted over the whole server (all connections), in
the order the server applies them; nbdkit serialises every request of this plugin, and
with ``-t 1`` it takes each connection's requests in the order they arrived.  A fresh
server over a fresh copy of the file given the same requests therefore fires at the
same request, every time.

A bug never fires without changing what a client sees: an armed bug whose request
would not change any byte is not spent, and fires on the next counted request that
does change bytes (the log entry's ``count`` then exceeds its ``armed``).

Kinds, with what is counted and the rule for the corrupt range:

``lost-write@N``
    Counts NBD_CMD_WRITE requests that cross a 64 KiB boundary (their first and last
    byte lie in different 64 KiB clusters).  The Nth (see above) is acknowledged and
    never applied.  Corrupt bytes: those of the write whose old contents differ from
    the written data.
``late-write@N``
    Counts every NBD_CMD_WRITE.  The Nth is acknowledged and held (not applied).  It is
    applied only after a later write that overlaps the held bytes (so it lies in the
    same 64 KiB cluster) leaves them different from the held data: the later write is
    applied first, then the held, stale data over it.  Two log entries: ``held`` (its
    corrupt bytes are those of the write whose old contents differ from the written
    data: what a read sees while it is held) and ``released`` (its corrupt bytes are
    those that later writes, write-zeroes or trims had set since the hold and that the
    stale data overwrote with different bytes).  A write still held when the server
    exits is never applied, and logged as ``unreleased`` (bytes of the write that
    differ from the file).  Only one write is held at a time; a second late-write bug
    waits for the first to be released.  Write-zeroes and trim never release it.
``neighbour-read@N``
    Counts NBD_CMD_READ requests.  The Nth is answered with the bytes 64 KiB further on
    (or 64 KiB before, when further on would pass the end of the disk).  Corrupt bytes:
    those of the read where the two ranges differ.

Log (``log=PATH``): one JSON object per line, written and flushed when the bug fires:

    {"kind": "lost-write", "armed": 3, "count": 3, "phase": "lost",
     "op": "write", "offset": 61440, "length": 8192,
     "first_byte": 61952, "last_byte": 69631, "first_sector": 121, "last_sector": 135}

``phase`` is ``lost`` (lost-write), ``held``/``released``/``unreleased`` (late-write)
or ``served`` (neighbour-read).  ``op``/``offset``/``length`` are the request the bug
planted (for ``released``, the held write; ``by`` then names the write that released
it as {"op", "offset", "length", "count"}).  ``first_byte``/``last_byte`` are the first
and last corrupt byte (inclusive; bytes between them may be right), and
``first_sector``/``last_sector`` are those divided by 512.  A neighbour-read entry also
has ``source_offset``, where the returned bytes came from.

Stats (``stats=PATH``): written once, when the server exits, as one JSON object with
the number of requests served (``reads``, ``writes``, ``zeroes``, ``trims``,
``flushes``) and the bytes they carried (``bytes_read``, ``bytes_written``,
``bytes_zeroed``, ``bytes_trimmed``), planted bugs included.
"""

from __future__ import annotations

import builtins
import ctypes
import errno
import json
import os

import nbdkit

API_VERSION = 2

CLUSTER = 64 * 1024
SECTOR = 512
KINDS = ("lost-write", "late-write", "neighbour-read")

_path: str | None = None
_log_path: str | None = None
_stats_path: str | None = None
_stats = {
    "reads": 0,
    "writes": 0,
    "zeroes": 0,
    "trims": 0,
    "flushes": 0,
    "bytes_read": 0,
    "bytes_written": 0,
    "bytes_zeroed": 0,
    "bytes_trimmed": 0,
}
_fd: int = -1
_bugs: list = []  # dicts: kind, armed, fired
_writes = 0  # every NBD_CMD_WRITE
_crossing_writes = 0  # writes whose first and last byte are in different clusters
_reads = 0
_held: dict | None = None  # the late write: offset, data, count, armed, touched [(s, e)]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


# ------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------


def config(key, value):
    global _path, _log_path, _stats_path
    if key == "file":
        _path = os.path.abspath(value)
    elif key == "log":
        _log_path = os.path.abspath(value)
    elif key == "stats":
        _stats_path = os.path.abspath(value)
    elif key == "bug":
        kind, sep, n = value.partition("@")
        if kind not in KINDS or not sep or not n.isdigit() or int(n) < 1:
            raise RuntimeError(
                f"bug={value!r}: expected KIND@N with N >= 1 and KIND one of {', '.join(KINDS)}"
            )
        _bugs.append({"kind": kind, "armed": int(n), "fired": False})
    else:
        raise RuntimeError(f"unknown parameter {key!r} (file=, bug=, log=, stats=)")


def config_complete():
    if _path is None:
        raise RuntimeError("file=IMAGE is required")


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def get_ready():
    global _fd
    _fd = os.open(_path, os.O_RDWR)
    if _log_path is not None:
        with builtins.open(_log_path, "a"):
            pass  # the log exists (empty) once the server listens


def cleanup():
    global _held
    if _held is not None:
        current = _pread(_held["offset"], len(_held["data"]))
        span = _diff(_held["data"], current)
        if span is not None:
            _log(
                _held["bug"],
                _held["count"],
                "unreleased",
                _held["offset"],
                len(_held["data"]),
                _held["offset"] + span[0],
                _held["offset"] + span[1],
            )
        _held = None
    if _fd >= 0:
        os.close(_fd)
    if _stats_path is not None:
        with builtins.open(_stats_path, "w") as f:
            f.write(json.dumps(_stats) + "\n")


# ------------------------------------------------------------------------------------
# what the server offers
# ------------------------------------------------------------------------------------


def open(readonly):
    return {"readonly": readonly}


def get_size(h):
    return os.fstat(_fd).st_size


def is_rotational(h):
    return False


def can_multi_conn(h):
    return False


def can_write(h):
    return True


def can_flush(h):
    return True


def can_trim(h):
    return True


def can_zero(h):
    return True


def can_fast_zero(h):
    return False


def can_fua(h):
    return nbdkit.FUA_EMULATE


def can_extents(h):
    return False


# ------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------


def _pread(offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        chunk = os.pread(_fd, length, offset)
        if not chunk:  # past the end: a short file reads as zeros
            parts.append(bytes(length))
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(parts)


def _pwrite(offset: int, data) -> None:
    view = memoryview(data)
    while len(view):
        n = os.pwrite(_fd, view, offset)
        view = view[n:]
        offset += n


def _zero(offset: int, length: int) -> None:
    if length <= 0:
        return
    mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(_fd, mode, offset, length) == 0:
        return
    err = ctypes.get_errno()
    if err not in (errno.EOPNOTSUPP, errno.ENOSYS):
        raise OSError(err, os.strerror(err))
    step = 1024 * 1024
    while length > 0:
        n = min(step, length)
        _pwrite(offset, bytes(n))
        offset += n
        length -= n


def _diff(a: bytes, b: bytes) -> tuple[int, int] | None:
    """(first, last) index where equal-length ``a`` and ``b`` differ, or None."""
    if a == b:
        return None
    n = len(a)
    step = 4096
    first = 0
    while a[first : first + step] == b[first : first + step]:
        first += step
    while a[first] == b[first]:
        first += 1
    last = n
    while a[max(last - step, 0) : last] == b[max(last - step, 0) : last]:
        last -= step
    last -= 1
    while a[last] == b[last]:
        last -= 1
    return first, last


def _crosses(offset: int, length: int) -> bool:
    return length > 0 and offset // CLUSTER != (offset + length - 1) // CLUSTER


def _armed(kind: str, count: int):
    for bug in _bugs:
        if bug["kind"] == kind and not bug["fired"] and bug["armed"] <= count:
            return bug
    return None


def _log(bug, count, phase, offset, length, first_byte, last_byte, **extra) -> None:
    if _log_path is None:
        return
    entry = {
        "kind": bug["kind"],
        "armed": bug["armed"],
        "count": count,
        "phase": phase,
        "op": "read" if bug["kind"] == "neighbour-read" else "write",
        "offset": offset,
        "length": length,
        "first_byte": first_byte,
        "last_byte": last_byte,
        "first_sector": first_byte // SECTOR,
        "last_sector": last_byte // SECTOR,
        **extra,
    }
    with builtins.open(_log_path, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _touch(offset: int, length: int) -> None:
    """Note that bytes [offset, offset+length) were set while a write is held."""
    if _held is None or length <= 0:
        return
    start = max(offset, _held["offset"])
    end = min(offset + length, _held["offset"] + len(_held["data"]))
    if start < end:
        _held["touched"].append((start, end))


def _maybe_release(by_offset: int, by_length: int, by_count: int) -> None:
    """Apply the held write over newer data, if a later write made the two differ."""
    global _held
    h = _held
    if h is None:
        return
    h_off, h_len = h["offset"], len(h["data"])
    if by_offset >= h_off + h_len or by_offset + by_length <= h_off:
        return  # this write does not overlap the held one
    first = last = None
    for start, end in h["touched"]:
        span = _diff(h["data"][start - h_off : end - h_off], _pread(start, end - start))
        if span is None:
            continue
        lo, hi = start + span[0], start + span[1]
        first = lo if first is None else min(first, lo)
        last = hi if last is None else max(last, hi)
    if first is None:
        return  # the stale data would overwrite nothing with different bytes: keep holding
    _pwrite(h_off, h["data"])
    _held = None
    _log(
        h["bug"],
        h["count"],
        "released",
        h_off,
        h_len,
        first,
        last,
        by={"op": "write", "offset": by_offset, "length": by_length, "count": by_count},
    )


# ------------------------------------------------------------------------------------
# requests
# ------------------------------------------------------------------------------------


def pread(h, buf, offset, flags):
    global _reads
    _reads += 1
    length = len(buf)
    _stats["reads"] += 1
    _stats["bytes_read"] += length
    data = _pread(offset, length)
    bug = _armed("neighbour-read", _reads)
    if bug is not None:
        size = get_size(h)
        source = offset + CLUSTER if offset + length + CLUSTER <= size else offset - CLUSTER
        if source >= 0:
            other = _pread(source, length)
            span = _diff(data, other)
            if span is not None:
                bug["fired"] = True
                data = other
                _log(
                    bug,
                    _reads,
                    "served",
                    offset,
                    length,
                    offset + span[0],
                    offset + span[1],
                    source_offset=source,
                )
    buf[:] = data


def pwrite(h, buf, offset, flags):
    global _writes, _crossing_writes, _held
    data = bytes(buf)
    length = len(data)
    _writes += 1
    _stats["writes"] += 1
    _stats["bytes_written"] += length
    crossing = _crosses(offset, length)
    if crossing:
        _crossing_writes += 1
        bug = _armed("lost-write", _crossing_writes)
        if bug is not None:
            span = _diff(_pread(offset, length), data)
            if span is not None:
                bug["fired"] = True
                _log(
                    bug,
                    _crossing_writes,
                    "lost",
                    offset,
                    length,
                    offset + span[0],
                    offset + span[1],
                )
                return  # acknowledged, never applied
    if _held is None:
        bug = _armed("late-write", _writes)
        if bug is not None:
            span = _diff(_pread(offset, length), data)
            if span is not None:
                bug["fired"] = True
                _held = {
                    "bug": bug,
                    "count": _writes,
                    "offset": offset,
                    "data": data,
                    "touched": [],
                }
                _log(bug, _writes, "held", offset, length, offset + span[0], offset + span[1])
                return  # acknowledged, held
    _pwrite(offset, data)
    if _held is not None:
        _touch(offset, length)
        _maybe_release(offset, length, _writes)


def zero(h, count, offset, flags):
    _stats["zeroes"] += 1
    _stats["bytes_zeroed"] += count
    _zero(offset, count)
    _touch(offset, count)


def trim(h, count, offset, flags):
    _stats["trims"] += 1
    _stats["bytes_trimmed"] += count
    _zero(offset, count)
    _touch(offset, count)


def flush(h, flags):
    _stats["flushes"] += 1
    os.fdatasync(_fd)
