"""Reporting: the human text and JSON for verify, digest, exercise and serve
reports, and the progress bar.

:class:`ProgressBar` is the one progress display: verify, digest and batch
draw it, for pairs verified here or on a Dask cluster (whose workers only
send their counts, see ``cluster._ProgressEvents``). It is ours, not a
library's. ``click.progressbar`` prints its label once and nothing more on a
stream that is not a terminal, and has no MiB/s figure, while ``--progress``
to a pipe must keep printing our lines (scripts and CI logs read them). rich
writes only the final state of its display to a stream that is not a
terminal (Textualize/rich#3040), and costs start-up time. tqdm does redraw
into a pipe, but its line (``45%|####  | 1.00G/2.00G [00:01<00:01,
512MiB/s]``) is not the one scripts and the tests read; shaping it back takes
a custom format and a new dependency, for forty lines that already do the job.
"""

from __future__ import annotations

import json
import time
from typing import IO, TYPE_CHECKING, Any

from blkverify_rs._native import SECTOR_SIZE

if TYPE_CHECKING:
    from blkverify_rs import (
        BlockMismatch,
        Digest,
        ExerciseFinding,
        ExerciseResult,
        Mismatch,
        ReplayFinding,
        ReplayResult,
        Report,
        ServeSummary,
        ShrinkResult,
    )


def to_json(rep: Report) -> str:
    """The ``--json`` object, on one line."""
    return json.dumps(rep.to_dict())


def describe_mapping(mapping: dict[str, Any] | None) -> str | None:
    """Where the metadata puts a byte, in the words a driver developer debugs with:
    the lookup path through the format's own tables, then what it found."""
    if not mapping:
        return None
    where = ", ".join(f"{t['table']} index {t['index']}" for t in mapping["tables"])
    if mapping.get("subcluster") is not None:
        where += f", subcluster {mapping['subcluster']}"
    kind = mapping["kind"]
    host = mapping.get("host_offset")
    file = mapping["file"]
    unit = mapping["unit"]
    if kind == "data":
        # qcow2 has always said "data cluster"; other formats name the unit alone.
        noun = "data cluster" if unit == "cluster" else unit
        what = f"{noun} at host offset {host:#x} in {file}"
    elif kind == "compressed":
        what = f"compressed {unit} at host offset {host:#x} in {file}"
    elif kind == "zero":
        what = f"zero {unit} (reads as zeros)"
    elif kind == "backing":
        depth = mapping.get("backing_depth", 1)
        what = f"unallocated, read from backing file {file} (depth {depth})"
        if host is not None:
            what += f" at host offset {host:#x}"
    else:
        what = "unallocated (reads as zeros)"
    return f"{where}: {what}" if where else what


def describe_mismatch(m: Mismatch | BlockMismatch) -> str:
    """One line for one run, in the seed document's words (in blocks against a
    block digests file, which cannot name the byte)."""
    if hasattr(m, "block"):
        return _describe_blocks(m)  # type: ignore[arg-type]
    sectors = max(1, (m.length + SECTOR_SIZE - 1) // SECTOR_SIZE)
    span = f"{sectors} sector{'s' if sectors != 1 else ''}"
    if m.error:
        return (
            f"blkverify: read error in sector {m.sector} (offset {m.offset:#x}, {span}): {m.error}"
        )
    return (
        f"blkverify: contents mismatch in sector {m.sector} "
        f"(offset {m.offset:#x}, {span}, first differing byte at offset {m.first_byte:#x})"
    )


def _describe_blocks(m: BlockMismatch) -> str:
    where = f"block {m.block}" if m.blocks == 1 else f"blocks {m.block}-{m.block + m.blocks - 1}"
    span = f"offset {m.offset:#x}, {m.length} bytes"
    if m.error:
        return f"blkverify: read error in {where} ({span}): {m.error}"
    return f"blkverify: contents mismatch in {where} ({span})"


def digest_line(d: Digest) -> str:
    """``<hex digest>  <IMAGE>``, as blksum and sha256sum print it."""
    return f"{d.hexdigest}  {d.image}"


def human(rep: Report, all_: bool = False) -> str:
    """The report as text."""
    if rep.identical:
        if rep.range is not None:
            start, length = rep.range
            return (
                f"Images are identical from offset {start:#x} for {length} bytes "
                f"(of {rep.virtual_size}).\n"
            )
        return "Images are identical.\n"
    lines: list[str] = []
    for m in rep.mismatches:
        lines.append(describe_mismatch(m))
        where = describe_mapping(m.mapping)
        if where:
            lines.append(f"  {rep.test_format} metadata: {where}")
        # A reference with metadata of its own (not raw) is named too: either
        # side may be the one that is wrong. (A block digests file has none.)
        ref_where = describe_mapping(getattr(m, "ref_mapping", None))
        if ref_where:
            lines.append(f"  reference {rep.raw_format} metadata: {ref_where}")
    if not rep.mismatches:
        lines.append(
            f"Images differ in size: {rep.raw} is {rep.raw_size} bytes, "
            f"{rep.test} is {rep.test_size} bytes (--strict)."
        )
    elif all_:
        total = sum(m.length for m in rep.mismatches)
        more = " (list truncated)" if rep.truncated else ""
        lines.append(
            f"Images differ: {len(rep.mismatches)} mismatching run(s), {total} bytes{more}."
        )
    else:
        lines.append("Images differ (stopped at the first mismatch; --all lists every one).")
    return "\n".join(lines) + "\n"


def human_size(n: float) -> str:
    """Bytes in binary units, one decimal: ``512 B``, ``4.0 MiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class ProgressBar:
    """A one-line progress display: bytes, MiB/s and ETA, redrawn in place at
    most every ``min_interval`` seconds (and at the end), after ``prefix``.
    A batch's line leads with its pairs (``pairs 1/2``). Why it is not
    click's, tqdm's or rich's: see the module docstring."""

    def __init__(self, stream: IO[str], min_interval: float = 0.2) -> None:
        self.stream = stream
        self.start = time.monotonic()
        self.last_draw = 0.0
        self.min_interval = min_interval
        self.drawn = False
        self.prefix = ""

    def update(
        self, done: int, total: int, pairs_done: int | None = None, pairs_total: int | None = None
    ) -> None:
        """``progress(done, total)`` for verify and digest, and
        ``progress(done, total, pairs_done, pairs_total)`` for a batch."""
        if pairs_total is not None:
            self.prefix = f"pairs {pairs_done}/{pairs_total}  "
        now = time.monotonic()
        if now - self.last_draw < self.min_interval and done < total:
            return
        self.last_draw = now
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        pct = 100.0 * done / total if total else 100.0
        eta = (total - done) / rate if rate > 0 else 0.0
        line = (
            f"\r{self.prefix}{human_size(done)} / {human_size(total)} {pct:5.1f}%  "
            f"{rate / (1 << 20):8.1f} MiB/s  ETA {eta:5.1f}s"
        )
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def exercise_json(result: ExerciseResult) -> str:
    """``exercise --json``: one object on one line."""
    return json.dumps(result.to_dict())


def _finding_lines(f: ExerciseFinding | ReplayFinding, unit: str = "op") -> list[str]:
    """A finding's lines; ``unit`` names what the record holds (a trace's
    requests, an op log's ops)."""
    lines = [f.message]
    connection = getattr(f, "connection", None)
    if f.op_number is not None and connection is not None:
        lines.append(f"  at request {f.op_number} (connection {connection}): {f.op}")
    elif f.op_number is not None:
        lines.append(f"  at op {f.op_number}: {f.op}")
    else:
        lines.append(f"  found by the {f.phase}, after the last op")
    if f.kind == "return_value":
        if f.test_error:
            lines.append(f"  test side: {f.test_error}")
        if f.raw_error:
            lines.append(f"  raw side: {f.raw_error}")
    if f.sector is not None:
        lines.append(
            f"  sector {f.sector} (offset {f.sector * SECTOR_SIZE:#x}), "
            f"first differing byte at offset {f.first_byte:#x}:"
        )
        lines += [f"    {line}" for line in f.hexdump]
    mapping = describe_mapping(getattr(f, "mapping", None))
    if mapping is not None:
        lines.append(f"  test side: {mapping}")
    if f.last_change is not None:
        lines.append(f"  last changed by {unit} {f.last_change}")
    if f.diagnosis is not None:
        lines.append(f"  {f.diagnosis}")
    return lines


def exercise_human(result: ExerciseResult) -> str:
    """The summary line, then each finding and the command that reproduces it."""
    rate = f"{result.ops_per_s:,.0f} ops/s"
    verify = (
        f"; whole device verified in {result.verify_elapsed_s:.2f} s" if result.verified else ""
    )
    lines = [
        f"exercise: {result.ops} ops in {result.elapsed_s:.2f} s ({rate}, queue depth "
        f"{result.queue_depth}), seed {result.seed}; read {_mib(result.bytes_read)}, "
        f"wrote {_mib(result.bytes_written)}{verify}"
    ]
    for f in result.mismatches:
        lines += _finding_lines(f)
    if result.mismatches:
        lines.append("Reproduce (on the images as they were before this run):")
        lines.append(f"  {result.reproduce}")
    else:
        lines.append("No mismatch.")
    return "\n".join(lines) + "\n"


def shrink_human(result: ShrinkResult) -> str:
    """What shrinking kept, the finding it still gives, and how to replay it."""
    lines = [
        f"shrunk {result.ops_before} ops to {result.ops_after} in {result.trials} trials "
        f"({result.elapsed_s:.1f} s): {result.log}",
        *_finding_lines(result.finding, "request" if result.kind == "trace" else "op"),
        "Reproduce (on the images as they were before the failing run):",
        f"  {result.reproduce}",
    ]
    return "\n".join(lines) + "\n"


def replay_human(result: ReplayResult) -> str:
    """The summary line, then the finding and the command that replays it again."""
    what = "requests" if result.kind == "trace" else "ops"
    verify = (
        f"; whole device verified in {result.verify_elapsed_s:.2f} s" if result.verified else ""
    )
    lines = [
        f"replay: {result.ops} of {result.total} {what} of {result.record} in "
        f"{result.elapsed_s:.2f} s ({result.ops_per_s:,.0f} ops/s, queue depth "
        f"{result.queue_depth}); read {_mib(result.bytes_read)}, "
        f"wrote {_mib(result.bytes_written)}{verify}"
    ]
    for f in result.mismatches:
        lines += _finding_lines(f, "request" if result.kind == "trace" else "op")
    if result.mismatches:
        lines.append("Reproduce (on the images as they were when the recorded run started):")
        lines.append(f"  {result.reproduce}")
    else:
        lines.append("No mismatch.")
    return "\n".join(lines) + "\n"


def serve_summary(summary: ServeSummary) -> str:
    """``serve``'s summary for stderr: requests, both sides' bytes, findings,
    and what did not reach the client."""
    by = ", ".join(f"{n} {name}" for name, n in summary.by_command.items() if n)
    clients = f"{summary.connections} client{'s' if summary.connections != 1 else ''}"
    finds = f"{summary.findings} finding{'s' if summary.findings != 1 else ''}"
    lines = [
        f"blkverify: serve: {summary.requests} requests from {clients} in "
        f"{summary.elapsed_s:.2f} s{f' ({by})' if by else ''}; {finds}; "
        f"stopped by {summary.stopped_by}"
    ]
    for side, name, counts in (
        ("test", f"{summary.test_image} ({summary.test_format})", summary.test),
        ("raw", summary.raw_image, summary.raw),
    ):
        lines.append(
            f"blkverify: serve: {side} {name}: read {human_size(counts['read'])}, "
            f"wrote {human_size(counts['written'])}, zeroed {human_size(counts['zeroed'])}, "
            f"discarded {human_size(counts['discarded'])}"
        )
    if summary.refused:
        lines.append(
            f"blkverify: serve: {summary.refused} requests refused (bad range, size or flags)"
        )
    if summary.dropped_replies:
        lines.append(
            f"blkverify: serve: {summary.dropped_replies} replies dropped: the client left "
            "while the request ran (it ran on both sides)"
        )
    if summary.truncated_requests:
        lines.append(
            f"blkverify: serve: {summary.truncated_requests} requests cut short by the client "
            "leaving (not run)"
        )
    if summary.trace is not None:
        lines.append(trace_line(summary.trace))
    return "\n".join(lines) + "\n"


def trace_line(t: dict[str, Any]) -> str:
    """What a trace recorded: requests, the data they wrote, and what that cost."""
    blocks = t["new_blocks"] + t["repeated_blocks"] + t["zero_blocks"]
    writes = f"{t['writes']} write{'s' if t['writes'] != 1 else ''}"
    stored = (
        ""
        if not blocks
        else (
            f" ({100 * t['repeated_blocks'] / blocks:.0f}% of 4 KiB blocks repeated, "
            f"{100 * t['zero_blocks'] / blocks:.0f}% zeros)"
        )
    )
    return (
        f"blkverify: serve: trace {t['path']}: {t['requests']} requests, "
        f"{human_size(t['write_bytes'])} written in {writes}{stored}; "
        f"{human_size(t['file_bytes'])} on disk"
    )
