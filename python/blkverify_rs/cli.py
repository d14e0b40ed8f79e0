"""The ``blkverify`` command: a click group whose subcommands talk only to the
Python API (never to ``_native`` directly). Exit codes: 0 identical, 1 a finding,
2 an error. Errors are one line on stderr, never a traceback (see
``cli_common``, which every command shares)."""

from __future__ import annotations

import sys
from typing import Any

import click

import blkverify_rs as bv
from blkverify_rs.batch import batch
from blkverify_rs.cli_common import (
    EXIT_FINDING,
    EXIT_OK,
    READABLE_FORMATS,
    WRITABLE_FORMATS,
    fail,
    force_share_option,
    reported,
)


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
    "-f", "--raw-format", type=READABLE_FORMATS, help="Format of RAW (default: probe; must be raw)."
)
@click.option("-F", "--test-format", type=READABLE_FORMATS, help="Format of TEST (default: probe).")
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
@click.option(
    "--no-backing",
    is_flag=True,
    help="Do not open backing files: unallocated clusters compare as zeros (and say so).",
)
@click.option(
    "--allow-backing-anywhere",
    is_flag=True,
    help="Follow backing files outside the directory of the image that names them.",
)
@click.option(
    "--max-backing-depth",
    type=click.IntRange(0, 1024),
    default=16,
    show_default=True,
    help="The longest backing chain to follow.",
)
@force_share_option
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
    no_backing: bool,
    allow_backing_anywhere: bool,
    max_backing_depth: int,
    force_share: bool,
) -> None:
    """Compare every guest sector of TEST with the raw reference RAW.

    Exit status: 0 identical, 1 they differ (or TEST could not be read somewhere),
    2 an error (bad usage, an image that cannot be opened, a reference read error).
    """
    from blkverify_rs import report

    show_progress = progress if progress is not None else (sys.stderr.isatty() and not quiet)
    bar = report.ProgressBar(sys.stderr) if show_progress and not quiet else None
    with reported(bar):
        rep = bv.verify(
            raw,
            test,
            all=all_,
            raw_format=raw_format,
            test_format=test_format,
            strict=strict,
            snapshot=snapshot,
            threads=threads,
            backing=not no_backing,
            allow_backing_anywhere=allow_backing_anywhere,
            max_backing_depth=max_backing_depth,
            progress=bar.update if bar else None,
            force_share=force_share,
        )
    if not quiet:
        for warning in rep.warnings:
            click.echo(f"blkverify: warning: {warning}", err=True)
        if as_json:
            click.echo(report.to_json(rep))
        else:
            click.echo(report.human(rep, all_=all_), nl=False)
    sys.exit(EXIT_OK if rep.identical else EXIT_FINDING)


@main.command("io", context_settings={"ignore_unknown_options": False})
@click.option(
    "-f", "--format", "fmt", type=READABLE_FORMATS, help="Format of the image (or test image)."
)
@click.option("-r", "--read-only", is_flag=True, help="Open read-only.")
@click.option(
    "-c",
    "--cmd",
    "commands",
    multiple=True,
    metavar="CMD",
    help="Run this qemu-io command (repeatable); without -c, read commands from stdin.",
)
@force_share_option
@click.argument("spec")
def io(
    fmt: str | None, read_only: bool, commands: tuple[str, ...], force_share: bool, spec: str
) -> None:
    """Run qemu-io commands on SPEC: an image, or blkverify:RAW:TEST.

    Commands: read, readv, write, writev, discard, flush, length, info, alloc, map,
    help, quit, with qemu-io's options and output. On a blkverify device every read
    is compared; the first mismatch is printed to stderr and ends the run.
    Exit status: 0, or 1 if the image could not be opened or any command failed.
    """
    from blkverify_rs.io_cmds import run_io

    status = run_io(spec, list(commands), fmt, read_only, force_share=force_share)
    sys.stdout.flush()
    sys.exit(status)


@main.command()
@click.argument("spec", required=False)
@click.option("--ops", type=click.IntRange(0), help="Run this many ops (default 10000).")
@click.option("--duration", type=float, metavar="S", help="Run for S seconds instead.")
@click.option("--seed", type=click.IntRange(0, (1 << 64) - 1), help="Seed (default: random).")
@click.option(
    "--mix",
    metavar="KIND=W,...",
    help="Op weights: read=60,write=25,zero=5,discard=5,flush=5 (the default); "
    "kinds left out get 0.",
)
@click.option(
    "--size-mix",
    metavar="SIZE=W,...",
    help="Request sizes: SIZE=WEIGHT buckets of requests up to SIZE bytes "
    "(default 512=10,4k=35,16k=15,64k=20,256k=10,1M=7,4M=3).",
)
@click.option(
    "--queue-depth",
    type=click.IntRange(1, bv.MAX_QUEUE_DEPTH),
    help="Ops in flight at once (default 1; never two that overlap).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--log", "log_path", metavar="FILE", help="Write the ops to FILE as they run.")
@click.option("--replay", metavar="FILE", help="Replay the ops of a log written by --log.")
@click.option(
    "--shrink",
    "shrink_out",
    metavar="OUT",
    help="With --replay: shrink the failing log to a minimal failing one in OUT, "
    "replaying on fresh copies of SPEC's image files (never written).",
)
@click.option("-f", "--format", "fmt", type=WRITABLE_FORMATS, help="Format of the test side.")
@click.option("--timeout", type=float, metavar="S", help="NBD connect and I/O timeout.")
@click.option("--no-verify", is_flag=True, help="Skip the whole-device verify at the end.")
@click.option("-q", "--quiet", is_flag=True, help="Print only findings and errors.")
def exercise(
    spec: str | None,
    ops: int | None,
    duration: float | None,
    seed: int | None,
    mix: str | None,
    size_mix: str | None,
    queue_depth: int | None,
    as_json: bool,
    log_path: str | None,
    replay: str | None,
    shrink_out: str | None,
    fmt: str | None,
    timeout: float | None,
    no_verify: bool,
    quiet: bool,
) -> None:
    """Run a seeded random workload on SPEC (blkverify:RAW:TEST) and check every
    read, then the whole device. Both sides are written: run it on copies.

    On a finding it stops, names the op and the sector, shows both sides' bytes
    and prints the command that reproduces it (on the images as they were).
    Exit status: 0 clean, 1 a finding, 2 an error.
    """
    from blkverify_rs import report

    if replay is None and spec is None:
        fail("exercise needs a SPEC (blkverify:RAW:TEST) or --replay FILE")
    if shrink_out is not None:
        if replay is None:
            fail("--shrink needs --replay FILE: the failing log to shrink")
        with reported():
            shrunk = bv.shrink(replay, shrink_out, spec, format=fmt)
        if as_json:
            click.echo(report.json.dumps(shrunk.to_dict()))
        else:
            click.echo(report.shrink_human(shrunk), nl=False)
        sys.exit(EXIT_FINDING)
    with reported():
        result = bv.exercise(
            spec,
            ops=ops,
            duration=duration,
            seed=seed,
            mix=mix,
            size_mix=size_mix,
            queue_depth=queue_depth,
            log=log_path,
            replay=replay,
            format=fmt,
            timeout=timeout,
            verify=not no_verify,
        )
    if as_json:
        click.echo(report.exercise_json(result))
    elif result.mismatches or not quiet:
        click.echo(report.exercise_human(result), nl=False)
    sys.exit(EXIT_FINDING if result.mismatches else EXIT_OK)


def parse_create_options(text: str) -> dict[str, Any]:
    """``-o key=value,...`` as qemu-img create takes it (the basics)."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key in ("extended_l2", "lazy_refcounts"):
            if sep and value not in ("on", "off"):
                raise ValueError(f"option {key} must be 'on' or 'off', not '{value}'")
            out[key] = not sep or value == "on"
        elif key in ("cluster_size", "refcount_bits"):
            out[key] = bv.parse_size(value)
        elif key == "compat":
            versions = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
            if value not in versions:
                raise ValueError(f"option compat must be 0.10 or 1.1, not '{value}'")
            out["version"] = versions[value]
        elif key in ("backing_file", "backing_fmt"):
            out["backing" if key == "backing_file" else "backing_format"] = value
        else:
            raise ValueError(
                f"unknown option '{key}' (known: cluster_size, compat, "
                "refcount_bits, extended_l2, lazy_refcounts, backing_file, "
                "backing_fmt)"
            )
    return out


@main.command()
@click.option(
    "-f", "fmt", type=WRITABLE_FORMATS, default="qcow2", show_default=True, help="Format."
)
@click.option(
    "-o",
    "options",
    multiple=True,
    metavar="OPTIONS",
    help="qcow2 options: cluster_size=,compat=,refcount_bits=,extended_l2=,"
    "lazy_refcounts=,backing_file=,backing_fmt=",
)
@click.option("-b", "backing", metavar="BACKING", help="Backing file.")
@click.option("-F", "backing_format", type=READABLE_FORMATS, help="Format of the backing file.")
@click.argument("path", type=click.Path(dir_okay=False))
@click.argument("size", required=False)
def create(
    fmt: str,
    options: tuple[str, ...],
    backing: str | None,
    backing_format: str | None,
    path: str,
    size: str | None,
) -> None:
    """Create a new image at PATH of SIZE bytes (qemu-img's sizes: 1.5M, 4G,
    0x1000), like ``qemu-img create``. SIZE may be left out when a backing file
    gives it."""
    with reported():
        kwargs: dict[str, Any] = {}
        for text in options:
            kwargs.update(parse_create_options(text))
        if backing is not None:
            kwargs["backing"] = backing
        if backing_format is not None:
            kwargs["backing_format"] = backing_format
        nbytes = None if size is None else bv.parse_size(size)
        bv.create(path, nbytes, format=fmt, **kwargs)
    shown = "" if size is None else f", size={nbytes}"
    click.echo(f"Formatting '{path}', fmt={fmt}{shown}")


main.add_command(batch)


if __name__ == "__main__":
    main()
