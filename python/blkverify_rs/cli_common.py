"""What every ``blkverify`` command shares: the exit codes, the one-line error,
the handling of errors and Ctrl-C around a command's work, the format choices,
drawn from the one registry, and the backing-chain options. A leaf: it imports
only the Python API, so every command module imports it and none imports
another command module."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn, Protocol, TypeVar

import click

import blkverify_rs as bv

EXIT_OK = 0
EXIT_FINDING = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# Each command offers the formats it can use: verify and io read images;
# create and exercise write them.
READABLE_FORMATS = click.Choice(bv.formats(readable=True))
WRITABLE_FORMATS = click.Choice(bv.formats(writable=True))
# verify's reference may also be a block digests file.
REFERENCE_FORMATS = click.Choice([*bv.formats(readable=True), bv.DIGESTS_FORMAT])


F = TypeVar("F", bound=Callable[..., Any])


def backing_options(command: F) -> F:
    """``--no-backing``, ``--allow-backing-anywhere`` and
    ``--max-backing-depth``: how the commands that open images
    follow a backing chain (verify, map, digest). The command takes ``no_backing``,
    ``allow_backing_anywhere`` and ``max_backing_depth``."""
    options = [
        click.option(
            "--no-backing",
            is_flag=True,
            help="Do not open backing files: unallocated clusters read as zeros.",
        ),
        click.option(
            "--allow-backing-anywhere",
            is_flag=True,
            help="Follow backing files outside the directory of the image that names them.",
        ),
        click.option(
            "--max-backing-depth",
            type=click.IntRange(0, 1024),
            default=bv.DEFAULT_BACKING_DEPTH,
            show_default=True,
            help="The longest backing chain to follow.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def force_share_option(command: F) -> F:
    """``-U/--force-share``, as qemu-img and qemu-io have it, for every command
    that only reads images (verify, batch, io -r, digest, map): the command
    gets ``force_share`` and passes it to the API, which refuses it with a
    write."""
    return click.option(
        "-U",
        "--force-share",
        "force_share",
        is_flag=True,
        help="Open images even if another process (a VM, qemu-nbd) has them open "
        "for writing, as qemu-img -U does; read-only opens only.",
    )(command)


class Bar(Protocol):
    """A progress display that ends its line with ``finish()``."""

    def finish(self) -> None: ...


def fail(message: str) -> NoReturn:
    """Print one error line and exit with status 2."""
    click.echo(f"blkverify: error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def size_option(option: str, text: str | None) -> int | None:
    """A size option's value in bytes (QEMU's size syntax, as ``bv.parse_size``
    reads it), or exit with status 2 naming the option."""
    if text is None:
        return None
    try:
        return bv.parse_size(text)
    except (ValueError, OverflowError) as exc:
        fail(f"{option}: {exc}")


def describe_error(exc: BaseException, name: str | None = None) -> str:
    """One line for an exception, naming the file where it has one (or, for an
    OS error that names none, ``name``)."""
    if isinstance(exc, OSError):
        filename = getattr(exc, "filename", None) or name
        text = exc.strerror or str(exc)
        return f"{filename}: {text}" if filename else text
    return str(exc) or exc.__class__.__name__


# What a user's mistake or a bad image raises: one error line, never a traceback.
USER_ERRORS = (bv.Error, OSError, ValueError, OverflowError)


@contextmanager
def reported(bar: Bar | None = None) -> Iterator[None]:
    """Run a command's work: Ctrl-C exits with status 130 and an error with
    status 2, each with one line on stderr, never a traceback. The progress
    bar, if any, ends its line first, whatever happens."""
    try:
        try:
            yield
        finally:
            if bar is not None:
                bar.finish()
    except KeyboardInterrupt:
        click.echo("blkverify: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as exc:
        fail(describe_error(exc))
