"""``blkverify replay`` and ``blkverify shrink``: a recorded run (a ``serve
--trace`` trace or an ``exercise --log`` op log) run again without its client,
and cut down to the few requests that still fail."""

from __future__ import annotations

import json
import sys

import click

import blkverify_rs as bv
from blkverify_rs.cli_common import (
    EXIT_FINDING,
    EXIT_OK,
    WRITABLE_FORMATS,
    backing_options,
    reported,
)

TEST_COMMAND_HELP = (
    "Run CMD (with sh -c) for a fresh NBD test side: {socket} becomes a fresh Unix socket "
    "path, {dir} a fresh private directory, {trial} the trial's number; the side is ready "
    "when CMD prints an NBD URI on its first line, or listens on {socket}. SPEC is then "
    "RAW alone. It is stopped (by its process group) afterwards."
)


@click.command("replay")
@click.argument("record", type=click.Path(dir_okay=False))
@click.argument("spec", required=False)
@click.option(
    "--test-command",
    metavar="CMD",
    help=TEST_COMMAND_HELP,
)
@click.option(
    "--queue-depth",
    type=click.IntRange(1, bv.MAX_QUEUE_DEPTH),
    help="Ops in flight (default 1: the requests one at a time, in the order serve "
    "applied them; an op log's own depth).",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Write the images (copies!) instead of copy-on-write overlays, to explore them "
    "afterwards at the finding's sector.",
)
@click.option("--no-verify", is_flag=True, help="Skip the whole-device verify at the end.")
@click.option("-f", "--format", "fmt", type=WRITABLE_FORMATS, help="Format of the test side.")
@click.option("--timeout", type=float, metavar="S", help="NBD connect and I/O timeout.")
@backing_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("-q", "--quiet", is_flag=True, help="Print only findings and errors.")
def replay_command(
    record: str,
    spec: str | None,
    test_command: str | None,
    queue_depth: int | None,
    in_place: bool,
    no_verify: bool,
    fmt: str | None,
    timeout: float | None,
    no_backing: bool,
    allow_backing_anywhere: bool,
    max_backing_depth: int,
    as_json: bool,
    quiet: bool,
) -> None:
    """Replay RECORD, a trace written by 'serve --trace' or an op log written by
    'exercise --log', on SPEC (blkverify:RAW:TEST): the images as they were when
    the recorded run started. It stops at the first finding: at queue depth 1 a
    trace's requests run in the order serve applied them, so the replay meets the
    live run's finding at the same request, message and sector.

    The images are only read: writes go to copy-on-write overlays (--in-place
    writes them). An NBD test side is written; --test-command serves a fresh one.
    A trace cut short replays up to its last whole record.

    Exit status: 0 clean, 1 a finding, 2 an error (a damaged record, an image
    that cannot be opened).
    """
    from blkverify_rs import report

    with reported():
        result = bv.replay(
            record,
            spec,
            format=fmt,
            queue_depth=queue_depth,
            verify=not no_verify,
            in_place=in_place,
            test_command=test_command,
            timeout=timeout,
            backing=not no_backing,
            max_backing_depth=max_backing_depth,
            allow_backing_anywhere=allow_backing_anywhere,
        )
    if result.ending is not None and not quiet:
        click.echo(f"blkverify: warning: {result.ending}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    elif result.mismatches or not quiet:
        click.echo(report.replay_human(result), nl=False)
    sys.exit(EXIT_FINDING if result.mismatches else EXIT_OK)


@click.command("shrink")
@click.argument("record", type=click.Path(dir_okay=False))
@click.argument("out", type=click.Path(dir_okay=False))
@click.argument("spec", required=False)
@click.option("--test-command", metavar="CMD", help=TEST_COMMAND_HELP + " Run for each trial.")
@click.option("-f", "--format", "fmt", type=WRITABLE_FORMATS, help="Format of the test side.")
@click.option("--timeout", type=float, metavar="S", help="NBD connect and I/O timeout.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show the trials on stderr (default: when stderr is a terminal).",
)
def shrink_command(
    record: str,
    out: str,
    spec: str | None,
    test_command: str | None,
    fmt: str | None,
    timeout: float | None,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Shrink RECORD, a failing trace or op log, to a minimal failing one in OUT
    (the same format): the fewest requests, in their order, that still give a
    finding of the same kind (the sector may move).

    SPEC names the images as they were when the recorded run started
    (blkverify:RAW:TEST); each trial replays on copy-on-write overlays of them,
    so they are only read. An NBD test side cannot be reset between trials:
    --test-command serves a fresh one for each, and SPEC is RAW alone.

    Exit status: 1 (the shrunk record still fails), 2 an error (the record does
    not fail, or cannot be read).
    """
    from blkverify_rs import report

    show = progress if progress is not None else sys.stderr.isatty()

    def tick(trials: int, ops: int) -> None:
        click.echo(f"\rshrink: trial {trials}, {ops} ops   ", err=True, nl=False)

    with reported():
        try:
            shrunk = bv.shrink(
                record,
                out,
                spec,
                format=fmt,
                test_command=test_command,
                timeout=timeout,
                progress=tick if show else None,
            )
        finally:
            if show:
                click.echo("", err=True)
    if as_json:
        click.echo(json.dumps(shrunk.to_dict()))
    else:
        click.echo(report.shrink_human(shrunk), nl=False)
    sys.exit(EXIT_FINDING)
