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
    EXIT_ERROR,
    EXIT_FINDING,
    EXIT_INTERRUPTED,
    EXIT_OK,
    READABLE_FORMATS,
    REFERENCE_FORMATS,
    USER_ERRORS,
    WRITABLE_FORMATS,
    backing_options,
    describe_error,
    fail,
    force_share_option,
    reported,
    size_option,
)
from blkverify_rs.map_cmd import map_command
from blkverify_rs.replay_cmd import replay_command, shrink_command
from blkverify_rs.serve_cmd import serve_command


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
    "-f",
    "--raw-format",
    type=REFERENCE_FORMATS,
    help="Format of RAW, the reference (default: probe; digests for a block digests file).",
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
@backing_options
@click.option(
    "--html",
    "html_out",
    metavar="OUT.html",
    type=click.Path(dir_okay=False),
    help="Also write the test image's HTML map with every finding marked on it "
    "(implies --all, up to the run cap).",
)
@click.option(
    "--start",
    metavar="OFFSET",
    help="Verify from this guest offset (a multiple of 512, or of 64k against a block "
    "digests file; sizes as qemu-img reads them: 1G, 0x1000).",
)
@click.option(
    "--length",
    metavar="BYTES",
    help="Verify this many bytes from --start (a multiple of 512, or of 64k against a "
    "block digests file; default: to the end).",
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
    start: str | None,
    length: str | None,
    force_share: bool,
    html_out: str | None,
) -> None:
    """Compare every guest sector of TEST with RAW, the reference, in any format
    (or those of one range, with --start and --length).

    RAW and TEST may each be in any format blkverify reads (see -f/-F): a qcow2
    against its compressed copy, a vmdk against the qcow2 it came from.

    RAW may be a block digests file ('blkverify digest --blocks'): TEST is then
    hashed block by block, and blocks whose digests differ are the findings.

    With --html OUT.html, also draw TEST's allocation map with every finding
    marked on it: one self-contained page (see 'blkverify map').

    Exit status: 0 identical, 1 they differ (or TEST could not be read somewhere),
    2 an error (bad usage, an image that cannot be opened, a reference read error).
    """
    from blkverify_rs import report

    start_offset = size_option("--start", start) or 0
    length_bytes = size_option("--length", length)
    show_progress = progress if progress is not None else (sys.stderr.isatty() and not quiet)
    bar = report.ProgressBar(sys.stderr) if show_progress and not quiet else None
    with reported(bar):
        rep = bv.verify(
            raw,
            test,
            all=all_ or html_out is not None,
            raw_format=raw_format,
            test_format=test_format,
            strict=strict,
            snapshot=snapshot,
            threads=threads,
            backing=not no_backing,
            allow_backing_anywhere=allow_backing_anywhere,
            max_backing_depth=max_backing_depth,
            progress=bar.update if bar else None,
            start=start_offset,
            length=length_bytes,
            force_share=force_share,
        )
    if not quiet:
        for warning in rep.warnings:
            click.echo(f"blkverify: warning: {warning}", err=True)
        if as_json:
            click.echo(report.to_json(rep))
        else:
            click.echo(report.human(rep, all_=all_ or html_out is not None), nl=False)
    if html_out is not None:
        with reported():
            rep.to_html(html_out)
    sys.exit(EXIT_OK if rep.identical else EXIT_FINDING)


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "-f", "--format", "fmt", type=READABLE_FORMATS, help="Format of the images (default: probe)."
)
@click.option("--snapshot", metavar="NAME", help="Hash this internal snapshot (ID or name).")
@click.option(
    "-d",
    "--digest",
    "algorithm",
    type=click.Choice(bv.DIGEST_ALGORITHMS),
    default=bv.DIGEST_ALGORITHMS[0],
    show_default=True,
    help="The hash function.",
)
@click.option(
    "--threads", type=click.IntRange(0, 64), default=0, help="Worker threads (0: one per core)."
)
@click.option(
    "--blocks",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="Also write IMAGE's block digests file to FILE (one IMAGE only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@click.option(
    "--progress/--no-progress",
    default=None,
    help="Show a progress bar on stderr (default: when stderr is a terminal).",
)
@click.option("-q", "--quiet", is_flag=True, help="Print only the digests and errors.")
@backing_options
@click.option(
    "--scheduler",
    metavar="ADDRESS",
    help="Hash each IMAGE on the Dask cluster whose scheduler is at ADDRESS "
    "(tcp://HOST:8786), in ranges; the workers must see IMAGE's path. Needs "
    'pip install "blkverify-rs[dask]".',
)
@click.option(
    "--scheduler-timeout",
    type=click.FloatRange(0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How long to try to reach the scheduler, and to wait for a worker.",
)
@click.option(
    "--split",
    metavar="SIZE",
    help="With --scheduler: hash ranges of SIZE bytes, each a task (a multiple of 64k; "
    "default: the image split between the cluster's worker threads, 64M to 64G each).",
)
@force_share_option
def digest(
    images: tuple[str, ...],
    fmt: str | None,
    snapshot: str | None,
    algorithm: str,
    threads: int,
    blocks: str | None,
    as_json: bool,
    progress: bool | None,
    quiet: bool,
    no_backing: bool,
    allow_backing_anywhere: bool,
    max_backing_depth: int,
    scheduler: str | None,
    scheduler_timeout: float,
    split: str | None,
    force_share: bool,
) -> None:
    """Print the digest of each IMAGE's guest data, as blksum does:
    '<hex digest>  <IMAGE>'. A raw image and its qcow2 copy give the same one.

    The construction is blkhash 0.11's, H(H(b1) || ... || H(bN) || le64(size))
    over 64 KiB blocks. With --blocks, the digest of every block is written too,
    for 'blkverify verify FILE COPY' where the image itself is not at hand.

    With --scheduler, each IMAGE is hashed on a Dask cluster's workers, a range
    a task; only block digests come back, and they are joined here, in order,
    into the same digest (and --blocks file).

    Exit status: 0 if every image was hashed, 2 if any failed (the others go on).
    """
    import json

    from blkverify_rs import report

    if blocks is not None and len(images) != 1:
        fail(f"--blocks takes exactly one IMAGE ({len(images)} given)")
    if split is not None and scheduler is None:
        fail("--split needs --scheduler: here an image is hashed whole")
    split_bytes = size_option("--split", split)
    cluster: dict[str, Any] = {}
    if scheduler is not None:
        from blkverify_rs.batch import connect

        cluster = {
            "client": connect(scheduler, scheduler_timeout),
            "scheduler_timeout": scheduler_timeout,
            "split": split_bytes,
        }
    show_progress = progress if progress is not None else (sys.stderr.isatty() and not quiet)
    status = EXIT_OK
    for image in images:
        bar = report.ProgressBar(sys.stderr) if show_progress and not quiet else None
        if bar is not None and len(images) > 1:
            bar.prefix = f"{image}: "
        try:
            try:
                d = bv.digest(
                    image,
                    fmt,
                    algorithm=algorithm,
                    threads=threads,
                    blocks=blocks,
                    snapshot=snapshot,
                    backing=not no_backing,
                    max_backing_depth=max_backing_depth,
                    allow_backing_anywhere=allow_backing_anywhere,
                    progress=bar.update if bar else None,
                    **cluster,
                    force_share=force_share,
                )
            finally:
                if bar is not None:
                    bar.finish()
        except KeyboardInterrupt:
            click.echo("blkverify: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except USER_ERRORS as exc:
            # One image's failure is reported and the others go on.
            status = EXIT_ERROR
            message = describe_error(exc, image)
            click.echo(f"blkverify: error: {message}", err=True)
            if as_json:
                click.echo(json.dumps({"image": image, "error": message}))
            continue
        if not quiet:
            for warning in d.warnings:
                click.echo(f"blkverify: warning: {warning}", err=True)
        click.echo(json.dumps(d.to_dict()) if as_json else report.digest_line(d))
    if "client" in cluster:
        cluster["client"].close()
    sys.exit(status)


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

    On the mirrored device RAW is always read as a raw image, as in QEMU's
    blkverify: its writes must be trivially right. Formats blkverify cannot
    write (vmdk, vpc, vhdx, vdi) open read-only.

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
    help="Ops in flight at once (default 1; an op waits for any overlapping op unless "
    "both only read). Against NBD: requests outstanding on one connection.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--log", "log_path", metavar="FILE", help="Write the ops to FILE as they run.")
@click.option(
    "--replay",
    metavar="FILE",
    help="Replay the ops of a log written by --log (or a trace written by serve --trace), "
    "writing SPEC's images.",
)
@click.option(
    "--shrink",
    "shrink_out",
    metavar="OUT",
    help="With --replay: shrink the failing record to a minimal failing one in OUT, "
    "replaying on copy-on-write overlays of SPEC's image files (never written); "
    "as 'blkverify shrink'.",
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
main.add_command(map_command)
main.add_command(serve_command)
main.add_command(replay_command)
main.add_command(shrink_command)


if __name__ == "__main__":
    main()
