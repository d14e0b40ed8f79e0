"""``blkverify map``, ``bv.map`` and the HTML map (``map --html``, ``verify --html``,
``batch --html``, ``Report.to_html``).

The extents are checked against ``qemu-img map --output=json`` for every qcow2 of
the image zoo. The pages are opened in a real headless Chromium (``browser.py``):
the pixels where a known data run, zero run, compressed cluster, backing range and
finding lie must have their legend's colours, the legend's figures must match the
image as qemu-img maps it, hovering must name the guest range and the mapping, and
the page must log nothing and load nothing.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import struct
from pathlib import Path

import blkverify_rs as bv
import pytest
from browser import Browser
from conftest import (
    QCOW2_NAMES,
    convert_to_raw,
    flip_byte,
    l2_entry_offset,
    qemu_img,
    qemu_io,
    qemu_map,
    run_cli,
)

KiB = 1 << 10
MiB = 1 << 20
TiB = 1 << 40


# --------------------------------------------------------------------------------------------
# the extents, against qemu-img map
# --------------------------------------------------------------------------------------------


def our_kind(entry: dict) -> str:
    """qemu-img map's flags in our words. ``data`` wins over ``zero``: QEMU also
    asks the host file, and flags as zero the parts of a data cluster that are
    holes in it; the image's metadata, which is what we map, says data."""
    if not entry["present"]:
        return "unallocated"
    if entry.get("compressed"):
        return "compressed"
    if entry["data"]:
        return "data"
    assert entry["zero"], entry
    return "zero"


def canonical(rows: list[tuple[int, int, str, int, int | None]]) -> list[tuple]:
    """Merge neighbours with the same kind and depth (data: a contiguous host
    range too): the rule both sides must agree on."""
    out: list[list] = []
    for start, length, kind, depth, host in rows:
        if out:
            last = out[-1]
            if (
                last[0] + last[1] == start
                and last[2] == kind
                and last[3] == depth
                and (kind != "data" or last[4] + last[1] == host)
            ):
                last[1] += length
                continue
        out.append([start, length, kind, depth, host if kind == "data" else None])
    return [tuple(r) for r in out]


def qemu_rows(path: Path) -> list[tuple]:
    return canonical(
        [
            (e["start"], e["length"], our_kind(e), e["depth"], e.get("offset"))
            for e in qemu_map(path)
        ]
    )


# Every qcow2 and raw image of the zoo. qemu-img map cannot pick an internal
# snapshot; the active image is mapped once.
MAPPED = ["raw", "raw_sparse"] + [
    n for n in QCOW2_NAMES if n not in ("snapshot_by_name", "snapshot_by_id")
]


@pytest.mark.parametrize("name", MAPPED)
def test_extents_equal_qemu_img_map(zoo, name):
    entry = zoo[name]
    ours = bv.map(entry.path)
    rows = [(e.offset, e.length, e.kind, e.depth, e.host_offset) for e in ours]
    # Already merged: merging again changes nothing.
    assert canonical(rows) == rows
    assert rows == qemu_rows(entry.path)
    # Every byte once, in order.
    assert sum(e.length for e in ours) == entry.size
    assert all(a.offset + a.length == b.offset for a, b in itertools.pairwise(ours))


def test_a_vmdk_chain_equals_qemu_img_map(tmp_path):
    """QEMU's vmdk driver reports its allocation too: compare a sparse VMDK over
    a sparse VMDK, depth included."""
    base, top = tmp_path / "base.vmdk", tmp_path / "top.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", base, 16 * MiB)
    qemu_io(base, "write -P 1 0 2M", "write -P 2 8M 1M", "write -z 12M 1M", fmt="vmdk")
    qemu_img("create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", top, cwd=tmp_path)
    qemu_io(top, "write -P 3 1M 2M", "write -P 4 15M 64k", fmt="vmdk")
    rows = [(e.offset, e.length, e.kind, e.depth, e.host_offset) for e in bv.map(top)]
    assert rows == qemu_rows(top)
    assert {e.depth for e in bv.map(top)} == {0, 1}


def test_files_name_where_the_bytes_are(zoo):
    data = zoo["qcow2_data_file"]
    for e in bv.map(data.path):
        if e.kind == "data":
            assert Path(e.file).resolve() == data.data_file.resolve()
        else:
            assert Path(e.file).resolve() == data.path.resolve()
    chain = zoo["chain_3level"]
    layers = [chain.path, *chain.chain]
    for e in bv.map(chain.path):
        assert Path(e.file).resolve() == layers[e.depth].resolve(), e


def test_host_offsets_hold_the_guest_bytes(zoo):
    """A data extent's host offset is where its bytes are: read them there."""
    entry = zoo["chain_over_raw"]
    expected = entry.expected.read_bytes()
    checked = 0
    for e in bv.map(entry.path):
        if e.kind == "data":
            with open(e.file, "rb") as f:
                f.seek(e.host_offset)
                assert f.read(e.length) == expected[e.offset : e.offset + e.length]
            checked += 1
    assert checked >= 2


# Images of each format blkverify may read, as qemu-img creates them: (format,
# create options). Formats it cannot read yet are left out by the
# parametrisation below, never skipped by the test.
CREATE = {
    "qcow2": ("qcow2", []),
    "vhdx": ("vhdx", []),
    "vmdk": ("vmdk", []),
    "vmdk-split": ("vmdk", ["-o", "subformat=twoGbMaxExtentSparse"]),
    "vmdk-flat": ("vmdk", ["-o", "subformat=monolithicFlat"]),
    "vpc": ("vpc", ["-o", "subformat=dynamic"]),
    "vdi": ("vdi", []),
}
READABLE = bv.formats(readable=True)


@pytest.mark.parametrize("kind", [k for k, (fmt, _) in CREATE.items() if fmt in READABLE])
def test_the_map_tells_the_truth_for_every_readable_format(tmp_path, kind):
    """Whatever the format: data extents hold the guest bytes at their host
    offset in their file, and zero and unallocated extents read as zeros."""
    fmt, options = CREATE[kind]
    img = tmp_path / f"img.{fmt}"
    qemu_img("create", "-q", "-f", fmt, *options, img, 64 * MiB)
    qemu_io(
        img,
        "write -P 0x31 0 1M",
        "write -P 0x32 17M 3M",
        "write -z 24M 2M",
        f"write -P 0x33 {40 * MiB + 512} 4k",
        fmt=fmt,
    )
    raw = tmp_path / "img.raw"
    convert_to_raw(img, raw, fmt=fmt)
    expected = raw.read_bytes()
    rows = bv.map(img)
    assert sum(e.length for e in rows) == len(expected)
    kinds = set()
    for e in rows:
        kinds.add(e.kind)
        want = expected[e.offset : e.offset + e.length]
        if e.kind == "data":
            with open(e.file, "rb") as f:
                f.seek(e.host_offset)
                assert f.read(e.length) == want, e
        elif e.kind in ("zero", "unallocated"):
            assert want == bytes(e.length), e
    assert "data" in kinds
    if kind != "vmdk-flat":  # a flat extent is all data
        assert kinds & {"zero", "unallocated"}
    assert json.loads(run_cli("map", "--json", img).stdout) == [e.to_dict() for e in rows]
    if kind in ("vmdk-split", "vmdk-flat"):
        # The bytes live in the extent files, not in the descriptor.
        assert {e.file for e in rows if e.kind == "data"} == {
            str(p) for p in tmp_path.iterdir() if p.name not in (img.name, "img.raw")
        }


def test_compressed_grains_live_in_their_file(tmp_path):
    src = tmp_path / "src.raw"
    qemu_img("create", "-q", "-f", "raw", src, 8 * MiB)
    qemu_io(src, "write -P 0x61 1M 2M", "write -P 0x62 6M 64k", fmt="raw")
    img = tmp_path / "stream.vmdk"
    qemu_img("convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, img)
    rows = bv.map(img)
    compressed = [e for e in rows if e.kind == "compressed"]
    assert sum(e.length for e in compressed) == 2 * MiB + 64 * KiB
    assert {e.file for e in compressed} == {str(img)}
    assert all(e.host_offset is None for e in compressed)


def test_no_backing_maps_unallocated_ranges_as_such(zoo):
    entry = zoo["chain_3level"]
    rows = bv.map(entry.path, backing=False)
    assert {e.depth for e in rows} == {0}
    assert "unallocated" in {e.kind for e in rows}


def test_map_extent_record():
    e = bv.MapExtent(offset=0, length=512, kind="data", depth=1, host_offset=4096, file="b")
    assert e.to_dict() == {
        "offset": 0,
        "length": 512,
        "kind": "data",
        "depth": 1,
        "host_offset": 4096,
        "file": "b",
    }
    with pytest.raises(AttributeError):
        e.kind = "zero"  # type: ignore[misc]
    assert e == bv.MapExtent(**e.to_dict())
    assert hash(e) == hash(bv.MapExtent(**e.to_dict()))
    assert e != bv.MapExtent(**{**e.to_dict(), "depth": 0})
    assert repr(e) == (
        "MapExtent(offset=0, length=512, kind='data', depth=1, host_offset=4096, file=\"b\")"
    )
    with pytest.raises(ValueError, match="kind must be"):
        bv.MapExtent(offset=0, length=1, kind="backing", depth=0, host_offset=None, file="b")


def test_cli_lines_and_json_agree_with_the_api(zoo):
    entry = zoo["chain_over_compressed"]
    api = [e.to_dict() for e in bv.map(entry.path)]
    proc = run_cli("map", "--json", entry.path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == api
    proc = run_cli("map", entry.path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["Offset", "Length", "Kind", "Depth", "Mapped", "to", "File"]
    assert len(lines) == len(api) + 1
    for line, e in zip(lines[1:], api, strict=True):
        offset, length, kind, depth, host, file = line.split(maxsplit=5)
        assert int(offset, 0) == e["offset"] and int(length, 0) == e["length"]
        assert (kind, int(depth), file) == (e["kind"], e["depth"], e["file"])
        assert host == ("-" if e["host_offset"] is None else hex(e["host_offset"]))


def test_a_terabyte_sparse_image_maps_in_a_few_extents(tmp_path):
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1T")
    qemu_io(img, "write -P 1 0 64k", f"write -z {TiB // 2} 64k", f"write -P 2 {TiB - 4096} 4k")
    rows = bv.map(img)
    assert [(e.kind, e.length) for e in rows if e.kind != "unallocated"] == [
        ("data", 64 * KiB),
        ("zero", 64 * KiB),
        ("data", 64 * KiB),  # the whole last cluster, as qemu-io allocated it
    ]
    assert canonical([(e.offset, e.length, e.kind, e.depth, e.host_offset) for e in rows]) == (
        qemu_rows(img)
    )


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_a_damaged_image_is_an_error_with_status_2(zoo, tmp_path):
    img = tmp_path / "damaged.qcow2"
    shutil.copy(zoo["qcow2_c64k"].path, img)
    # The data cluster of guest offset 0 now lies far past the end of the file.
    at = l2_entry_offset(img, 0)
    with open(img, "r+b") as f:
        f.seek(at)
        (entry,) = struct.unpack(">Q", f.read(8))
        f.seek(at)
        f.write(struct.pack(">Q", (entry & ~0x00FFFFFFFFFFFE00) | (1 << 40)))
    for args in (["map", img], ["map", "--json", img], ["map", "--html", tmp_path / "x.html", img]):
        proc = run_cli(*args)
        assert proc.returncode == 2, proc
        assert proc.stdout == ""
        assert re.fullmatch(
            rf"blkverify: error: {re.escape(str(img))}: qcow2: .*lies past the end of the file.*\n",
            proc.stderr,
        ), proc.stderr
    assert not (tmp_path / "x.html").exists()
    with pytest.raises(bv.CorruptImageError, match="lies past the end of the file"):
        bv.map(img)
    # verify reads the damage as a finding (exit 1) and draws it as unreadable metadata.
    raw = tmp_path / "ref.raw"
    shutil.copy(zoo["qcow2_c64k"].expected, raw)
    page = tmp_path / "damaged.html"
    proc = run_cli("verify", "--html", page, raw, img)
    assert proc.returncode == 1, proc.stderr
    assert 'data-class="error"' in page.read_text()


def test_missing_and_refused_images_are_errors(tmp_path):
    proc = run_cli("map", tmp_path / "nope.qcow2")
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"blkverify: error: {tmp_path / 'nope.qcow2'}: ")
    qcow1 = tmp_path / "x.img"
    qcow1.write_bytes(b"QFI\xfb\x00\x00\x00\x01" + bytes(504))
    proc = run_cli("map", qcow1)
    assert proc.returncode == 2
    assert "qcow (version 1)" in proc.stderr


# --------------------------------------------------------------------------------------------
# the pages
# --------------------------------------------------------------------------------------------


def qemu_host_offset(image: Path, guest: int) -> int:
    """Where ``qemu-img map`` says guest byte ``guest`` of ``image`` is stored
    (in the image, or in the backing file that serves it)."""
    (e,) = [e for e in qemu_map(image) if e["start"] <= guest < e["start"] + e["length"]]
    return e["offset"] + guest - e["start"]


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> dict:
    """A 4 MiB qcow2 (4 KiB clusters) over a qcow2 base: data, a zero run, a
    compressed run and a backing range; its raw reference; then one byte
    flipped in the top's data and one in the base's, so verify finds two runs."""
    d = tmp_path_factory.mktemp("scene")
    base = d / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", base, 4 * MiB)
    qemu_io(base, "write -P 0x11 2M 512k")
    top = d / "top.qcow2"
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2", "-F", "qcow2",
        top, 4 * MiB, cwd=d,
    )  # fmt: skip
    qemu_io(
        top,
        "write -P 0x22 0 256k",
        "write -z 1M 256k",
        "write -c -P 0x33 3M 64k",
        "write -P 0x44 3584k 4k",
    )
    raw = d / "raw.img"
    convert_to_raw(top, raw)
    findings = [100_000, 2 * MiB + 300 * KiB + 7]
    for guest, image in [(findings[0], top), (findings[1], base)]:
        flip_byte(image, qemu_host_offset(image, guest))
    page = d / "scene.html"
    proc = run_cli("verify", "--html", page, raw, top)
    assert proc.returncode == 1, proc.stderr
    return {"dir": d, "top": top, "base": base, "raw": raw, "page": page, "findings": findings,
            "stdout": proc.stdout}  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def test_verify_html_implies_all(scene):
    # Both runs are listed, as --all lists them.
    assert "Images differ: 2 mismatching run(s)" in scene["stdout"]
    assert scene["stdout"].count("contents mismatch in sector") == 2


def expected_class_bytes(path: Path) -> dict[str, int]:
    """Bytes per legend class, from qemu-img map."""
    out: dict[str, int] = {}
    for e in qemu_map(path):
        kind, depth = our_kind(e), e["depth"]
        name = kind if kind == "unallocated" or depth == 0 else f"backing{depth}"
        out[name] = out.get(name, 0) + e["length"]
    return out


def rgb(css: str) -> tuple[int, int, int]:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return r, g, b


def close(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    return all(abs(x - y) <= 2 for x, y in zip(a, b, strict=True))


class Page:
    """A loaded map page: its data, layout and legend, read from the DOM."""

    def __init__(self, browser: Browser, path: Path) -> None:
        self.browser = browser
        self.url = browser.open(path)
        assert browser.eval("document.body.dataset.ready") == "1"
        self.data = browser.eval("JSON.parse(document.getElementById('map-data').textContent)")
        left, top = browser.eval(
            "(() => { const r = document.getElementById('map').getBoundingClientRect();"
            " return [r.left + window.scrollX, r.top + window.scrollY]; })()"
        )
        self.origin = (left, top)
        self.legend = {
            row[0]: {"bytes": int(row[1]), "cells": row[2:6], "colour": rgb(row[6])}
            for row in browser.eval(
                "[...document.querySelectorAll('#legend tbody tr')].map(r => [r.dataset.class,"
                " r.dataset.bytes, ...[...r.cells].slice(1).map(c => c.textContent),"
                " getComputedStyle(r.querySelector('.swatch')).backgroundColor])"
            )
        }

    def point(self, guest_offset: int) -> tuple[float, float]:
        """Page coordinates of the middle of the cell holding ``guest_offset``:
        rows of ``cols`` cells, top to bottom, from offset 0 (docs/map.md's rule)."""
        cell = guest_offset // self.data["cell_size"]
        cols, px = self.data["cols"], self.data["px"]
        return (
            self.origin[0] + (cell % cols) * px + px / 2,
            self.origin[1] + (cell // cols) * px + px / 2,
        )

    def colour_at(self, guest_offset: int) -> tuple[int, int, int]:
        return self.browser.pixel(*self.point(guest_offset))

    def tip_at(self, x: float, y: float) -> str:
        """Hover the page point (x, y), scrolled into view; the tooltip's text."""
        self.browser.eval(f"window.scrollTo(0, {max(0, y - 300)})")
        sx, sy = self.browser.eval("[window.scrollX, window.scrollY]")
        self.browser.hover(x - sx, y - sy)
        assert self.browser.eval("document.getElementById('tip').hidden") is False
        return self.browser.eval("document.getElementById('tip').textContent")


def test_the_pixels_have_their_legends_colours(scene, browser):
    page = Page(browser, scene["page"])
    legend = page.legend
    where = {
        "data": 64 * KiB,
        "zero": 1 * MiB + 64 * KiB,
        "compressed": 3 * MiB + 8 * KiB,
        "backing1": 2 * MiB + 64 * KiB,
        "unallocated": 1536 * KiB,
        "finding": scene["findings"][0],
    }
    for name, guest in where.items():
        assert close(page.colour_at(guest), legend[name]["colour"]), name
    # The finding in the backing range wins its cell too.
    assert close(page.colour_at(scene["findings"][1]), legend["finding"]["colour"])
    # Five kinds and the findings: six colours, all different.
    assert len({legend[n]["colour"] for n in where}) == len(where)


def test_the_legend_matches_the_image(scene, browser):
    page = Page(browser, scene["page"])
    expected = expected_class_bytes(scene["top"])
    shown = {k: v for k, v in page.legend.items() if k != "finding"}
    assert {k: v["bytes"] for k, v in shown.items()} == expected
    size = 4 * MiB
    for name, row in shown.items():
        _label, grouped, _human, share = row["cells"]
        assert int(grouped.replace(",", "")) == expected[name]
        assert share == f"{100 * expected[name] / size:.2f}%"
    report = json.loads(run_cli("verify", "--json", "--all", scene["raw"], scene["top"]).stdout)
    finding = page.legend["finding"]
    assert finding["bytes"] == sum(m["length"] for m in report["mismatches"])
    assert browser.eval("document.querySelector('#legend tr[data-class=finding]').dataset.count")
    assert browser.eval("document.querySelectorAll('#finding-table tbody tr').length") == 2


def test_hovering_names_the_range_and_the_mapping(scene, browser):
    page = Page(browser, scene["page"])
    cs = page.data["cell_size"]
    guest = 64 * KiB
    tip = page.tip_at(*page.point(guest))
    host = qemu_host_offset(scene["top"], guest)
    assert f"guest {guest:#x} - {guest + cs - 1:#x}" in tip
    assert f"data at host offset {host:#x} in {scene['top']}" in tip
    # A finding's row names its sector and where its first differing byte lives.
    first = scene["findings"][1]
    row = browser.eval(
        "(() => { const r = document.querySelectorAll('#finding-table tbody tr')[1]"
        ".getBoundingClientRect(); return [r.left + 20 + window.scrollX,"
        " r.top + r.height / 2 + window.scrollY]; })()"
    )
    tip = page.tip_at(*row)
    assert f"sector {first // 512:,}" in tip
    assert f"first differing byte at {first:#x}" in tip
    assert f"data at host offset {qemu_host_offset(scene['top'], first):#x}" in tip
    assert "[backing file, depth 1]" in tip


def test_the_page_logs_nothing_and_loads_nothing(scene, browser, tmp_path):
    page = Page(browser, scene["page"])
    assert browser.console_problems() == []
    assert browser.requests() == [page.url]
    text = scene["page"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    # The check can fail: a page that throws is caught.
    broken = tmp_path / "broken.html"
    broken.write_text("<!doctype html><script>notAFunction();</script>")
    browser.open(broken)
    assert any("notAFunction" in p for p in browser.console_problems())


def test_map_html_of_one_image(scene, tmp_path, browser):
    out = tmp_path / "top.html"
    proc = run_cli("map", "--html", out, scene["top"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    page = Page(browser, out)
    assert "finding" not in page.legend
    assert {k: v["bytes"] for k, v in page.legend.items()} == expected_class_bytes(scene["top"])
    assert close(page.colour_at(64 * KiB), page.legend["data"]["colour"])
    facts = browser.eval(
        "Object.fromEntries([...document.querySelectorAll('#facts tr')]"
        ".map(r => [r.cells[0].textContent, r.cells[1].textContent]))"
    )
    assert facts["format"] == "qcow2"
    assert facts["cluster size"] == "4.0 KiB"
    assert facts["virtual size"] == "4.0 MiB (4,194,304 bytes)"
    assert facts["backing, depth 1"].startswith(str(scene["dir"] / "base.qcow2"))
    assert browser.console_problems() == []


def test_batch_writes_one_page_per_pair_that_differs(scene, tmp_path):
    d = scene["dir"]
    manifest = d / "manifest.txt"
    same = d / "same.raw"
    shutil.copy(scene["raw"], same)
    manifest.write_text(f"# pairs\nraw.img top.qcow2\n\nraw.img {same.name}\n")
    out = tmp_path / "pages"
    proc = run_cli("batch", "--no-progress", "--html", out, manifest)
    assert proc.returncode == 1, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["2-top.qcow2.html"]
    assert "2 run" in (out / "2-top.qcow2.html").read_text()


def test_a_terabyte_and_100000_findings_stay_small(tmp_path, browser):
    img = tmp_path / "big.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, "1T")
    qemu_io(img, "write -P 1 0 1M", f"write -P 2 {TiB // 2} 16M")
    # 100,000 one-sector runs a MiB apart: about 6,000 cells of findings.
    n, step = 100_000, MiB
    mismatches = [
        bv.Mismatch(sector=i * step // 512, offset=i * step, length=512, first_byte=i * step + 3)
        for i in range(n)
    ]
    report = bv.Report(
        raw="ref.raw", test=str(img), raw_format="raw", test_format="qcow2",
        virtual_size=TiB, raw_size=TiB, test_size=TiB, identical=False,
        bytes_compared=TiB, bytes_read=0, elapsed_s=1.0, truncated=False,
        mismatches=mismatches,
    )  # fmt: skip
    out = tmp_path / "big.html"
    report.to_html(out)
    assert out.stat().st_size < 5 * MiB
    page = Page(browser, out)
    assert page.data["cells"] == 1 << 16
    assert page.data["cell_size"] == 1 << 24
    assert page.legend["finding"]["cells"][0].startswith("findings (100,000 runs)")
    assert browser.eval("document.querySelectorAll('#finding-table tbody tr').length") == 500
    assert browser.console_problems() == []
    assert close(page.colour_at(step * 1000), page.legend["finding"]["colour"])
    assert close(page.colour_at(TiB // 2), page.legend["data"]["colour"])
    assert close(page.colour_at(TiB // 4 * 3), page.legend["unallocated"]["colour"])


def test_a_longer_reference_draws_past_the_end(tmp_path, browser):
    test = tmp_path / "short.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", test, 1 * MiB)
    qemu_io(test, "write -P 0x5 0 64k")
    raw = tmp_path / "long.raw"
    convert_to_raw(test, raw)
    with open(raw, "r+b") as f:
        f.truncate(2 * MiB)
        f.seek(1536 * KiB)
        f.write(b"\x01" * 512)
    out = tmp_path / "long.html"
    proc = run_cli("verify", "--html", out, raw, test)
    assert proc.returncode == 1, proc.stderr
    page = Page(browser, out)
    assert page.legend["past_end"]["bytes"] == 1 * MiB
    assert close(page.colour_at(1792 * KiB), page.legend["past_end"]["colour"])
    assert close(page.colour_at(1536 * KiB), page.legend["finding"]["colour"])
    tip = page.tip_at(*page.point(1792 * KiB))
    assert "past the end of the image" in tip
    assert browser.console_problems() == []


def test_an_empty_image_and_a_snapshot(tmp_path, zoo, browser):
    empty = tmp_path / "empty.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", empty, 0)
    assert bv.map(empty) == []
    out = tmp_path / "empty.html"
    bv.map_html(empty, out)
    page = Page(browser, out)
    assert page.data["cells"] == 0
    assert browser.console_problems() == []
    # A snapshot maps as the snapshot, not the active image.
    snap = zoo["snapshot_by_name"]
    with bv.open(snap.path, snapshot="snap1") as img:
        own = [(o, n, k, 0, h) for o, n, k, h in img.map()]
    rows = [
        (e.offset, e.length, e.kind, e.depth, e.host_offset)
        for e in bv.map(snap.path, snapshot="snap1")
    ]
    assert rows == canonical(own)
    assert rows != [(e.offset, e.length, e.kind, e.depth, e.host_offset) for e in bv.map(snap.path)]


def test_hostile_file_names_stay_text(tmp_path, browser):
    """A file name is data, never markup or a placeholder: one spelling
    ``</script>``, ``<!--`` and ``{{SCRIPT}}`` still gives a page that runs
    cleanly and shows the name as it is."""
    d = tmp_path / "<!--<"
    d.mkdir()
    img = d / "script>{{SCRIPT}}&amp;.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, 1 * MiB)
    qemu_io(img, "write -P 7 0 64k")
    out = tmp_path / "hostile.html"
    bv.map_html(img, out)
    page = Page(browser, out)
    assert browser.console_problems() == []
    assert page.data["files"] == [str(img)]
    assert browser.eval("document.querySelector('#facts td').textContent") == str(img)
    assert str(img) in page.tip_at(*page.point(0))
    assert browser.eval("document.querySelectorAll('script').length") == 2
