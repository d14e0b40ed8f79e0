"""``blkverify io``: qemu-io's command set, with qemu-io's output.

The commands (read, readv, write, writev, discard, flush, length, info, alloc, map,
help, quit), their options, numbers (qemu's size suffixes), messages and exit
status follow the installed ``qemu-io`` (QEMU 10.0), which the test suite runs
side by side with this module. The code is written from observed behaviour and the
documented formats, not copied from QEMU.

Everything here talks to the Python API (:func:`blkverify_rs.open`); an image or
a ``blkverify:RAW:TEST`` device is driven the same way. A mismatch on a device
ends the session (QEMU's blkverify aborts the process) with the seed's message.
"""

from __future__ import annotations

import errno as errno_mod
import getopt as getopt_mod
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any

import blkverify_rs as bv
from blkverify_rs.cli_common import describe_error

# The largest request QEMU's block layer takes (INT_MAX rounded down to 512).
REQUEST_MAX_BYTES = 2147483136
PROMPT = "qemu-io> "


class CommandError(Exception):
    """A command failed; its message has already been printed."""


class Mismatch(Exception):
    """The device found different bytes (or results) on its two sides."""


def cvtstr(value: float) -> str:
    """A size as qemu-io prints it: ``512 bytes``, ``1.500 KiB``, ``64 KiB``."""
    units = ((60, " EiB"), (50, " PiB"), (40, " TiB"), (30, " GiB"), (20, " MiB"), (10, " KiB"))
    suffix, text = " bytes", f"{value:f}"
    for shift, unit in units:
        if value >= float(1 << shift):
            suffix, text = unit, f"{value / float(1 << shift):.3f}"
            break
    cut = text.find(".000")
    if cut >= 0:
        return text[:cut] + suffix
    return text + suffix


def timestr(seconds: float, verbose: bool) -> str:
    """The elapsed time on qemu-io's report line."""
    whole = int(seconds)
    frac = seconds - whole
    if verbose or whole:
        hours, minutes, secs = whole // 3600, (whole % 3600) // 60, whole % 60
        return f"{hours}:{minutes:02d}:{secs:02d}.{int(frac * 100):02d}"
    return f"{frac:05.2f} sec"


def parse_pattern(text: str) -> int | None:
    """A pattern byte as C's ``strtol(text, 0)`` reads it (decimal, 0x hex, 0 octal)."""
    m = re.fullmatch(r"\s*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    digits = m.group(2)
    if digits[:2].lower() == "0x":
        value = int(digits, 16)
    elif digits.startswith("0"):
        value = int(digits, 8)
    else:
        value = int(digits)
    if m.group(1) == "-":
        value = -value
    return value if 0 <= value <= 255 else None


@dataclass(frozen=True)
class Command:
    name: str
    altname: str | None
    argmin: int
    argmax: int  # -1: no limit
    args: str | None  # None: the help line has no argument part at all
    oneline: str
    func: Callable[[Session, list[str]], None]
    help: str | None = None
    writes: bool = False


class GetoptError(Exception):
    pass


def getopt(argv: list[str], spec: str, err: IO[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """GNU getopt with argument permutation, as qemu-io's commands parse options.

    Returns (options, operands). Prints glibc's message and raises GetoptError on
    an unknown option or a missing option argument.
    """
    try:
        opts, operands = getopt_mod.gnu_getopt(argv[1:], spec)
    except getopt_mod.GetoptError as exc:
        # qemu-io's commands take short options only, so to glibc "--name" is
        # the option "-"; Python's getopt reads it as a long option instead, and
        # its messages for those (only those) begin "option --".
        option = "-" if exc.msg.startswith("option --") else exc.opt
        if option != ":" and option in spec:
            err.write(f"{argv[0]}: option requires an argument -- '{option}'\n")
        else:
            err.write(f"{argv[0]}: invalid option -- '{option}'\n")
        raise GetoptError from None
    return [(name[1:], value) for name, value in opts], operands


class Session:
    """One open image or device and the streams a command prints to."""

    def __init__(self, dev: Any, out: IO[str], err: IO[str], read_only: bool) -> None:
        self.dev = dev
        self.out = out
        self.err = err
        # A format blkverify cannot write opens read-only whatever was asked.
        self.read_only = read_only or dev.read_only
        self.quit = False
        self.is_device = isinstance(dev, bv.Device)

    # ---- helpers -------------------------------------------------------------------

    def p(self, text: str) -> None:
        self.out.write(text + "\n")

    def usage(self, cmd: Command) -> None:
        self.p(f"{cmd.name} {cmd.args} -- {cmd.oneline}")
        raise CommandError

    def num(self, text: str) -> int:
        """A number in qemu's size syntax, with qemu-io's two complaints."""
        try:
            return bv.parse_size(text)
        except OverflowError:
            self.p(f"Parsing error: argument too large -- {text}")
        except ValueError:
            self.p(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- " + text
            )
        raise CommandError

    def pattern(self, text: str) -> int:
        value = parse_pattern(text)
        if value is None:
            self.p(f"{text} is not a valid pattern byte")
            raise CommandError
        return value

    def length(self, text: str) -> int:
        value = self.num(text)
        if value > REQUEST_MAX_BYTES:
            self.p(f"length cannot exceed {REQUEST_MAX_BYTES}, given {text}")
            raise CommandError
        return value

    def io(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one device call; print ``<what> failed: <strerror>`` on an error."""
        try:
            return fn()
        except bv.MismatchError as exc:
            raise Mismatch(str(exc)) from exc
        except (OSError, ValueError, bv.Error) as exc:
            code = _errno_of(exc)
            self.p(f"{what} failed: {os.strerror(code)}")
            raise CommandError from exc

    def in_range(self, offset: int, length: int) -> bool:
        return offset + length <= self.dev.size

    def report(
        self, op: str, elapsed: float, offset: int, count: int, total: int, machine: bool
    ) -> None:
        elapsed = max(elapsed, 1e-9)
        if machine:
            self.p(f"{total},1,{timestr(elapsed, True)},{total / elapsed:.3f},{1 / elapsed:.3f}")
            return
        self.p(f"{op} {total}/{count} bytes at offset {offset}")
        self.p(
            f"{cvtstr(total)}, 1 ops; {timestr(elapsed, False)} "
            f"({cvtstr(total / elapsed)}/sec and {1 / elapsed:.4f} ops/sec)"
        )

    def dump(self, data: bytes, offset: int) -> None:
        lines = []
        for i in range(0, len(data), 16):
            row = data[i : i + 16]
            hexes = "".join(f"{b:02x} " for b in row)
            text = "".join(chr(b) if row[j : j + 1].isalnum() else "." for j, b in enumerate(row))
            lines.append(f"{offset + i:08x}:  {hexes} {text}\n")
        self.out.write("".join(lines))

    def read_bytes(self, what: str, offset: int, count: int) -> tuple[bytes, float]:
        """Read through the device; past the end is EIO, as QEMU's block layer says."""
        start = time.perf_counter()
        if not self.in_range(offset, count):
            self.p(f"{what} failed: {os.strerror(errno_mod.EIO)}")
            raise CommandError
        data = self.io(what, lambda: self.dev.read(offset, count))
        return data, time.perf_counter() - start

    def write_call(self, what: str, offset: int, count: int, fn: Callable[[], Any]) -> float:
        start = time.perf_counter()
        if not self.in_range(offset, count):
            self.p(f"{what} failed: {os.strerror(errno_mod.EIO)}")
            raise CommandError
        self.io(what, fn)
        return time.perf_counter() - start

    def allocated(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, allocated) runs in the image's top layer, as qemu-io's
        alloc and map see them: every byte is allocated in the formats whose every
        byte QEMU counts so (raw, vpc, vdi: the core says which); elsewhere data,
        compressed and zero ranges are, unallocated ones are not."""
        if length <= 0 or offset >= self.dev.size:
            return []
        fmt = self.dev.test_format if self.is_device else self.dev.format
        if fmt in bv.formats(qemu_all_allocated=True):
            return [(offset, min(length, self.dev.size - offset), True)]
        runs: list[tuple[int, int, bool]] = []
        for off, ln, kind, _host in self.io("is_allocated", lambda: self.dev.map(offset, length)):
            alloc = kind != "unallocated"
            if runs and runs[-1][2] == alloc and runs[-1][0] + runs[-1][1] == off:
                runs[-1] = (runs[-1][0], runs[-1][1] + ln, alloc)
            else:
                runs.append((off, ln, alloc))
        return runs

    # ---- the commands ----------------------------------------------------------------

    def cmd_read(self, argv: list[str]) -> None:
        opts, args = self.getopt(argv, "bCl:pP:qrs:v", READ)
        machine = quiet = verbose = False
        pattern: int | None = None
        pat_off = pat_len = None
        for c, v in opts:
            if c == "b":
                self.unsupported(argv[0], c)
            elif c == "C":
                machine = True
            elif c == "l":
                pat_len = self.num(v)
            elif c == "P":
                pattern = self.pattern(v)
            elif c == "q":
                quiet = True
            elif c == "s":
                pat_off = self.num(v)
            elif c == "v":
                verbose = True
        if len(args) != 2:
            self.usage(READ)
        offset = self.num(args[0])
        count = self.length(args[1])
        if pattern is None and (pat_len is not None or pat_off is not None):
            self.usage(READ)
        pat_off = pat_off or 0
        if pat_len is None:
            pat_len = count - pat_off
        if pat_len < 0 or pat_len + pat_off > count:
            self.p("pattern verification range exceeds end of read data")
            raise CommandError
        data, elapsed = self.read_bytes("read", offset, count)
        failed = False
        if pattern is not None:
            if data[pat_off : pat_off + pat_len] != bytes([pattern]) * pat_len:
                self.p(f"Pattern verification failed at offset {offset + pat_off}, {pat_len} bytes")
                failed = True
        if not quiet:
            if verbose:
                self.dump(data, offset)
            self.report("read", elapsed, offset, count, count, machine)
        if failed:
            raise CommandError

    def cmd_readv(self, argv: list[str]) -> None:
        opts, args = self.getopt(argv, "CP:qrv", READV)
        machine = quiet = verbose = False
        pattern: int | None = None
        for c, v in opts:
            if c == "C":
                machine = True
            elif c == "P":
                pattern = self.pattern(v)
            elif c == "q":
                quiet = True
            elif c == "v":
                verbose = True
        if len(args) < 2:
            self.usage(READV)
        offset = self.num(args[0])
        count = self.iovec(args[1:])
        data, elapsed = self.read_bytes("readv", offset, count)
        failed = False
        if pattern is not None and data != bytes([pattern]) * count:
            self.p(f"Pattern verification failed at offset {offset}, {count} bytes")
            failed = True
        if not quiet:
            if verbose:
                self.dump(data, offset)
            self.report("read", elapsed, offset, count, count, machine)
        if failed:
            raise CommandError

    def iovec(self, lengths: list[str]) -> int:
        total = 0
        for text in lengths:
            n = self.num(text)
            if n > REQUEST_MAX_BYTES:
                self.p(f"Argument '{text}' exceeds maximum size {REQUEST_MAX_BYTES}")
                raise CommandError
            if total > REQUEST_MAX_BYTES - n:
                self.p(f"The total number of bytes exceed the maximum size {REQUEST_MAX_BYTES}")
                raise CommandError
            total += n
        return total

    def cmd_write(self, argv: list[str]) -> None:
        opts, args = self.getopt(argv, "bcCfnpP:qrs:uz", WRITE)
        machine = quiet = zero = unmap = fua = False
        pattern: int | None = None
        for c, v in opts:
            if c in "bcns":
                self.unsupported(argv[0], c)
            elif c == "C":
                machine = True
            elif c == "f":
                fua = True
            elif c == "P":
                pattern = self.pattern(v)
            elif c == "q":
                quiet = True
            elif c == "u":
                unmap = True
            elif c == "z":
                zero = True
        if len(args) != 2:
            self.usage(WRITE)
        if unmap and not zero:
            self.p("-u requires -z to be specified")
            raise CommandError
        if zero and pattern is not None:
            self.p("Only one of -z, -P, and -s can be specified at the same time")
            raise CommandError
        offset = self.num(args[0])
        count = self.num(args[1])
        if count > REQUEST_MAX_BYTES:
            # qemu-io allows more only with -n (write -z without fallback), which
            # blkverify io does not offer.
            self.p(f"length cannot exceed {REQUEST_MAX_BYTES} without -n, given {args[1]}")
            raise CommandError
        if zero:
            elapsed = self.write_call(
                "write", offset, count, lambda: self.dev.write_zeroes(offset, count, unmap)
            )
        else:
            data = bytes([0xCD if pattern is None else pattern]) * count
            elapsed = self.write_call("write", offset, count, lambda: self.dev.write(offset, data))
        if fua:
            self.io("write", self.dev.flush)
        if not quiet:
            self.report("wrote", elapsed, offset, count, count, machine)

    def cmd_writev(self, argv: list[str]) -> None:
        opts, args = self.getopt(argv, "CfqrP:", WRITEV)
        machine = quiet = fua = False
        pattern = 0xCD
        for c, v in opts:
            if c == "C":
                machine = True
            elif c == "f":
                fua = True
            elif c == "P":
                pattern = self.pattern(v)
            elif c == "q":
                quiet = True
        if len(args) < 2:
            self.usage(WRITEV)
        offset = self.num(args[0])
        count = self.iovec(args[1:])
        data = bytes([pattern]) * count
        elapsed = self.write_call("writev", offset, count, lambda: self.dev.write(offset, data))
        if fua:
            self.io("writev", self.dev.flush)
        if not quiet:
            self.report("wrote", elapsed, offset, count, count, machine)

    def cmd_discard(self, argv: list[str]) -> None:
        opts, args = self.getopt(argv, "Cq", DISCARD)
        machine = any(c == "C" for c, _ in opts)
        quiet = any(c == "q" for c, _ in opts)
        if len(args) != 2:
            self.usage(DISCARD)
        offset = self.num(args[0])
        count = self.length(args[1])
        elapsed = self.write_call("discard", offset, count, lambda: self.dev.discard(offset, count))
        if not quiet:
            self.report("discard", elapsed, offset, count, count, machine)

    def cmd_flush(self, argv: list[str]) -> None:
        if not self.read_only:
            self.io("flush", self.dev.flush)

    def cmd_length(self, argv: list[str]) -> None:
        self.p(cvtstr(self.dev.size))

    def cmd_info(self, argv: list[str]) -> None:
        facts = self.dev.info()
        if self.is_device:
            self.p("format name: blkverify")
            fmt = self.dev.test_format
        else:
            fmt = self.dev.format
            self.p(f"format name: {fmt}")
        if fmt == "vmdk":
            self.vmdk_info(facts)
            return
        if fmt == "vhdx":
            # qemu-io names the block size, and nothing format-specific.
            self.p(f"cluster size: {cvtstr(int(facts['cluster_size']))}")
            self.p("vm state offset: 0 bytes")
            return
        if fmt != "qcow2":
            # qemu-io's cluster size is the block size (vpc, vdi; 0 for raw and fixed VHDs)
            self.p(f"cluster size: {cvtstr(int(facts.get('block_size', 0)))}")
            self.p("vm state offset: 0 bytes")
            return
        cluster = int(facts["cluster_size"])
        l2_entries = cluster // (16 if facts.get("extended_l2") == "true" else 8)
        per_l1 = cluster * l2_entries
        vm_state = -(-self.dev.size // per_l1) * per_l1
        self.p(f"cluster size: {cvtstr(cluster)}")
        self.p(f"vm state offset: {cvtstr(vm_state)}")
        self.p("Format specific information:")
        v3 = facts.get("version") != "2"
        self.p(f"    compat: {'1.1' if v3 else '0.10'}")
        self.p(f"    compression type: {facts.get('compression_type', 'zlib')}")
        if v3:
            self.p(f"    lazy refcounts: {facts.get('lazy_refcounts', 'false')}")
        self.p(f"    refcount bits: {facts.get('refcount_bits', '16')}")
        if v3:
            if "data_file" in facts:
                self.p(f"    data file: {facts['data_file']}")
                self.p(f"    data file raw: {facts.get('data_file_raw', 'false')}")
            self.p(f"    corrupt: {facts.get('corrupt', 'false')}")
            self.p(f"    extended l2: {facts.get('extended_l2', 'false')}")

    def vmdk_info(self, facts: dict[str, str]) -> None:
        """qemu-io's ``info`` for a vmdk disk: the descriptor's IDs and each extent."""
        self.p(f"cluster size: {cvtstr(int(facts['cluster_size']))}")
        self.p("vm state offset: 0 bytes")
        self.p("Format specific information:")
        self.p(f"    cid: {int(facts['cid'], 16)}")
        self.p(f"    parent cid: {int(facts['parent_cid'], 16)}")
        self.p(f"    create type: {facts['create_type']}")
        self.p("    extents:")
        for index in range(int(facts["extents"])):
            extent = {
                key.split(".", 2)[2]: value
                for key, value in facts.items()
                if key.startswith(f"extent.{index}.")
            }
            self.p(f"        [{index}]:")
            if "compressed" in extent:
                self.p(f"            compressed: {extent['compressed']}")
            self.p(f"            virtual size: {extent['virtual_size']}")
            self.p(f"            filename: {extent['filename']}")
            if "cluster_size" in extent:
                self.p(f"            cluster size: {extent['cluster_size']}")
            self.p(f"            format: {extent['format']}")

    def cmd_alloc(self, argv: list[str]) -> None:
        offset = self.num(argv[1])
        count = self.num(argv[2]) if len(argv) == 3 else bv.SECTOR_SIZE
        end = min(offset + count, self.dev.size) if offset < self.dev.size else offset
        runs = self.allocated(offset, end - offset)
        covered = sum(ln for _, ln, _ in runs)
        allocated = sum(ln for _, ln, alloc in runs if alloc)
        self.p(f"{allocated}/{covered} bytes allocated at offset {cvtstr(offset)}")

    def cmd_map(self, argv: list[str]) -> None:
        for off, ln, alloc in self.allocated(0, self.dev.size):
            state = "    allocated" if alloc else "not allocated"
            self.p(f"{cvtstr(ln)} (0x{ln:x}) bytes {state} at offset {cvtstr(off)} (0x{off:x})")

    def cmd_help(self, argv: list[str]) -> None:
        if len(argv) == 2:
            cmd = find_command(argv[1])
            if cmd is None:
                self.p(f"command {argv[1]} not found")
                raise CommandError
            self.p(help_line(cmd))
            if cmd.help:
                self.out.write(cmd.help)
            return
        for cmd in COMMANDS:
            self.p(help_line(cmd))
        self.p("\nUse 'help commandname' for extended help.")

    def cmd_quit(self, argv: list[str]) -> None:
        self.quit = True

    # ---- dispatch ------------------------------------------------------------------------

    def getopt(
        self, argv: list[str], spec: str, cmd: Command
    ) -> tuple[list[tuple[str, str]], list[str]]:
        try:
            return getopt(argv, spec, self.err)
        except GetoptError:
            self.usage(cmd)
            raise  # pragma: no cover - usage() raises

    def unsupported(self, name: str, option: str) -> None:
        self.err.write(f"blkverify: {name} -{option} is not supported by blkverify io\n")
        raise CommandError

    def run(self, line: str) -> bool:
        """Run one command line; False if it failed."""
        argv = [w for w in line.rstrip("\n").split(" ") if w]
        if not argv:
            return True
        cmd = find_command(argv[0])
        if cmd is None:
            self.err.write(f'command "{argv[0]}" not found\n')
            return False
        argc = len(argv) - 1
        if argc < cmd.argmin or (cmd.argmax != -1 and argc > cmd.argmax):
            if cmd.argmax == -1:
                expected = f"at least {cmd.argmin}"
            elif cmd.argmin == cmd.argmax:
                expected = f"{cmd.argmin}"
            else:
                expected = f"between {cmd.argmin} and {cmd.argmax}"
            self.err.write(
                f"bad argument count {argc} to {argv[0]}, expected {expected} arguments\n"
            )
            return False
        if cmd.writes and self.read_only:
            self.err.write("qemu-io: Block node is read-only\n")
            return False
        try:
            cmd.func(self, argv)
        except CommandError:
            return False
        return True


def _errno_of(exc: BaseException) -> int:
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    if isinstance(exc, ValueError):
        return errno_mod.EINVAL
    return errno_mod.EIO


READ_HELP = """
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

"""

READV_HELP = """
 reads a range of bytes from the given offset into multiple buffers

 Example:
 'readv -v 512 1k 1k ' - dumps 2 kilobytes read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 Uses multiple iovec buffers if more than one byte range is specified.
 -C, -- report statistics in a machine parsable format
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -v, -- dump buffer to standard output

"""

WRITE_HELP = """
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer
 -s, -- use a pattern file to fill the write buffer
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_pwrite_zeroes

"""

WRITEV_HELP = """
 writes a range of bytes from the given offset source from multiple buffers

 Example:
 'writev 512 1k 1k' - writes 2 kilobytes at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -C, -- report statistics in a machine parsable format
 -f, -- use Force Unit Access semantics
 -P, -- use different pattern to fill file
 -q, -- quiet mode, do not show I/O statistics
 -r, -- register I/O buffer

"""

DISCARD_HELP = """
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

"""

ONELINE_RW = "a number of bytes at a specified offset"

ALLOC = Command(
    "alloc", "a", 1, 2, "offset [count]", "checks if offset is allocated in the file",
    Session.cmd_alloc,
)  # fmt: skip
DISCARD = Command(
    "discard", "d", 2, -1, "[-Cq] off len", "discards " + ONELINE_RW, Session.cmd_discard,
    DISCARD_HELP, writes=True,
)  # fmt: skip
FLUSH = Command("flush", "f", 0, 0, None, "flush all in-core file state to disk", Session.cmd_flush)
HELP = Command("help", "?", 0, 1, "[command]", "help for one or all commands", Session.cmd_help)
INFO = Command(
    "info", "i", 0, 0, None, "prints information about the current file", Session.cmd_info
)
LENGTH = Command(
    "length", "l", 0, 0, None, "gets the length of the current file", Session.cmd_length
)
MAP = Command("map", None, 0, 0, "", "prints the allocated areas of a file", Session.cmd_map)
QUIT = Command("quit", "q", 0, 0, None, "exit the program", Session.cmd_quit)
READ = Command(
    "read", "r", 2, -1, "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
    "reads " + ONELINE_RW, Session.cmd_read, READ_HELP,
)  # fmt: skip
READV = Command(
    "readv", None, 2, -1, "[-Cqrv] [-P pattern] off len [len..]", "reads " + ONELINE_RW,
    Session.cmd_readv, READV_HELP,
)  # fmt: skip
WRITE = Command(
    "write", "w", 2, -1, "[-bcCfnqruz] [-P pattern | -s source_file] off len",
    "writes " + ONELINE_RW, Session.cmd_write, WRITE_HELP, writes=True,
)  # fmt: skip
WRITEV = Command(
    "writev", None, 2, -1, "[-Cfqr] [-P pattern] off len [len..]", "writes " + ONELINE_RW,
    Session.cmd_writev, WRITEV_HELP, writes=True,
)  # fmt: skip

# Sorted by name, as qemu-io lists them.
COMMANDS = [ALLOC, DISCARD, FLUSH, HELP, INFO, LENGTH, MAP, QUIT, READ, READV, WRITE, WRITEV]


def help_line(cmd: Command) -> str:
    args = "" if cmd.args is None else cmd.args + " "
    return f"{cmd.name} {args}-- {cmd.oneline}"


def find_command(name: str) -> Command | None:
    for cmd in COMMANDS:
        if name == cmd.name or name == cmd.altname:
            return cmd
    return None


def run_io(
    spec: str,
    commands: list[str],
    fmt: str | None,
    read_only: bool,
    stdin: IO[str] | None = None,
    out: IO[str] = sys.stdout,
    err: IO[str] = sys.stderr,
    force_share: bool = False,
) -> int:
    """Open ``spec`` and run ``commands`` (or lines from ``stdin`` when there are
    none). Returns the exit status: 0, or 1 if the image could not be opened
    (locked by another process, say: qemu-io exits 1 there too), a command
    failed, or the device found a mismatch."""
    try:
        dev = bv.open(spec, format=fmt, read_only=read_only, force_share=force_share)
    except (bv.Error, OSError, ValueError) as exc:
        err.write(f"blkverify: error: {describe_error(exc, spec)}\n")
        return 1
    session = Session(dev, out, err, read_only)
    failed = False
    try:
        if commands:
            lines: Any = commands
        else:
            source = stdin if stdin is not None else sys.stdin
            lines = _prompted(source, out) if source.isatty() else source
        for line in lines:
            if not session.run(line):
                failed = True
            if session.quit:
                break
    except Mismatch as exc:
        out.flush()
        err.write(f"{exc}\n")
        return 1
    finally:
        dev.close()
    return 1 if failed else 0


def _prompted(source: IO[str], out: IO[str]) -> Any:
    while True:
        out.write(PROMPT)
        out.flush()
        line = source.readline()
        if not line:
            out.write("\n")
            return
        yield line
