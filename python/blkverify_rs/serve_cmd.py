"""``blkverify serve``: the mirrored device as an NBD server. The server runs on
Rust threads; this thread prints the URI, streams findings (stderr, and
``--report`` as JSON lines) and turns SIGINT/SIGTERM into a clean stop."""

from __future__ import annotations

import json
import os
import signal
import sys
from types import FrameType
from typing import IO, Any

import click

import blkverify_rs as bv
from blkverify_rs.cli_common import (
    EXIT_ERROR,
    EXIT_FINDING,
    EXIT_OK,
    READABLE_FORMATS,
    USER_ERRORS,
    backing_options,
    describe_error,
    fail,
    force_share_option,
    reported,
)


@click.command("serve")
@click.argument("raw")
@click.argument("test", required=False)
@click.option(
    "-f", "--format", "fmt", type=READABLE_FORMATS, help="Format of TEST (default: probe)."
)
@click.option(
    "-r",
    "--read-only",
    is_flag=True,
    help="Export read-only (needed for a TEST format blkverify cannot write).",
)
@click.option(
    "--socket",
    "socket_path",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Listen on a Unix socket at PATH (default: a fresh socket in a private "
    "temporary directory).",
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    help="Listen on TCP port N instead (0 picks a free port).",
)
@click.option(
    "--bind",
    metavar="ADDR",
    help="With --port: the address to listen on (default 127.0.0.1).",
)
@click.option(
    "--export-name",
    default="",
    metavar="NAME",
    help="The export's name (the default name '' is accepted too).",
)
@click.option(
    "--shared",
    type=click.IntRange(1, 1024),
    default=1,
    show_default=True,
    help="Clients served at once (more than 1 advertises multi-conn).",
)
@click.option("--persistent", is_flag=True, help="Keep serving after the last client leaves.")
@click.option(
    "--pid-file",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Write serve's process ID to FILE once it listens (removed at exit).",
)
@click.option(
    "--on-mismatch",
    type=click.Choice(bv.ON_MISMATCH),
    default="stop",
    show_default=True,
    help="stop: the request fails with EIO and serve stops (exit 1); eio: the "
    "request fails with EIO, serving goes on; reference: the client gets the "
    "reference's bytes, serving goes on.",
)
@click.option(
    "--report",
    "report_path",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write every finding to FILE, one JSON object per line, as found.",
)
@click.option(
    "--trace",
    "trace_path",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Record every request, with its data, in the order serve applied it to both "
    "sides, to FILE (for 'blkverify replay' and 'blkverify shrink').",
)
@click.option("--timeout", type=float, metavar="S", help="Connect and I/O timeout of an NBD TEST.")
@force_share_option
@backing_options
def serve_command(
    raw: str,
    test: str | None,
    fmt: str | None,
    read_only: bool,
    socket_path: str | None,
    port: int | None,
    bind: str | None,
    export_name: str,
    shared: int,
    persistent: bool,
    pid_file: str | None,
    on_mismatch: str,
    report_path: str | None,
    trace_path: str | None,
    timeout: float | None,
    force_share: bool,
    no_backing: bool,
    allow_backing_anywhere: bool,
    max_backing_depth: int,
) -> None:
    """Serve the mirrored device of RAW and TEST (or blkverify:RAW:TEST) over
    NBD, so that real software drives TEST's driver while every read is
    compared with RAW, the raw reference.

    TEST is any format blkverify writes (raw, qcow2), or an NBD URI: serve is
    then a verifying proxy in front of another NBD server. With -r, any format
    blkverify reads is exported read-only.

    Once it listens, serve prints its URI alone on one line of stdout
    (nbd+unix:///?socket=... or nbd://127.0.0.1:N/). Every finding is printed
    to stderr as blkverify's line ("blkverify: read sector_num=N nb_sectors=M
    contents mismatch in sector S").

    SIGINT or SIGTERM stops it cleanly: no new requests, those in flight
    finish, both sides are flushed and closed, and a summary goes to stderr.
    A second signal exits at once. A signal is the normal way to end a serve:
    exit status 0 with no finding, 1 with any finding, 2 on an error.

    With --trace FILE, every request is recorded as serve applied it (writes
    with their data), so 'blkverify replay FILE' repeats the run without the
    client, from copies of the images as they were when serve started.
    """
    if port is None and bind is not None:
        fail("--bind needs --port (it names a TCP address)")
    if port is not None and socket_path is not None:
        fail("give --socket or --port, not both")
    report: IO[str] | None = None
    if report_path is not None:
        try:
            report = open(report_path, "w", encoding="utf-8")
        except OSError as exc:
            fail(f"{report_path}: {exc.strerror or exc}")
    with reported():
        server = bv.serve(
            raw,
            test,
            format=fmt,
            read_only=read_only,
            socket=socket_path,
            port=port,
            bind=bind,
            export_name=export_name,
            shared=shared,
            persistent=persistent,
            on_mismatch=on_mismatch,
            force_share=force_share,
            backing=not no_backing,
            max_backing_depth=max_backing_depth,
            allow_backing_anywhere=allow_backing_anywhere,
            timeout=timeout,
            trace=trace_path,
        )
    status = _serve(server, report, pid_file)
    sys.exit(status)


def _serve(server: Any, report: IO[str] | None, pid_file: str | None) -> int:
    """Announce the server, stream its findings until it ends, report."""
    from blkverify_rs import report as text

    findings = 0

    def emit() -> None:
        nonlocal findings
        for f in server.new_findings():
            findings += 1
            click.echo(f.message, err=True)
            if report is not None:
                report.write(json.dumps(f.to_dict()) + "\n")
                report.flush()

    signals = 0

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            server.stop(wait=False, reason=f"a signal ({name})")
            return
        emit()
        click.echo(
            f"blkverify: serve: second signal ({name}): exiting without finishing "
            "requests in flight or flushing",
            err=True,
        )
        server.remove_socket()
        os._exit(EXIT_FINDING if findings else EXIT_ERROR)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if pid_file is not None:
            try:
                with open(pid_file, "w", encoding="utf-8") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                server.stop(wait=False, reason="the pid file could not be written")
                click.echo(f"blkverify: error: {pid_file}: {exc.strerror or exc}", err=True)
                server.wait()
                return EXIT_ERROR
        click.echo(server.uri)
        sys.stdout.flush()
        trace_failed = False
        while not server.wait(0.2):
            emit()
            if not trace_failed and server.trace_error is not None:
                # A trace with a hole cannot be replayed: stop serving.
                trace_failed = True
                server.stop(wait=False, reason="the trace could not be written")
        emit()
        try:
            summary = server.summary_wait()
        except USER_ERRORS as exc:
            click.echo(f"blkverify: error: {describe_error(exc)}", err=True)
            return EXIT_ERROR
        emit()
        click.echo(text.serve_summary(summary), err=True, nl=False)
        if summary.trace_error is not None:
            click.echo(f"blkverify: error: {summary.trace_error}", err=True)
            return EXIT_ERROR
        return EXIT_FINDING if findings else EXIT_OK
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if pid_file is not None:
            try:
                os.unlink(pid_file)
            except OSError:
                pass
        if report is not None:
            report.close()
