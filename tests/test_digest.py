"""`blkverify digest` and block digests files, against independent references.

The digest is blkhash 0.11's construction. Two oracles check it: ``hashlib`` over the
bytes of ``qemu-img convert -O raw`` (the construction written out in Python, below),
and the real ``blksum``, built from its source once per session. A block digests file
must find every corrupted block and only those: bytes are flipped in data, compressed
and backing clusters, and the findings are compared with the block of the flipped
guest offset.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import blake3
import blkverify_rs as bv
import pytest
from conftest import (
    ZOO_NAMES,
    KiB,
    MiB,
    compressed_clusters,
    copy_entry,
    flip_byte,
    qemu_img,
    qemu_io,
    qemu_map,
    run_cli,
)
from test_nbd import Nbdkit, QemuNbd

BLOCK = 64 * KiB
ROOT = Path(__file__).resolve().parent.parent
HASHES = {"sha256": hashlib.sha256, "blake3": blake3.blake3}
# blksum cannot pick an internal snapshot: these are compared with hashlib only.
BLKSUM_NAMES = [n for n in ZOO_NAMES if n not in ("snapshot_by_name", "snapshot_by_id")]


def block_digests(data: bytes, algorithm: str = "sha256") -> list[bytes]:
    h = HASHES[algorithm]
    return [h(data[i : i + BLOCK]).digest() for i in range(0, len(data), BLOCK)]


def reference_digest(data: bytes, algorithm: str = "sha256") -> str:
    """blkhash 0.11: H(H(b1) || ... || H(bN) || le64(size)), 64 KiB blocks."""
    outer = HASHES[algorithm]()
    for d in block_digests(data, algorithm):
        outer.update(d)
    outer.update(struct.pack("<Q", len(data)))
    return outer.hexdigest()


@pytest.fixture(scope="session")
def blksum(request: pytest.FixtureRequest) -> Path:
    """The real blksum (blkhash 0.11), built from source into pytest's cache once."""
    cache = request.config.cache.mkdir("blksum")
    build = ROOT / "scripts" / "build-blksum.sh"
    proc = subprocess.run(["sh", str(build), str(cache)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return Path(proc.stdout.strip().splitlines()[-1])


def run_blksum(blksum: Path, image: Path | str, *args: str) -> str:
    """blksum's digest of ``image`` (a path, run from its directory as QEMU resolves
    relative data file names against the current one, or an NBD URI)."""
    proc = subprocess.run(
        [str(blksum), *args, str(image)],
        capture_output=True,
        text=True,
        cwd=image.parent if isinstance(image, Path) else None,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()[0]


def snapshot_args(entry) -> list[str]:
    return [] if entry.snapshot is None else ["--snapshot", entry.snapshot]


# ---------------------------------------------------------------------------------------------
# the digest against hashlib and blksum
# ---------------------------------------------------------------------------------------------


def test_every_zoo_image_digest_equals_hashlib(zoo_image) -> None:
    e = zoo_image
    data = e.expected.read_bytes()
    d = bv.digest(e.path, snapshot=e.snapshot)
    assert isinstance(d, bv.Digest)
    assert d.hexdigest == reference_digest(data)
    assert (d.algorithm, d.block_size, d.size) == ("sha256", BLOCK, e.size)


@pytest.mark.parametrize("name", ["raw_sparse", "qcow2_zstd_c2m", "chain_3level", "qcow2_extl2"])
def test_blake3_digest_equals_the_blake3_package(zoo, name: str) -> None:
    e = zoo[name]
    d = bv.digest(e.path, algorithm="blake3")
    assert d.hexdigest == reference_digest(e.expected.read_bytes(), "blake3")
    assert d.algorithm == "blake3"


@pytest.mark.parametrize("name", BLKSUM_NAMES)
def test_blksum_prints_the_same_digest(zoo, blksum: Path, name: str) -> None:
    e = zoo[name]
    proc = run_cli("digest", e.path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{run_blksum(blksum, e.path, '-c')}  {e.path}\n"


SIZES = [1, 4095, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5, 5 * MiB + 12345]


@pytest.mark.parametrize("size", SIZES)
def test_sizes_not_a_multiple_of_the_block_raw_and_qcow2(
    tmp_path: Path, blksum: Path, size: int
) -> None:
    raw = tmp_path / "odd.raw"
    qemu_img("create", "-f", "raw", raw, size)
    writes = [f"write -P 0x5a 0 {min(size, 3000)}", f"write -P 0x11 {size - 1} 1"]
    if size > 2 * BLOCK:
        writes.append(f"write -P 0x33 {BLOCK + 17} 999")  # block 1 has data, the rest holes
    qemu_io(raw, *writes, fmt="raw")
    qcow2 = tmp_path / "odd.qcow2"
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, qcow2)
    expected = reference_digest(raw.read_bytes())
    for image in (raw, qcow2):
        assert bv.digest(image).hexdigest == expected
        assert run_blksum(blksum, image) == expected


def test_holes_and_zero_clusters_are_not_read(tmp_path: Path, blksum: Path) -> None:
    """A 1 TiB qcow2 with a few clusters of data: hashing it reads only those."""
    image = tmp_path / "huge.qcow2"
    qemu_img("create", "-f", "qcow2", image, "1T")
    qemu_io(image, "write -P 0x61 0 64k", "write -P 0x62 700G 1M", "write -z 900G 64M")
    d = bv.digest(image)
    assert d.size == 1 << 40
    assert d.bytes_read <= 2 * MiB
    assert d.hexdigest == run_blksum(blksum, image)


# ---------------------------------------------------------------------------------------------
# NBD exports
# ---------------------------------------------------------------------------------------------


def test_nbd_export_digest_skips_zero_ranges(zoo, tmp_path: Path, blksum: Path) -> None:
    e = zoo["qcow2_zero_plain"]
    # Blocks are read whole: those that hold any byte not mapped as zeros.
    data_blocks = {
        b
        for x in qemu_map(e.path)
        if not x["zero"]
        for b in range(x["start"] // BLOCK, (x["start"] + x["length"] - 1) // BLOCK + 1)
    }
    assert len(data_blocks) * BLOCK < e.size
    server = QemuNbd(e.path, "qcow2", tmp_path / "q.sock")
    try:
        d = bv.digest(server.uri)
        assert d.hexdigest == reference_digest(e.expected.read_bytes())
        assert d.bytes_read <= len(data_blocks) * BLOCK
        assert run_blksum(blksum, server.uri) == d.hexdigest
    finally:
        server.stop()


def extents_server(tmp_path: Path, image: Path, kind: str) -> Nbdkit:
    """An nbdkit export of ``image`` whose block status calls everything ``kind``."""
    return Nbdkit(
        tmp_path / f"{kind or 'data'}.sock",
        "eval",
        f"get_size=stat -L -c %s {image}",
        f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        "can_extents=exit 0",
        f"extents=echo 0 $(stat -L -c %s {image}) {kind}",
    )


def test_nbd_holes_without_the_zero_flag_are_read(tmp_path: Path) -> None:
    """NBD_STATE_HOLE alone does not promise zeros: such ranges are read and hashed;
    NBD_STATE_ZERO is trusted (the data behind it is never read)."""
    image = tmp_path / "data.raw"
    data = random.Random(5).randbytes(3 * BLOCK + 100)
    image.write_bytes(data)
    server = extents_server(tmp_path, image, "hole")
    try:
        d = bv.digest(server.uri)
        assert d.hexdigest == reference_digest(data)
        assert d.bytes_read == len(data)
    finally:
        server.stop()
    server = extents_server(tmp_path, image, "hole,zero")
    try:
        d = bv.digest(server.uri)
        assert d.hexdigest == reference_digest(bytes(len(data)))
        assert d.bytes_read == 0
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def test_cli_several_images_one_failing_the_others_go_on(zoo, tmp_path: Path) -> None:
    a, b = zoo["qcow2_c64k"], zoo["raw"]
    missing = tmp_path / "missing.qcow2"
    proc = run_cli("digest", a.path, missing, b.path)
    assert proc.returncode == 2
    assert proc.stdout.splitlines() == [
        f"{reference_digest(a.expected.read_bytes())}  {a.path}",
        f"{reference_digest(b.expected.read_bytes())}  {b.path}",
    ]
    [err] = proc.stderr.splitlines()
    assert err.startswith(f"blkverify: error: {missing}: ")
    assert "Traceback" not in proc.stderr


def test_cli_json_lines(zoo, tmp_path: Path) -> None:
    e = zoo["qcow2_zlib"]
    missing = tmp_path / "nope.raw"
    proc = run_cli("digest", "--json", "-d", "blake3", e.path, missing)
    assert proc.returncode == 2
    good, bad = (json.loads(line) for line in proc.stdout.splitlines())
    assert set(good) == {"image", "digest", "algorithm", "block_size", "size", "elapsed_s"}
    assert good["image"] == str(e.path)
    assert good["digest"] == reference_digest(e.expected.read_bytes(), "blake3")
    assert (good["algorithm"], good["block_size"], good["size"]) == ("blake3", BLOCK, e.size)
    assert set(bad) == {"image", "error"} and bad["image"] == str(missing)
    assert proc.stderr == f"blkverify: error: {bad['error']}\n"


def test_cli_open_options_apply(zoo) -> None:
    e = zoo["snapshot_by_name"]
    proc = run_cli("digest", "--snapshot", e.snapshot, e.path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == reference_digest(e.expected.read_bytes())
    chain = zoo["chain_3level"]
    proc = run_cli("digest", "--no-backing", "-f", "qcow2", chain.path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] != reference_digest(chain.expected.read_bytes())
    proc = run_cli("digest", "--max-backing-depth", "1", chain.path)
    assert proc.returncode == 2
    assert "blkverify: error:" in proc.stderr


def test_cli_blocks_takes_exactly_one_image(zoo, tmp_path: Path) -> None:
    e = zoo["raw"]
    proc = run_cli("digest", "--blocks", tmp_path / "x.digests", e.path, e.path)
    assert proc.returncode == 2
    assert "--blocks" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.digests").exists()


def test_progress_callback_reaches_the_total(zoo) -> None:
    e = zoo["qcow2_c4k"]
    seen: list[tuple[int, int]] = []
    bv.digest(e.path, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[0] == (0, e.size)
    assert seen[-1] == (e.size, e.size)


# ---------------------------------------------------------------------------------------------
# block digests files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["raw_sparse", "qcow2_c512", "qcow2_zstd_c2m", "chain_3level"])
def test_block_digests_file_holds_every_block(zoo, tmp_path: Path, name: str) -> None:
    e = zoo[name]
    path = tmp_path / f"{name}.digests"
    proc = run_cli("digest", "--blocks", path, e.path)
    assert proc.returncode == 0, proc.stderr
    data = e.expected.read_bytes()
    loaded = bv.BlockDigests.load(path)
    assert (loaded.size, loaded.block_size, loaded.algorithm) == (e.size, BLOCK, "sha256")
    assert loaded.hexdigest == reference_digest(data) == proc.stdout.split()[0]
    for i, d in enumerate(block_digests(data)):
        assert loaded.block(i) == d, i
    with pytest.raises((IndexError, ValueError)):
        loaded.block(len(data) // BLOCK + 1)


def test_block_digests_file_size_follows_the_data(tmp_path: Path) -> None:
    sparse = tmp_path / "tera.qcow2"
    qemu_img("create", "-f", "qcow2", sparse, "1T")
    # 1 GiB of data would take long to write in a test; 8 MiB in 128 places scales the
    # same way (32 bytes per data block, 16 per run).
    qemu_io(sparse, *(f"write -P {i % 250 + 1} {i * 8}G 64k" for i in range(128)))
    out = tmp_path / "tera.digests"
    assert bv.digest(sparse, blocks=out).size == 1 << 40
    assert out.stat().st_size < 128 * (32 + 16) + 4 * KiB

    full = tmp_path / "full.raw"
    full.write_bytes(random.Random(2).randbytes(4 * MiB))
    out = tmp_path / "full.digests"
    bv.digest(full, blocks=out)
    assert out.stat().st_size <= 64 * 32 + 512


def damaged_variants(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 1
    return {
        "foreign": b"#!/bin/sh\necho not a digests file\n" * 10,
        "truncated": good[: len(good) - 7],
        "damaged": bytes(flipped),
        "empty": b"",
    }


def test_damaged_truncated_or_foreign_files_give_one_clear_error(zoo, tmp_path: Path) -> None:
    e = zoo["qcow2_c64k"]
    good = tmp_path / "good.digests"
    bv.digest(e.path, blocks=good)
    for kind, content in damaged_variants(good.read_bytes()).items():
        bad = tmp_path / f"{kind}.digests"
        bad.write_bytes(content)
        with pytest.raises(bv.FormatError) as info:
            bv.BlockDigests.load(bad)
        assert str(bad) in str(info.value), kind
        proc = run_cli("verify", "-f", "digests", bad, e.path)
        assert proc.returncode == 2, (kind, proc.stdout, proc.stderr)
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"blkverify: error: {bad}: "), line


# ---------------------------------------------------------------------------------------------
# verifying against a block digests file
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(zoo, tmp_path_factory) -> dict:
    """name -> block digests file of the pristine zoo image."""
    d = tmp_path_factory.mktemp("refs")
    out = {}
    for name in ("raw", "qcow2_c64k", "qcow2_c4k", "qcow2_zstd", "qcow2_zstd_c2m", "chain_3level"):
        out[name] = d / f"{name}.digests"
        bv.digest(zoo[name].path, blocks=out[name])
    return out


@pytest.mark.parametrize("name", ["raw", "qcow2_c64k", "qcow2_zstd_c2m", "chain_3level"])
def test_an_unchanged_copy_verifies_identical(zoo, references, name: str) -> None:
    e = zoo[name]
    rep = bv.verify(references[name], e.path)
    assert rep.identical and rep.mismatches == []
    proc = run_cli("verify", references[name], e.path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)


def flip_guest_byte(entry, rng: random.Random, depth: int = 0) -> int:
    """Flip one byte of a data cluster stored at backing ``depth``; return its guest offset."""
    extents = [
        x
        for x in qemu_map(entry.path)
        if x["data"] and not x.get("compressed") and x["depth"] == depth and "offset" in x
    ]
    x = rng.choice(extents)
    k = rng.randrange(x["length"])
    host_file = entry.path if depth == 0 else entry.chain[depth - 1]
    flip_byte(host_file, x["offset"] + k)
    return x["start"] + k


@pytest.mark.parametrize(
    ("name", "depth"), [("raw", 0), ("qcow2_c64k", 0), ("qcow2_c4k", 0), ("chain_3level", 2)]
)
def test_every_flipped_block_is_found_and_only_those(
    zoo, references, tmp_path: Path, name: str, depth: int
) -> None:
    e = copy_entry(zoo[name], tmp_path)
    rng = random.Random(f"digests-{name}")
    flipped = {flip_guest_byte(e, rng, depth) for _ in range(3)}
    blocks = sorted({g // BLOCK for g in flipped})
    rep = bv.verify(references[name], e.path, all=True)
    assert not rep.identical
    found = []
    for m in rep.mismatches:
        assert m.offset == m.block * BLOCK and m.error is None
        found += range(m.block, m.block + m.length // BLOCK + (m.length % BLOCK > 0))
    assert found == blocks

    proc = run_cli("verify", "--all", "--json", references[name], e.path)
    assert proc.returncode == 1, proc.stderr
    data = json.loads(proc.stdout)
    assert data["raw_format"] == "digests" and data["identical"] is False
    for mm in data["mismatches"]:
        assert {"block", "offset", "length"} <= set(mm) and "first_byte" not in mm
        if e.fmt == "qcow2":  # where the block's first byte lives
            assert mm["mapping"]["kind"] in ("data", "backing", "zero", "unallocated")
            assert mm["mapping"]["tables"][-1]["table"] == "L2"
    first = blocks[0]
    proc = run_cli("verify", references[name], e.path)
    assert proc.returncode == 1
    length = min(BLOCK, e.size - first * BLOCK)
    assert (
        f"blkverify: contents mismatch in block {first} (offset {first * BLOCK:#x}, {length} bytes)"
        in proc.stdout
    )


@pytest.mark.parametrize("name", ["qcow2_zstd", "qcow2_zstd_c2m"])
def test_a_compressed_cluster_that_does_not_decompress_is_a_finding(
    zoo, references, tmp_path: Path, name: str
) -> None:
    e = copy_entry(zoo[name], tmp_path)
    info = json.loads(qemu_img("info", "--output=json", e.path).stdout)
    cluster_size = info["cluster-size"]
    guest, host, length = compressed_clusters(e.path)[1]
    with open(e.path, "r+b") as f:
        f.seek(host)
        f.write(b"\xff" * min(length, 64))  # not a zstd frame any more
    rep = bv.verify(references[name], e.path, all=True)
    [m] = rep.mismatches
    assert m.error, m
    first, end = guest // BLOCK, (guest + cluster_size + BLOCK - 1) // BLOCK
    assert (m.block, m.offset, m.length) == (first, first * BLOCK, (end - first) * BLOCK)
    proc = run_cli("verify", references[name], e.path)
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    where = f"block {first}" if end == first + 1 else f"blocks {first}-{end - 1}"
    assert f"blkverify: read error in {where} (offset {first * BLOCK:#x}" in proc.stdout


def test_a_flipped_byte_in_a_compressed_cluster_names_its_block(
    zoo, references, tmp_path: Path
) -> None:
    e = copy_entry(zoo["qcow2_zstd"], tmp_path)
    clusters = compressed_clusters(e.path)
    guest, host, _ = clusters[2]
    # Streams are packed: this one ends where the next one starts.
    length = min(h for _, h, _ in clusters if h > host) - host
    # The last bytes of a zstd frame are literals more often than not: find a flip that
    # still decompresses (a contents finding) rather than guess.
    for k in range(length - 1, 0, -1):
        flip_byte(e.path, host + k)
        rep = bv.verify(references["qcow2_zstd"], e.path, all=True)
        if rep.mismatches and rep.mismatches[0].error is None:
            break
        flip_byte(e.path, host + k)
    [m] = rep.mismatches
    assert m.block == guest // BLOCK and m.length == BLOCK


def test_sizes_that_differ_are_reported_as_verify_reports_them(zoo, references, tmp_path):
    e = zoo["raw"]
    longer = tmp_path / "longer.raw"
    shutil.copy(e.path, longer)
    with open(longer, "r+b") as f:
        f.truncate(e.size + 3 * BLOCK)
    rep = bv.verify(references["raw"], longer)
    assert rep.identical
    [warning] = rep.warnings
    assert "sizes differ" in warning
    proc = run_cli("verify", "--strict", references["raw"], longer)
    assert proc.returncode == 1
    with open(longer, "r+b") as f:
        f.seek(e.size + BLOCK + 5)
        f.write(b"x")
    proc = run_cli("verify", "--json", references["raw"], longer)
    data = json.loads(proc.stdout)
    assert proc.returncode == 1
    assert [m["block"] for m in data["mismatches"]] == [e.size // BLOCK + 1]


def test_batch_pairs_may_have_a_digests_reference(zoo, references, tmp_path: Path) -> None:
    good, bad = zoo["qcow2_c64k"], copy_entry(zoo["qcow2_c64k"], tmp_path)
    guest = flip_guest_byte(bad, random.Random(9))
    manifest = tmp_path / "pairs.txt"
    manifest.write_text(
        f"{references['qcow2_c64k']} {good.path}\n{references['qcow2_c64k']} {bad.path}\n"
    )
    proc = run_cli("batch", "--json", manifest)
    assert proc.returncode == 1, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert first["identical"] is True
    assert second["mismatches"][0]["block"] == guest // BLOCK
    results = bv.verify_many([(references["qcow2_c64k"], good.path)])
    assert results[0].identical


def test_the_cli_refuses_a_digests_file_as_the_test_side(zoo, references) -> None:
    proc = run_cli("verify", zoo["raw"].path, references["raw"])
    assert proc.returncode == 2
    assert "blkverify: error:" in proc.stderr
