"""``blkverify batch MANIFEST``: verify many pairs at once, within one core
budget, or as tasks on a Dask cluster (``--scheduler``).

A manifest line is ``RAW TEST`` (two whitespace-separated paths) or a JSON
object ``{"raw", "test", "raw_format"?, "test_format"?, "snapshot"?, "all"?,
"strict"?, "workers"?}``: RAW is the reference, in any format blkverify reads,
as in ``verify``. Blank lines and lines starting with ``#`` are ignored.
Relative paths resolve against the manifest's directory. The verification
itself runs in Rust through :func:`blkverify_rs.iter_verify_many`; this
module reads the manifest (line by line, twice: never held whole), shows
progress and prints each pair's result as its turn comes, the same way
wherever the pairs ran.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from typing import IO, TYPE_CHECKING, Any

import click

import blkverify_rs as bv
from blkverify_rs.cli_common import (
    EXIT_ERROR,
    EXIT_FINDING,
    EXIT_OK,
    describe_error,
    fail,
    force_share_option,
    reported,
    size_option,
)
from blkverify_rs.report import ProgressBar, human_size

if TYPE_CHECKING:
    from blkverify_rs import Report


class ManifestError(ValueError):
    """A line of the manifest that cannot be used: ``file:line: fact``."""


def _resolve(base: str, path: str) -> str:
    if os.path.isabs(path) or bv.is_nbd_uri(path):
        return path
    return os.path.join(base, path)


def parse_manifest_line(text: str, where: str, base: str) -> dict[str, Any] | None:
    """One pair from one line, or None for a blank line or a comment."""
    line = text.strip()
    if not line or line.startswith("#"):
        return None
    if line.startswith("{"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
            ) from None
        if not isinstance(obj, dict):
            raise ManifestError(f"{where}: a JSON line must be an object")
        try:
            bv.check_pair(obj)
        except ValueError as exc:
            raise ManifestError(f"{where}: {exc}") from None
        pair = {k: v for k, v in obj.items() if v is not None}
    else:
        fields = line.split()
        if len(fields) != 2:
            raise ManifestError(
                f"{where}: expected 'RAW TEST' or a JSON object, got {len(fields)} field(s)"
            )
        pair = {"raw": fields[0], "test": fields[1]}
    pair["raw"] = _resolve(base, pair["raw"])
    pair["test"] = _resolve(base, pair["test"])
    return pair


class Manifest:
    """The pairs of the manifest at ``path``, read line by line each time it
    is iterated, never held whole: a first pass checks every line (and sizes
    the progress total), a second verifies. ``ManifestError`` names a bad
    line."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.base = os.path.dirname(os.path.abspath(path))

    def entries(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """Each pair, with the number of the line it is on."""
        try:
            with open(self.path, encoding="utf-8") as f:
                for number, text in enumerate(f, start=1):
                    pair = parse_manifest_line(text, f"{self.path}:{number}", self.base)
                    if pair is not None:
                        yield number, pair
        except UnicodeDecodeError:
            raise ManifestError(f"{self.path}: not a text file (UTF-8)") from None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return (pair for _, pair in self.entries())

    def check(self) -> int:
        """The number of pairs, every line checked (``ManifestError``); no
        pairs at all is an error too."""
        count = sum(1 for _ in self.entries())
        if not count:
            raise ManifestError(f"{self.path}: no pairs to verify")
        return count


def page_name(line: int, test: str) -> str:
    """The name of a pair's HTML map: its manifest line, then the test image's
    file name (``12-disk.qcow2.html``)."""
    return f"{line}-{os.path.basename(test)}.html"


def error_record(pair: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """The JSON line for a pair that could not be verified."""
    return {"raw": pair["raw"], "test": pair["test"], "error": describe_error(exc)}


def result_status(res: Report | BaseException) -> int:
    """A pair's exit status: 0 identical, 1 it differs, 2 it failed."""
    if isinstance(res, BaseException):
        return EXIT_ERROR
    return EXIT_OK if res.identical else EXIT_FINDING


class SummaryTable:
    """The human summary, one row per pair, and a closing line of totals.
    The columns are as wide as their widest cell, known only at the end, so
    the rows wait in a temporary file (strings only), not in memory."""

    HEADER = ("pair", "size", "result", "first corrupt sector", "MiB/s")

    def __init__(self) -> None:
        self.rows: IO[str] = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.widths = [len(cell) for cell in self.HEADER]
        self.counts = {"identical": 0, "differ": 0, "failed": 0}
        self.bytes_compared = 0

    def add(self, pair: dict[str, Any], res: Report | BaseException) -> None:
        row = self.row(pair, res)
        self.widths = [max(w, len(cell)) for w, cell in zip(self.widths, row, strict=True)]
        self.rows.write(json.dumps(row) + "\n")

    def row(self, pair: dict[str, Any], res: Report | BaseException) -> tuple[str, ...]:
        name = f"{pair['raw']} {pair['test']}"
        if isinstance(res, BaseException):
            self.counts["failed"] += 1
            return (name, "-", "error", "-", "-")
        self.bytes_compared += res.bytes_compared
        self.counts["identical" if res.identical else "differ"] += 1
        if res.identical:
            result = "identical"
        elif res.mismatches:
            result = "differ"
        else:
            result = "size differs"
        first = "-"
        if res.mismatches:
            m = res.mismatches[0]
            first = f"block {m.block}" if isinstance(m, bv.BlockMismatch) else str(m.sector)
        rate = res.bytes_compared / (1 << 20) / res.elapsed_s if res.elapsed_s > 0 else 0.0
        return (name, human_size(res.virtual_size), result, first, f"{rate:.0f}")

    def _line(self, row: Iterable[str]) -> str:
        cells = [
            cell.ljust(w) if col == 0 or col == 2 else cell.rjust(w)
            for col, (cell, w) in enumerate(zip(row, self.widths, strict=True))
        ]
        return "  ".join(cells).rstrip() + "\n"

    def write(self, out: IO[str]) -> None:
        """Print the table, then the totals: the pairs by result, and the
        guest bytes compared in all pairs (each pair's ``bytes_compared``)."""
        out.write(self._line(self.HEADER))
        out.write("  ".join("-" * w for w in self.widths) + "\n")
        self.rows.seek(0)
        for text in self.rows:
            out.write(self._line(json.loads(text)))
        self.rows.close()
        pairs = sum(self.counts.values())
        c = self.counts
        out.write(
            f"{pairs} pairs: {c['identical']} identical, {c['differ']} differ, "
            f"{c['failed']} failed; {self.bytes_compared} bytes compared "
            f"({human_size(self.bytes_compared)})\n"
        )


def connect(address: str, timeout: float) -> Any:
    """A client of the Dask scheduler at ``address``, or exit with status 2 and
    one line: Dask is not installed, or the scheduler cannot be reached (or
    has no worker) within ``timeout`` seconds."""
    from blkverify_rs import cluster

    try:
        cluster.quiet_logs()
        return cluster.connect(address, timeout)
    except ImportError:
        fail('--scheduler needs Dask: pip install "blkverify-rs[dask]"')
    except (OSError, ValueError) as exc:
        fail(describe_error(exc))


@click.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--all", "all_", is_flag=True, help="Find every mismatch (default per pair).")
@click.option("--strict", is_flag=True, help="A size difference is a mismatch (default per pair).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per pair.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress line on stderr (default: when stderr is a terminal).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option(
    "--threads",
    type=click.IntRange(0, 64),
    default=0,
    help="Worker threads in all, shared by the pairs (0: one per core); with "
    "--scheduler, per task (0: the host's cores split between its workers' task slots).",
)
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Run the pairs as tasks on the Dask cluster whose scheduler is at ADDRESS "
    '(tcp://HOST:8786); needs pip install "blkverify-rs[dask]".',
)
@click.option(
    "--scheduler-timeout",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to try to reach the scheduler, and to wait for a worker (or for "
    "a pinned pair's workers to come back).",
)
@click.option(
    "--split",
    metavar="SIZE",
    help="With --scheduler: verify a pair larger than SIZE as ranges of SIZE bytes, "
    "each a task (default 64G; a multiple of 64k).",
)
@force_share_option
@click.option(
    "--html",
    "html_dir",
    metavar="DIR",
    type=click.Path(file_okay=False),
    help="Write an HTML map of each pair that differs to DIR, named LINE-TESTNAME.html "
    "(implies --all for pairs that do not say).",
)
def batch(
    manifest: str,
    all_: bool,
    strict: bool,
    as_json: bool,
    progress: bool | None,
    quiet: bool,
    threads: int,
    scheduler: str | None,
    scheduler_timeout: float,
    split: str | None,
    force_share: bool,
    html_dir: str | None,
) -> None:
    """Verify every pair listed in MANIFEST, in parallel, here or on a Dask
    cluster (--scheduler).

    A line is 'RAW TEST' (RAW: the reference, in any format), or a JSON object
    {"raw", "test", "raw_format", "test_format", "snapshot", "all", "strict",
    "workers"}; '#' starts a comment line. RAW may be a block digests file (see
    'blkverify digest --blocks'). "workers" pins a pair to the cluster workers
    (names, addresses or hosts) that can see its files; "raw_workers" and
    "test_workers" pin each side instead, for a pair whose sides live on
    different hosts: each side is then hashed where it lives and only block
    digests cross the network (the findings are blocks).
    Prints a summary table (or, with --json, one JSON object per pair: the
    verify --json object, or {"raw", "test", "error"}). With --html DIR, also
    draws each pair that differs: DIR/LINE-TESTNAME.html, the test image's map
    with the pair's findings marked (see 'blkverify map'). Exit status: the
    worst result (0 identical, 1 a pair differs, 2 a pair could not be verified).
    """
    if split is not None and scheduler is None:
        fail("--split needs --scheduler: a local batch verifies each pair whole")
    split_bytes = size_option("--split", split)
    source = Manifest(manifest)
    if scheduler is not None:
        # Before connecting: a bad line fails at once, not after the wait.
        with reported():
            source.check()

    show = progress if progress is not None else (sys.stderr.isatty() and not quiet)
    bar = ProgressBar(sys.stderr) if show and not quiet else None
    table = None if as_json or quiet else SummaryTable()
    status = EXIT_OK
    pairs = 0
    client = None
    try:
        with reported(bar):
            cluster: dict[str, Any] = {}
            if scheduler is not None:
                client = cluster["client"] = connect(scheduler, scheduler_timeout)
                cluster["scheduler_timeout"] = scheduler_timeout
            if split_bytes is not None:
                cluster["split"] = split_bytes
            recording = Recording(source)
            with warnings.catch_warnings():
                # The batch's own warning (too few descriptors for the
                # threads) is one line of ours, not Python's.
                warnings.simplefilter("always", RuntimeWarning)
                warnings.showwarning = _show_warning(bar)
                # The first pass over the manifest (every line checked, the
                # files' sizes added up) runs here, before any pair does.
                results = bv.iter_verify_many(
                    recording,
                    all=all_ or html_dir is not None,
                    strict=strict,
                    threads=threads,
                    progress=bar.update if bar else None,
                    force_share=force_share,
                    **cluster,
                )
                with closing(results):  # ended here, before the client closes
                    for res in results:
                        line, pair = recording.taken()
                        pairs += 1
                        status = max(status, result_status(res))
                        if not quiet:
                            report_pair(pair, res, as_json, table, bar)
                        if html_dir is not None and not isinstance(res, BaseException):
                            if not res.identical:
                                os.makedirs(html_dir, exist_ok=True)
                                page = os.path.join(html_dir, page_name(line, pair["test"]))
                                res.to_html(page)
    finally:
        if client is not None:
            client.close()
    if not pairs:
        fail(f"{manifest}: no pairs to verify")
    if table is not None:
        table.write(sys.stdout)
    sys.exit(status)


class Recording:
    """The manifest's pairs as ``iter_verify_many`` reads them: its first pass
    (the check) just reads them; the second, the one verified, also keeps
    each pair with its line number until the result that comes back for it
    takes it (``taken``): at most the stream's window of pairs, in order."""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.passes = 0
        self.pending: deque[tuple[int, dict[str, Any]]] = deque()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.passes += 1
        if self.passes == 1:
            return iter(self.manifest)
        self.pending.clear()
        return self._recorded()

    def _recorded(self) -> Iterator[dict[str, Any]]:
        for entry in self.manifest.entries():
            self.pending.append(entry)
            yield entry[1]

    def taken(self) -> tuple[int, dict[str, Any]]:
        """The line and the pair of the next result."""
        return self.pending.popleft()


def _show_warning(bar: ProgressBar | None) -> Callable[..., None]:
    def show(message: Warning | str, *args: Any, **kwargs: Any) -> None:
        if bar is not None:
            bar.finish()
        click.echo(f"blkverify: warning: {message}", err=True)

    return show


def report_pair(
    pair: dict[str, Any],
    res: Report | BaseException,
    as_json: bool,
    table: SummaryTable | None,
    bar: ProgressBar | None,
) -> None:
    """Print what one pair's result says, as soon as it is in: its error or
    warnings on stderr, its JSON line (or its table row, for the end)."""
    if isinstance(res, BaseException):
        messages = [f"blkverify: error: {describe_error(res)}"]
    else:
        messages = [f"blkverify: warning: {pair['test']}: {w}" for w in res.warnings]
    if messages and bar is not None:
        bar.finish()  # the progress line ends; the next update starts another
    for message in messages:
        click.echo(message, err=True)
    if as_json:
        record = error_record(pair, res) if isinstance(res, BaseException) else res.to_dict()
        click.echo(json.dumps(record))
    elif table is not None:
        table.add(pair, res)
