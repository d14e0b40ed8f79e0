"""The ``blkverify`` command: a click group whose subcommands talk only to the
Python API (never to ``_native`` directly). Exit codes: 0 identical, 1 a finding,
2 an error. Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_ERROR = 2

FORMATS = click.Choice(["raw", "qcow2"])


def fail(message: str) -> NoReturn:
    """Print one error line and exit with status 2."""
    click.echo(f"blkverify: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def describe_error(exc: BaseException) -> str:
    """One line for an exception, naming the file where it has one."""
    if isinstance(exc, OSError):
        filename = getattr(exc, "filename", None)
        text = exc.strerror or str(exc)
        return f"{filename}: {text}" if filename else text
    return str(exc) or exc.__class__.__name__


def _version() -> str:
    from blkverify_rs import __version__

    return __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(version=None, prog_name="blkverify", message="%(prog)s %(version)s")
@click.pass_context
def main(ctx: click.Context) -> None:
    """blkverify: prove that a block driver returns the right bytes."""


# click.version_option with version=None looks the version up lazily through
# package metadata; give it ours directly instead (cheaper, and always right).
for param in main.params:
    if isinstance(param, click.Option) and param.name == "version":
        param.callback = lambda ctx, _param, value: (
            (click.echo(f"blkverify {_version()}"), ctx.exit())
            if value and not ctx.resilient_parsing
            else None
        )


@main.command()
@click.argument("raw", type=click.Path(dir_okay=False))
@click.argument("test", type=click.Path(dir_okay=False))
@click.option(
    "-f", "--raw-format", type=FORMATS, help="Format of RAW (default: probe; must be raw)."
)
@click.option("-F", "--test-format", type=FORMATS, help="Format of TEST (default: probe).")
@click.option(
    "--snapshot", metavar="NAME", help="Verify this internal snapshot of TEST (ID or name)."
)
@click.option(
    "--all", "all_", is_flag=True, help="Report every mismatching sector, not just the first."
)
@click.option("--strict", is_flag=True, help="A size difference is a mismatch.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: when stderr is a terminal).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
@click.option(
    "--threads", type=click.IntRange(0, 64), default=0, help="Worker threads (0: one per core)."
)
def verify(
    raw: str,
    test: str,
    raw_format: str | None,
    test_format: str | None,
    snapshot: str | None,
    all_: bool,
    strict: bool,
    as_json: bool,
    progress: bool | None,
    quiet: bool,
    threads: int,
) -> None:
    """Compare every guest sector of TEST with the raw reference RAW.

    Exit status: 0 identical, 1 they differ (or TEST could not be read somewhere),
    2 an error (bad usage, an image that cannot be opened, a reference read error).
    """
    import blkverify_rs as bv
    from blkverify_rs import report

    show_progress = progress if progress is not None else (sys.stderr.isatty() and not quiet)
    bar = report.ProgressBar(sys.stderr) if show_progress and not quiet else None
    try:
        rep = bv.verify(
            raw,
            test,
            all=all_,
            raw_format=raw_format,
            test_format=test_format,
            strict=strict,
            snapshot=snapshot,
            threads=threads,
            progress=bar.update if bar else None,
        )
    except KeyboardInterrupt:
        if bar:
            bar.finish()
        click.echo("blkverify: interrupted", err=True)
        sys.exit(130)
    except (bv.Error, OSError, ValueError) as exc:
        if bar:
            bar.finish()
        fail(describe_error(exc))
    if bar:
        bar.finish()
    if not quiet:
        for warning in rep.warnings:
            click.echo(f"blkverify: warning: {warning}", err=True)
        if as_json:
            click.echo(report.to_json(rep))
        else:
            click.echo(report.human(rep, all_=all_), nl=False)
    sys.exit(EXIT_OK if rep.identical else EXIT_FINDING)


def _register_commands() -> None:
    from blkverify_rs.batch import batch

    main.add_command(batch)


_register_commands()


if __name__ == "__main__":
    main()
