"""``blkverify batch MANIFEST``: verify many pairs at once, within one core
budget, or as tasks on a Dask cluster (``--scheduler``).

A manifest line is ``RAW TEST`` (two whitespace-separated paths) or a JSON
object ``{"raw", "test", "raw_format"?, "test_format"?, "snapshot"?, "all"?,
"strict"?, "workers"?}``: RAW is the reference, in any format blkverify reads,
as in ``verify``. Blank lines and lines starting with ``#`` are ignored.
Relative paths resolve against the manifest's directory. The verification
itself runs in Rust through :func:`blkverify_rs.verify_many`; this module
parses, shows progress and reports, the same way wherever the pairs ran.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

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


class ManifestError(Exception):
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


def read_manifest(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Every pair of the manifest at ``path``, and the line each came from;
    ``ManifestError`` names the bad line."""
    base = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ManifestError(f"{path}: not a text file (UTF-8)") from None
    pairs, numbers = [], []
    for number, text in enumerate(lines, start=1):
        pair = parse_manifest_line(text, f"{path}:{number}", base)
        if pair is not None:
            pairs.append(pair)
            numbers.append(number)
    if not pairs:
        raise ManifestError(f"{path}: no pairs to verify")
    return pairs, numbers


def page_name(line: int, test: str) -> str:
    """The name of a pair's HTML map: its manifest line, then the test image's
    file name (``12-disk.qcow2.html``)."""
    return f"{line}-{os.path.basename(test)}.html"


def write_pages(
    out_dir: str, pairs: list[dict[str, Any]], lines: list[int], results: list[Report | Exception]
) -> None:
    """One HTML map per pair that differs (see ``Report.to_html``)."""
    os.makedirs(out_dir, exist_ok=True)
    for pair, line, res in zip(pairs, lines, results, strict=True):
        if not isinstance(res, BaseException) and not res.identical:
            res.to_html(os.path.join(out_dir, page_name(line, pair["test"])))


def error_record(pair: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """The JSON line for a pair that could not be verified."""
    return {"raw": pair["raw"], "test": pair["test"], "error": describe_error(exc)}


def summary_table(pairs: list[dict[str, Any]], results: list[Report | Exception]) -> str:
    """The human summary: one row per pair."""
    header = ("pair", "size", "result", "first corrupt sector", "MiB/s")
    rows = []
    for pair, res in zip(pairs, results, strict=False):
        name = f"{pair['raw']} {pair['test']}"
        if isinstance(res, BaseException):
            rows.append((name, "-", "error", "-", "-"))
            continue
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
        rows.append((name, human_size(res.virtual_size), result, first, f"{rate:.0f}"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for i, row in enumerate([header, *rows]):
        cells = [
            cell.ljust(w) if col == 0 or col == 2 else cell.rjust(w)
            for col, (cell, w) in enumerate(zip(row, widths, strict=False))
        ]
        lines.append("  ".join(cells).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def exit_status(results: list[Report | Exception]) -> int:
    """The worst result: 0 all identical < 1 a pair differs < 2 a pair failed."""
    worst = EXIT_OK
    for res in results:
        if isinstance(res, BaseException):
            return EXIT_ERROR
        if not res.identical:
            worst = EXIT_FINDING
    return worst


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
    try:
        pairs, lines = read_manifest(manifest)
    except ManifestError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(describe_error(exc))
    if split is not None and scheduler is None:
        fail("--split needs --scheduler: a local batch verifies each pair whole")
    split_bytes = size_option("--split", split)

    show = progress if progress is not None else (sys.stderr.isatty() and not quiet)
    bar = ProgressBar(sys.stderr) if show and not quiet else None
    client = None
    try:
        with reported(bar):
            cluster: dict[str, Any] = {}
            if scheduler is not None:
                client = cluster["client"] = connect(scheduler, scheduler_timeout)
                cluster["scheduler_timeout"] = scheduler_timeout
            if split_bytes is not None:
                cluster["split"] = split_bytes
            results = bv.verify_many(
                pairs,
                all=all_ or html_dir is not None,
                strict=strict,
                threads=threads,
                progress=bar.update if bar else None,
                force_share=force_share,
                **cluster,
            )
    finally:
        if client is not None:
            client.close()

    if not quiet:
        for pair, res in zip(pairs, results, strict=False):
            if isinstance(res, BaseException):
                click.echo(f"blkverify: error: {describe_error(res)}", err=True)
            else:
                for warning in res.warnings:
                    click.echo(f"blkverify: warning: {pair['test']}: {warning}", err=True)
        if as_json:
            for pair, res in zip(pairs, results, strict=False):
                record = (
                    error_record(pair, res) if isinstance(res, BaseException) else res.to_dict()
                )
                click.echo(json.dumps(record))
        else:
            click.echo(summary_table(pairs, results), nl=False)
    if html_dir is not None:
        with reported():
            write_pages(html_dir, pairs, lines, results)
    sys.exit(exit_status(results))
