"""``blkverify map IMAGE``: the allocation map of an image, as ``qemu-img map``
lists it (one line per extent, or ``--json``), or drawn as an HTML page
(``--html``). The map itself comes from :func:`blkverify_rs.map`; the page from
:func:`blkverify_rs.map_html`."""

from __future__ import annotations

import json
import sys

import click

import blkverify_rs as bv
from blkverify_rs.cli_common import (
    READABLE_FORMATS,
    backing_options,
    force_share_option,
    reported,
)


def _hex(n: int) -> str:
    # qemu-img map prints offsets with C's %#x: 0 has no prefix.
    return f"{n:#x}" if n else "0"


def human_lines(extents: list[bv.MapExtent]) -> str:
    """One line per extent under a header, columns as ``qemu-img map`` sets
    them: offset, length, kind, depth, host offset (``-``: none) and file."""
    lines = [f"{'Offset':<16}{'Length':<16}{'Kind':<12}{'Depth':<6}{'Mapped to':<16}File"]
    for e in extents:
        host = "-" if e.host_offset is None else _hex(e.host_offset)
        lines.append(
            f"{_hex(e.offset):<16}{_hex(e.length):<16}{e.kind:<12}{e.depth:<6}{host:<16}{e.file}"
        )
    return "\n".join(lines) + "\n"


@click.command("map")
@click.argument("image")
@click.option(
    "-f", "--format", "fmt", type=READABLE_FORMATS, help="Format of IMAGE (default: probe)."
)
@click.option("--snapshot", metavar="NAME", help="Map this internal snapshot (ID or name).")
@click.option(
    "--json", "as_json", is_flag=True, help="Print a JSON list of extents instead of lines."
)
@click.option(
    "--html",
    "html_out",
    metavar="OUT.html",
    type=click.Path(dir_okay=False),
    help="Draw the map as one self-contained HTML page in OUT.html (nothing is printed "
    "unless --json is given too).",
)
@backing_options
@force_share_option
def map_command(
    image: str,
    fmt: str | None,
    snapshot: str | None,
    as_json: bool,
    html_out: str | None,
    no_backing: bool,
    allow_backing_anywhere: bool,
    max_backing_depth: int,
    force_share: bool,
) -> None:
    """Show which guest ranges of IMAGE hold data, compressed clusters, zeros or
    nothing, and which layer of its backing chain answers for each.

    One line per extent: offset, length, kind (data, compressed, zero,
    unallocated), depth (0 the image, 1 its backing file...), host offset and
    the file holding it. Neighbours that agree are merged. Only metadata is
    read. IMAGE is opened as verify opens TEST (the backing policy applies).

    --json prints a list of {"offset", "length", "kind", "depth",
    "host_offset", "file"}. --html draws the guest address space coloured by
    kind, with a legend, the image's facts and a scale.

    Exit status: 0, or 2 on an error (an image that cannot be opened, or
    metadata that cannot be read).
    """
    options = {
        "format": fmt,
        "snapshot": snapshot,
        "backing": not no_backing,
        "allow_backing_anywhere": allow_backing_anywhere,
        "max_backing_depth": max_backing_depth,
        "force_share": force_share,
    }
    with reported():
        if html_out is not None:
            bv.map_html(image, html_out, **options)
            if not as_json:
                return
        extents = bv.map(image, **options)
    if as_json:
        click.echo(json.dumps([e.to_dict() for e in extents]))
    else:
        click.echo(human_lines(extents), nl=False)
    sys.stdout.flush()
