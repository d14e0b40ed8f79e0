"""The HTML map: one self-contained page that draws an image's guest address
space coloured by mapping kind, with a verify's findings marked on it.

The Rust core gathers the map and cuts it into cells (``_native.map_picture``);
this module only lays the page out: the legend, the facts, the findings and the
data the page's script draws from. The page loads nothing: its style and script
(``map_page.css``, ``map_page.js`` beside this file) are inlined, and the data
is one JSON block. Its size is bounded: at most 65536 cells (one byte of class
and one of share each), one entry per run of cells that one extent covers, and
a few numbers per finding.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
from collections.abc import Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from blkverify_rs import _native
from blkverify_rs.report import describe_mapping, human_size

if TYPE_CHECKING:
    from blkverify_rs import Mismatch, Report

Progress = Callable[[int, int], None] | None

MAX_CELLS = 1 << 16

# Kinds, as the page's data numbers them.
KINDS = ["data", "compressed", "zero", "unallocated", "error"]

FINDING_COLOUR = "#e0245e"

# The legend's colours. Backing depths get a ramp of ambers, darker with depth.
COLOURS = {
    "data": "#2f6fdf",
    "compressed": "#8e44ad",
    "zero": "#8fd9a8",
    "unallocated": "#e4e7eb",
    "error": "#1f2329",
    "past_end": "#9aa3ad",
}
BACKING_RAMP = ["#f2b134", "#e08a1e", "#c0661a", "#9c4a16", "#7a3612", "#5c270e"]


def class_colour(name: str) -> str:
    """The colour a class is drawn in."""
    if name.startswith("backing"):
        depth = int(name[len("backing") :])
        return BACKING_RAMP[min(depth, len(BACKING_RAMP)) - 1]
    return COLOURS[name]


def class_label(name: str) -> str:
    """The legend's words for a class."""
    if name.startswith("backing"):
        depth = int(name[len("backing") :])
        return f"backing, depth {depth}{' or more' if depth >= 64 else ''}"
    return {
        "data": "data",
        "compressed": "compressed",
        "zero": "zero",
        "unallocated": "unallocated",
        "error": "unreadable metadata",
        "past_end": "past the end",
    }[name]


def layout(cells: int) -> tuple[int, int]:
    """Columns and pixels per cell: rows of a power-of-two number of cells
    (so each row starts at a round offset), about as many rows as columns,
    at most 768 pixels wide (a 65536-cell picture fits a laptop's screen)."""
    cols = 16
    while cols * cols < cells and cols < 256:
        cols *= 2
    px = max(2, min(16, 768 // cols))
    return cols, px


def _asset(name: str) -> str:
    return resources.files("blkverify_rs").joinpath(name).read_text(encoding="utf-8")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _grouped(n: int) -> str:
    return f"{n:,}"


def _percent(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "0.00%"


def _row(key: str, value: str) -> str:
    return f"<tr><th>{html.escape(key)}</th><td>{html.escape(value)}</td></tr>"


def picture(
    path: str,
    findings: list[tuple[int, int, int]] | None = None,
    cover: int = 0,
    mark_errors: bool = False,
    progress: Progress = None,
    **options: Any,
) -> dict[str, Any]:
    """The image's map cut into cells, findings placed (see ``map_picture``)."""
    return _native.map_picture(
        path,
        progress=progress,
        findings=findings or [],
        cover=cover,
        max_cells=MAX_CELLS,
        mark_errors=mark_errors,
        **options,
    )


def render(
    pic: dict[str, Any],
    title: str,
    subtitle: str,
    findings: list[Mismatch] | None = None,
    extra_facts: list[tuple[str, str]] | None = None,
) -> str:
    """The page. ``findings`` are a verify's mismatches, in the order ``pic``
    placed them."""
    findings = findings or []
    size = pic["size"]
    cols, px = layout(pic["cells"])
    classes = [
        {"name": n, "label": class_label(n), "colour": class_colour(n), "bytes": b}
        for n, b in pic["classes"]
    ]
    data = {
        "image_size": pic["image_size"],
        "size": size,
        "cell_size": pic["cell_size"],
        "sector_size": _native.SECTOR_SIZE,
        "cells": pic["cells"],
        "cols": cols,
        "px": px,
        "classes": classes,
        "kinds": KINDS,
        "finding_colour": FINDING_COLOUR,
        "files": pic["files"],
        "dominant": _b64(pic["dominant"]),
        "share": _b64(pic["share"]),
        "segments": _segments(pic["segments"]),
        "findings": _findings(findings, pic["findings"]),
        "notes": _notes(findings),
    }
    # No "<" at all in the script element ("</script", "<!--"), whatever a
    # file name says: JSON lets a string spell it \u003c.
    blob = json.dumps(data, separators=(",", ":")).replace("<", "\\u003c")

    legend = []
    for c in classes:
        legend.append(
            f'<tr data-class="{c["name"]}" data-bytes="{c["bytes"]}">'
            f'<td><span class="swatch" style="background:{c["colour"]}"></span></td>'
            f"<td>{html.escape(c['label'])}</td>"
            f'<td class="num">{_grouped(c["bytes"])}</td>'
            f'<td class="num">{human_size(c["bytes"])}</td>'
            f'<td class="num">{_percent(c["bytes"], size)}</td></tr>'
        )
    if findings:
        found = sum(f.length for f in findings)
        legend.append(
            f'<tr data-class="finding" data-bytes="{found}" data-count="{len(findings)}">'
            f'<td><span class="swatch" style="background:{FINDING_COLOUR}"></span></td>'
            f"<td>findings ({_grouped(len(findings))} run{'s' if len(findings) != 1 else ''})"
            "</td>"
            f'<td class="num">{_grouped(found)}</td>'
            f'<td class="num">{human_size(found)}</td>'
            f'<td class="num">{_percent(found, size)}</td></tr>'
        )

    facts = [
        ("image", pic["path"]),
        ("format", pic["format"]),
        ("virtual size", f"{human_size(pic['image_size'])} ({_grouped(pic['image_size'])} bytes)"),
    ]
    info = pic["info"]
    if "cluster_size" in info:
        facts.append(("cluster size", human_size(int(info["cluster_size"]))))
    facts.append(("allocation unit", human_size(pic["granularity"])))
    chain = pic["chain"]
    if len(chain) > 1:
        for depth, (path, fmt, layer_size) in enumerate(chain[1:], start=1):
            facts.append((f"backing, depth {depth}", f"{path} ({fmt}, {human_size(layer_size)})"))
    elif "backing_file" in info:
        facts.append(("backing file", f"{info['backing_file']} (not opened)"))
    else:
        facts.append(("backing chain", "none"))
    facts.append(("extents", _grouped(pic["extents"])))
    facts += extra_facts or []
    detail = [(k, v) for k, v in info.items() if k not in ("cluster_size", "backing_file")]

    row_bytes = pic["cell_size"] * cols
    scale = (
        f"One cell = {human_size(pic['cell_size'])} ({_grouped(pic['cell_size'])} bytes); "
        f"{cols} cells a row = {human_size(row_bytes)}. Rows run top to bottom, cells left "
        f"to right from guest offset 0; {_grouped(pic['cells'])} cells in all. A cell takes "
        "the colour of the kind covering most of it; a cell holding any finding is drawn "
        "as a finding."
    )
    page = _asset("map_page.html")
    fill = {
        "TITLE": html.escape(title),
        "SUBTITLE": html.escape(subtitle),
        "STYLE": _asset("map_page.css"),
        "SCRIPT": _asset("map_page.js"),
        "SCALE": html.escape(scale),
        "LEGEND": "\n".join(legend),
        "FACTS": "\n".join(_row(k, v) for k, v in facts),
        "DETAIL": "\n".join(_row(k, v) for k, v in detail),
        "FINDINGS_HIDDEN": "" if findings else " hidden",
        "FINDINGS_COUNT": _grouped(len(findings)),
        "DATA": blob,
    }
    # One pass, so a value that spells a placeholder (a file name) stays text.
    return re.sub(r"\{\{([A-Z_]+)\}\}", lambda m: fill[m.group(1)], page)


def _segments(segments: list[tuple[int, str, int, int | None, int]]) -> list[int]:
    """Flat: first cell (as the step from the previous segment's), kind,
    depth, host offset (-1: none), file."""
    out: list[int] = []
    last = 0
    kind_index = {k: i for i, k in enumerate(KINDS)}
    for first_cell, kind, depth, host, file in segments:
        out += [first_cell - last, kind_index[kind], depth, -1 if host is None else host, file]
        last = first_cell
    return out


def _findings(
    findings: list[Mismatch], places: list[tuple[str | None, int, int | None, int, int | None]]
) -> list[int]:
    """Flat: offset (as the step from the previous finding's), length, first
    byte (from the offset), kind (-1: past the end), depth, host offset (-1:
    none), file, class."""
    out: list[int] = []
    add = out.extend
    last = 0
    kind_index: dict[str | None, int] = {k: i for i, k in enumerate(KINDS)}
    kind_index[None] = -1
    for f, (kind, depth, host, file, cls) in zip(findings, places, strict=True):
        offset = f.offset
        add(
            (
                offset - last,
                f.length,
                f.first_byte - offset,
                kind_index[kind],
                depth,
                -1 if host is None else host,
                file,
                -1 if cls is None else cls,
            )
        )
        last = offset
    return out


def _notes(findings: list[Mismatch]) -> dict[str, str]:
    """Words for the findings that have them: a read error, or where the
    format's tables put the byte (verify locates the first thousand)."""
    notes = {}
    for i, f in enumerate(findings):
        if f.error:
            notes[str(i)] = f"read error: {f.error}"
        elif f.mapping:
            where = describe_mapping(f.mapping)
            if where:
                notes[str(i)] = where
    return notes


def _write(path: str, page: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, path)


def write_image(path: str, out: str, progress: Progress = None, **options: Any) -> None:
    """``blkverify map --html``: the page for one image, no findings."""
    pic = picture(path, progress=progress, **options)
    title = f"blkverify map: {os.path.basename(path)}"
    subtitle = f"{pic['format']} image {path}, {human_size(pic['image_size'])}"
    if options.get("snapshot"):
        subtitle += f", snapshot {options['snapshot']}"
    _write(out, render(pic, title, subtitle))


def write_report(rep: Report, out: str, progress: Progress = None) -> None:
    """``verify --html``: the test image's page, with every finding marked."""
    mismatches = rep.mismatches
    pic = picture(
        rep.test,
        findings=[(m.offset, m.length, m.first_byte) for m in mismatches],
        cover=rep.virtual_size,
        mark_errors=True,
        progress=progress,
        **rep.test_options,
    )
    title = f"blkverify verify: {os.path.basename(rep.test)}"
    if rep.identical:
        verdict = "identical"
    elif rep.mismatches:
        total = sum(m.length for m in rep.mismatches)
        runs = len(rep.mismatches)
        verdict = f"{runs:,} mismatching run{'s' if runs != 1 else ''}, {human_size(total)}"
        if rep.truncated:
            verdict += " (stopped at the run cap: more may exist)"
    else:
        verdict = "sizes differ"
    subtitle = f"{rep.test} against {rep.raw}: {verdict}"
    extra = [
        ("reference", f"{rep.raw} ({rep.raw_format}, {human_size(rep.raw_size)})"),
        ("compared", f"{human_size(rep.bytes_compared)} in {rep.elapsed_s:.2f} s"),
    ]
    extra += [("warning", w) for w in rep.warnings]
    _write(out, render(pic, title, subtitle, findings=mismatches, extra_facts=extra))
