"""The qcow2 writer, judged by QEMU's own tools.

Seeded random sequences of writes, zero-writes and discards go to one of our qcow2
images and, as the same guest-visible change, to a raw file. Afterwards
``qemu-img check`` must find no errors and no leaks, and ``qemu-img compare`` must
call the two identical. Every failure message names the image kind and the seed.
``BLKVERIFY_WRITE_OPS`` sets the number of operations per sequence (default 150).

Discard and zero-write semantics are checked against QEMU itself: the same
operations are applied with ``qemu-io`` to a copy of the image, and the two
results must compare identical.
"""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import blkverify_rs as bv
import pytest

KiB = 1024
MiB = 1024 * KiB
OPS = int(os.environ.get("BLKVERIFY_WRITE_OPS", "150"))
SEEDS = [int(s) for s in os.environ.get("BLKVERIFY_WRITE_SEEDS", "1").split(",")]


def _no_core() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def sh(*args, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(a) for a in args],
        capture_output=True,
        text=True,
        check=False,
        cwd=cwd,
        preexec_fn=_no_core,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def check_clean(path: Path, context: str) -> dict:
    """``qemu-img check``: no corruptions, no leaks, no check errors."""
    # Relative data file names resolve against the working directory in qemu-img.
    proc = sh("qemu-img", "check", "--output=json", path, check=False, cwd=path.parent)
    assert proc.stdout, f"{context}: qemu-img check printed nothing: {proc.stderr}"
    report = json.loads(proc.stdout)
    problems = {
        k: report.get(k, 0) for k in ("corruptions", "leaks", "check-errors") if report.get(k, 0)
    }
    assert proc.returncode == 0 and not problems, (
        f"{context}: qemu-img check found {problems} (rc {proc.returncode}):\n"
        f"{proc.stdout}\n{proc.stderr}"
    )
    return report


def compare(raw: Path, img: Path, context: str, fmt: str = "qcow2") -> None:
    proc = sh("qemu-img", "compare", "-f", "raw", "-F", fmt, raw, img, check=False, cwd=img.parent)
    assert proc.returncode == 0, f"{context}: qemu-img compare: {proc.stdout}{proc.stderr}"


@dataclass
class Kind:
    """An image kind: how to make it, and what QEMU's discard turns a cluster into."""

    name: str
    size: int
    cluster_size: int
    create: list[str] = field(default_factory=list)  # qemu-img create -o options
    version: int = 3
    backing: str | None = None  # "qcow2" or "raw": the base is filled with data
    compressed_base: bool = False  # start from `qemu-img convert -c` of random data
    snapshot: bool = False  # fill, then take an internal snapshot
    data_file: bool = False
    ours: bool = False  # made by bv.create instead of qemu-img


KINDS = [
    Kind("v3-512", 4 * MiB, 512),
    Kind("v3-4k", 8 * MiB, 4 * KiB),
    Kind("v3-64k", 8 * MiB, 64 * KiB),
    Kind("v3-2m", 16 * MiB, 2 * MiB),
    Kind("v3-64k-ours", 8 * MiB, 64 * KiB, ours=True),
    Kind("v2", 8 * MiB, 64 * KiB, ["compat=0.10"], version=2),
    Kind("refcount1", 4 * MiB, 4 * KiB, ["refcount_bits=1"]),
    Kind("refcount64", 4 * MiB, 512, ["refcount_bits=64"]),
    Kind("extended-l2", 8 * MiB, 64 * KiB, ["extended_l2=on"]),
    Kind("extended-l2-backing", 8 * MiB, 32 * KiB, ["extended_l2=on"], backing="qcow2"),
    Kind("lazy-refcounts", 8 * MiB, 64 * KiB, ["lazy_refcounts=on"]),
    Kind("compressed-base", 8 * MiB, 64 * KiB, compressed_base=True),
    Kind("backing-qcow2", 8 * MiB, 64 * KiB, backing="qcow2"),
    Kind("backing-raw-4k", 8 * MiB, 4 * KiB, backing="raw"),
    Kind("v2-backing", 8 * MiB, 64 * KiB, ["compat=0.10"], version=2, backing="qcow2"),
    Kind("internal-snapshot", 8 * MiB, 64 * KiB, snapshot=True),
    Kind("data-file", 8 * MiB, 64 * KiB, data_file=True),
]


def random_fill(path: Path, size: int, rng: random.Random, density: float = 0.5) -> bytes:
    """Write random data over about ``density`` of a raw file, in 4 KiB..128 KiB runs."""
    data = bytearray(size)
    pos = 0
    while pos < size:
        run = min(rng.choice([4 * KiB, 32 * KiB, 128 * KiB]), size - pos)
        if rng.random() < density:
            data[pos : pos + run] = rng.randbytes(run)
        pos += run
    path.write_bytes(bytes(data))
    return bytes(data)


def make_image(kind: Kind, d: Path, seed: int) -> tuple[Path, bytes]:
    """Build the image; returns it and its current guest bytes."""
    rng = random.Random(seed * 7919 + 1)
    img = d / f"{kind.name}.qcow2"
    opts = [f"cluster_size={kind.cluster_size}", *kind.create]
    if kind.ours:
        bv.create(img, kind.size, cluster_size=kind.cluster_size)
        return img, bytes(kind.size)
    if kind.backing:
        src = d / "base-src.raw"
        backing_bytes = random_fill(src, kind.size, rng)
        if kind.backing == "raw":
            base = src
        else:
            base = d / "base.qcow2"
            sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-o",
               f"cluster_size={kind.cluster_size}", src, base)  # fmt: skip
        sh("qemu-img", "create", "-f", "qcow2", "-o", ",".join(opts), "-b", base.name,
           "-F", kind.backing, img.name, cwd=d)  # fmt: skip
        return img, backing_bytes
    if kind.compressed_base:
        src = d / "src.raw"
        content = random_fill(src, kind.size, rng, density=0.7)
        # Compressible data: repeat short runs so deflate really compresses.
        content = bytes(b if i % 3 else 0 for i, b in enumerate(content))
        src.write_bytes(content)
        sh("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", ",".join(opts),
           src, img)  # fmt: skip
        return img, content
    if kind.data_file:
        opts.append(f"data_file={kind.name}.data")
    sh("qemu-img", "create", "-f", "qcow2", "-o", ",".join(opts), img.name, str(kind.size), cwd=d)
    content = bytes(kind.size)
    if kind.snapshot:
        src = d / "src.raw"
        content = random_fill(src, kind.size, rng)
        sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", src, img)
        sh("qemu-img", "snapshot", "-c", "snap1", img)
    return img, content


def random_ops(rng: random.Random, size: int, cluster: int, count: int):
    """(op, offset, length, unmap) tuples: aligned and unaligned, small and large."""
    for _ in range(count):
        shape = rng.random()
        if shape < 0.3:  # any byte offset, short
            length = rng.randrange(1, 9 * KiB)
            offset = rng.randrange(0, size - length + 1)
        elif shape < 0.6:  # sector aligned
            length = rng.randrange(1, 128) * 512
            offset = rng.randrange(0, (size - length) // 512 + 1) * 512
        elif shape < 0.85:  # whole clusters
            n = rng.randrange(1, max(2, min(16, size // cluster // 4)))
            length = n * cluster
            offset = rng.randrange(0, (size - length) // cluster + 1) * cluster
        else:  # large, unaligned
            length = rng.randrange(1, min(size, 3 * max(cluster, 64 * KiB)))
            offset = rng.randrange(0, size - length + 1)
        which = rng.random()
        op = "write" if which < 0.55 else "zero" if which < 0.8 else "discard"
        yield op, offset, length, rng.random() < 0.5


def discarded_range(offset: int, length: int, size: int, cluster: int) -> tuple[int, int]:
    """The part of a discard request QEMU acts on: whole clusters (and the tail)."""
    start = -(-offset // cluster) * cluster
    end = size if offset + length == size else (offset + length) // cluster * cluster
    return start, end


def run_sequence(kind: Kind, d: Path, seed: int, count: int) -> None:
    img, content = make_image(kind, d, seed)
    context = f"kind {kind.name}, seed {seed}, {count} ops"
    model = bytearray(content)
    rng = random.Random(seed)
    ops = list(random_ops(rng, kind.size, kind.cluster_size, count))
    with bv.open(img, read_only=False) as image:
        for i, (op, offset, length, unmap) in enumerate(ops):
            where = f"{context}: op {i} {op} offset {offset} length {length}"
            if op == "write":
                data = rng.randbytes(length)
                image.write(offset, data)
                model[offset : offset + length] = data
            elif op == "zero":
                image.write_zeroes(offset, length, unmap=unmap)
                model[offset : offset + length] = bytes(length)
            else:
                image.discard(offset, length)
                start, end = discarded_range(offset, length, kind.size, kind.cluster_size)
                # v3 discards leave zero clusters; QEMU ignores discards on a v2
                # image with a backing file (they would expose the backing data).
                if start < end and not (kind.version == 2 and kind.backing):
                    model[start:end] = bytes(end - start)
            if i % 25 == 0 or i == len(ops) - 1:
                probe = rng.randrange(0, kind.size - 4096)
                got = image.read(probe, 4096)
                assert got == bytes(model[probe : probe + 4096]), f"{where}: read-back differs"
        image.flush()
    raw = d / "model.raw"
    raw.write_bytes(bytes(model))
    check_clean(img, context)
    compare(raw, img, context)
    if kind.snapshot:
        # The snapshot still holds the data it was taken with.
        snap = d / "snap.raw"
        sh("qemu-img", "convert", "-l", "snap1", "-O", "raw", img, snap)
        assert snap.read_bytes() == content, f"{context}: snapshot contents changed"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", KINDS, ids=[k.name for k in KINDS])
def test_random_sequence(kind: Kind, seed: int, tmp_path: Path) -> None:
    run_sequence(kind, tmp_path, seed, OPS)


# --------------------------------------------------------------------------- QEMU as oracle


QEMU_KINDS = [
    k
    for k in KINDS
    if k.name
    in ("v3-64k", "v2", "v2-backing", "backing-qcow2", "extended-l2-backing", "internal-snapshot")
]


@pytest.mark.parametrize("kind", QEMU_KINDS, ids=[k.name for k in QEMU_KINDS])
def test_same_ops_as_qemu_io(kind: Kind, tmp_path: Path) -> None:
    """Pattern writes, zero-writes and discards through us and through qemu-io
    leave images that read the same (QEMU decides what a discard reads as)."""
    seed = 11
    img, _ = make_image(kind, tmp_path, seed)
    theirs = tmp_path / "theirs.qcow2"
    shutil.copyfile(img, theirs)
    rng = random.Random(seed)
    commands = []
    with bv.open(img, read_only=False) as image:
        for i, (op, offset, length, unmap) in enumerate(
            random_ops(rng, kind.size, kind.cluster_size, 80)
        ):
            # qemu-io takes sector-aligned requests; keep to them here.
            offset, length = offset // 512 * 512, max(512, length // 512 * 512)
            length = min(length, kind.size - offset)
            if op == "write":
                pattern = i % 250 + 1
                image.write(offset, bytes([pattern]) * length)
                commands.append(f"write -P {pattern} {offset} {length}")
            elif op == "zero":
                image.write_zeroes(offset, length, unmap=unmap)
                commands.append(f"write -z {'-u ' if unmap else ''}{offset} {length}")
            else:
                image.discard(offset, length)
                commands.append(f"discard {offset} {length}")
    args = ["qemu-io", "-f", "qcow2"]
    for c in commands:
        args += ["-c", c]
    sh(*args, theirs)
    context = f"kind {kind.name}, seed {seed}"
    check_clean(img, context)
    proc = sh("qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", theirs, img, check=False)
    assert proc.returncode == 0, f"{context}: differs from qemu-io's result: {proc.stdout}"


# --------------------------------------------------------------------------- interop


def test_images_we_write_read_in_qemu_io(tmp_path: Path) -> None:
    img = tmp_path / "ours.qcow2"
    bv.create(img, 4 * MiB, cluster_size=4096)
    with bv.open(img, read_only=False) as image:
        image.write(1000, b"\x5a" * 10000)
        image.write_zeroes(4096 * 3, 4096)
        image.write(3 * MiB, b"\xa5" * 65536)
    out = sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 1000 10000",
             "-c", "read -P 0 12288 4096", "-c", "read -P 0xa5 3M 64k",
             "-c", "read -P 0 0 1000", img).stdout  # fmt: skip
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == 4, out
    check_clean(img, "interop")


def test_images_qemu_io_writes_read_in_ours(tmp_path: Path) -> None:
    img = tmp_path / "theirs.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "cluster_size=4096", img, "4M")
    with bv.open(img, read_only=False) as image:
        image.write(0, b"\x11" * 8192)
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 4096 8192", "-c", "write -z 1M 64k",
       "-c", "write -P 0x33 2M 5000", img)  # fmt: skip
    expected = tmp_path / "expected.raw"
    sh("qemu-img", "convert", "-O", "raw", img, expected)
    with bv.open(img, read_only=False) as image:
        assert image.read(0, 4 * MiB) == expected.read_bytes()
        image.write(2 * MiB + 100, b"\x44" * 100)
    out = sh("qemu-io", "-f", "qcow2", "-c", "read -P 0x44 2097252 100",
             "-c", "read -P 0x33 2M 100", img).stdout  # fmt: skip
    assert "Pattern verification failed" not in out, out
    check_clean(img, "interop")


# --------------------------------------------------------------------------- lazy refcounts


def test_dirty_image_gets_refcounts_rebuilt_on_writable_open(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", "-o", "lazy_refcounts=on,cluster_size=4096", img, "4M")
    # qemu-io's abort leaves the image dirty, with refcounts QEMU never wrote.
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 64k", "-c", "write -P 8 1M 64k",
       "-c", "abort", img, check=False)  # fmt: skip
    header = img.read_bytes()[72:80]
    assert int.from_bytes(header, "big") & 1, "qemu-io abort did not leave the dirty bit"
    with bv.open(img) as image:  # read-only: nothing changes
        assert image.read(0, 4096) == b"\x07" * 4096
    assert int.from_bytes(img.read_bytes()[72:80], "big") & 1
    with bv.open(img, read_only=False) as image:
        assert int.from_bytes(img.read_bytes()[72:80], "big") & 1 == 0
        image.write(2 * MiB, b"\x09" * 5000)
        assert image.read(1 * MiB, 4096) == b"\x08" * 4096
    check_clean(img, "lazy refcounts rebuild")
    out = sh("qemu-io", "-f", "qcow2", "-c", "read -P 9 2M 5000", "-c", "read -P 8 1M 64k",
             img).stdout  # fmt: skip
    assert "Pattern verification failed" not in out, out


def test_lazy_refcounts_mark_dirty_while_writing_and_clean_on_close(tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    bv.create(img, 4 * MiB, lazy_refcounts=True, cluster_size=4096)
    with bv.open(img, read_only=False) as image:
        image.write(0, b"\x01" * 4096)
        assert int.from_bytes(img.read_bytes()[72:80], "big") & 1 == 1
    assert int.from_bytes(img.read_bytes()[72:80], "big") & 1 == 0
    check_clean(img, "lazy refcounts")


# --------------------------------------------------------------------------- refusals


def test_read_only_images_refuse_writes_and_stay_unchanged(tmp_path: Path) -> None:
    img = tmp_path / "ro.qcow2"
    bv.create(img, 1 * MiB)
    before = img.read_bytes()
    with bv.open(img) as image:
        assert image.read_only
        for call in (
            lambda: image.write(0, b"x"),
            lambda: image.write_zeroes(0, 512),
            lambda: image.discard(0, 65536),
        ):
            with pytest.raises(OSError, match="read-only"):
                call()
    assert img.read_bytes() == before


def test_writes_past_the_end_are_errors_not_resizes(tmp_path: Path) -> None:
    img = tmp_path / "end.qcow2"
    bv.create(img, 1 * MiB)
    with bv.open(img, read_only=False) as image:
        with pytest.raises(ValueError, match="past the end"):
            image.write(1 * MiB - 10, b"x" * 11)
        with pytest.raises(ValueError, match="past the end"):
            image.write_zeroes(1 * MiB, 1)
        image.write(1 * MiB - 10, b"y" * 10)
        assert image.size == 1 * MiB
    assert bv.open(img).size == 1 * MiB
    check_clean(img, "end")


# --------------------------------------------------------------------------- create


@pytest.mark.parametrize(
    ("kwargs", "expect"),
    [
        ({}, {"cluster-size": 65536, "compat": "1.1", "refcount-bits": 16}),
        ({"cluster_size": 512, "refcount_bits": 64}, {"cluster-size": 512, "refcount-bits": 64}),
        ({"version": 2}, {"compat": "0.10"}),
        ({"extended_l2": True}, {"extended-l2": True}),
        ({"lazy_refcounts": True}, {"lazy-refcounts": True}),
    ],
)
def test_create_makes_what_qemu_img_info_reports(tmp_path: Path, kwargs, expect) -> None:
    img = tmp_path / "new.qcow2"
    bv.create(img, 5 * MiB, **kwargs)
    info = json.loads(sh("qemu-img", "info", "--output=json", img).stdout)
    assert info["virtual-size"] == 5 * MiB
    data = info["format-specific"]["data"]
    for key, value in expect.items():
        actual = info["cluster-size"] if key == "cluster-size" else data[key]
        assert actual == value, (key, info)
    check_clean(img, f"create {kwargs}")


def test_create_with_backing_and_cli(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-f", "qcow2", base, "3M")
    sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", base)
    proc = sh("blkverify", "create", "-f", "qcow2", "-o", "cluster_size=4k,compat=1.1",
              "-b", "base.qcow2", "-F", "qcow2", "top.qcow2", cwd=tmp_path)  # fmt: skip
    assert "Formatting" in proc.stdout
    info = json.loads(sh("qemu-img", "info", "--output=json", tmp_path / "top.qcow2").stdout)
    assert info["virtual-size"] == 3 * MiB
    assert info["backing-filename"] == "base.qcow2"
    assert info["backing-filename-format"] == "qcow2"
    assert info["cluster-size"] == 4096
    with bv.open(tmp_path / "top.qcow2", read_only=False) as image:
        image.write(100, b"\x62" * 100)
        assert image.read(0, 300) == b"\x61" * 100 + b"\x62" * 100 + b"\x61" * 100
    check_clean(tmp_path / "top.qcow2", "backing")
    proc = sh("blkverify", "create", "-f", "raw", str(tmp_path / "r.img"), "1.5M")
    assert (tmp_path / "r.img").stat().st_size == 1536 * KiB


SIZES = ["1.5M", "0x100000", "2m", "1536K", "1.5k", "+64k", " 64k", "010k", "0x200"]
BAD_SIZES = ["12Q", "1.5", "1k ", "1e3", "0x1.8k", "0x18M", "1kiB", "."]


def test_create_reads_sizes_as_qemu_img_does(tmp_path: Path) -> None:
    """One size syntax, QEMU's: qemu-img create is the oracle for what a SIZE means."""
    for n, size in enumerate(SIZES + BAD_SIZES):
        theirs, ours = tmp_path / f"q{n}.img", tmp_path / f"o{n}.img"
        q = sh("qemu-img", "create", "-q", "-f", "raw", theirs, size, check=False)
        o = sh("blkverify", "create", "-f", "raw", ours, size, check=False)
        assert (q.returncode == 0) == (size in SIZES), (size, q.stderr)
        assert (o.returncode == 0) == (size in SIZES), (size, o.stderr)
        if size in SIZES:
            assert ours.stat().st_size == theirs.stat().st_size, size
            assert bv.parse_size(size) == theirs.stat().st_size, size
        else:
            assert o.stderr.startswith("blkverify: error: invalid size"), o.stderr
            with pytest.raises(ValueError, match="invalid size"):
                bv.parse_size(size)
    with pytest.raises(OverflowError):
        bv.parse_size("8E")
    with pytest.raises(OverflowError):
        bv.parse_size("-1")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["x.qcow2", "12Q"], "invalid size"),
        (["x.qcow2", "1000"], "multiple of 512"),
        (["-o", "cluster_size=1000", "x.qcow2", "1M"], "cluster_size"),
        (["-o", "bogus=1", "x.qcow2", "1M"], "unknown option"),
        (["x.qcow2"], "size is required"),
    ],
)
def test_create_cli_errors(tmp_path: Path, args, message) -> None:
    proc = sh("blkverify", "create", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("blkverify: error:") and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
