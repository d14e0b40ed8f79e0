"""Differential tests: random image options and random request scripts, run
through QEMU and through us, must agree.

- Reads: an image made and written by qemu-io (any cluster size, v2/v3, extended
  L2, lazy refcounts, refcount width, compression type, backing file, snapshot)
  reads exactly as ``qemu-img convert -O raw`` says, and verify finds it identical.
- Writes: the same write/zero/discard script through ``qemu-io`` and through
  ``blkverify io`` on copies of one image gives the same output, the same
  contents (``qemu-img compare``), a clean ``qemu-img check`` and the same
  allocation map (a few v2 cases are a known, tracked gap: ``V2_MAP_GAPS``).

Seeded, so a failure names the case that reproduces it. CI runs a few cases;
``BLKVERIFY_DIFF_CASES=200`` runs many.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import blkverify_rs as bv
import pytest

CASES = int(os.environ.get("BLKVERIFY_DIFF_CASES", "6"))

# The qcow2 writer's known gap (issue 3's closing note): on v2 (compat=0.10)
# images some sequences of partial zero-writes leave a different, equally valid
# allocation map than QEMU's; output, contents and qemu-img check still agree.
# These are the write cases, of the first 200, that show it (QEMU 10.0).
V2_MAP_GAPS = {19, 136}
V2_MAP_GAP = "known gap: qcow2 v2 partial zero-writes leave another valid allocation map"
CLUSTERS = {"512": 512, "4k": 4096, "16k": 16384, "64k": 65536, "256k": 262144, "2M": 2 << 20}


def sh(*args) -> None:
    subprocess.run([str(a) for a in args], check=True, capture_output=True)


def random_options(rng: random.Random) -> tuple[str, list[str]]:
    cs = rng.choice(list(CLUSTERS))
    compat = rng.choice(["0.10", "1.1", "1.1"])
    opts = [f"cluster_size={cs}", f"compat={compat}"]
    if compat == "1.1":
        if rng.random() < 0.4 and cs not in ("512", "4k"):
            opts.append("extended_l2=on")
        if rng.random() < 0.3:
            opts.append("lazy_refcounts=on")
        if rng.random() < 0.3:
            opts.append(f"compression_type={rng.choice(['zlib', 'zstd'])}")
        opts.append(f"refcount_bits={rng.choice([1, 2, 4, 8, 16, 32, 64])}")
    return cs, opts


def make_image(rng: random.Random, d: Path, opts: list[str], cs: str) -> tuple[Path, int]:
    size = rng.choice([1, 3, 8]) * (1 << 20) + rng.choice([0, 512, 4096])
    image = d / "t.qcow2"
    backing_args: list[str] = []
    if rng.random() < 0.4:
        base = d / "b.qcow2"
        base_size = size + rng.choice([-(1 << 19), 0, 1 << 19])
        sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", base, base_size)
        sh("qemu-io", "-c", f"write -P 0x33 0 {base_size}", base)
        backing_args = ["-b", "b.qcow2", "-F", "qcow2"]
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-o", ",".join(opts), *backing_args, image, size)
    if rng.random() < 0.5:
        sh("qemu-io", "-c", f"write -P 0x44 0 {size // 2}", image)
    if rng.random() < 0.25 and "refcount_bits=1" not in opts:
        # (a refcount width of 1 cannot count a snapshot's second reference)
        sh("qemu-img", "snapshot", "-c", "s1", image)
    return image, size


def random_script(rng: random.Random, size: int, cs: str, compressed: bool) -> list[str]:
    cmds = []
    for _ in range(rng.randint(5, 50)):
        off = rng.randrange(0, size - 1)
        ln = rng.randint(1, min(300000, size - off))
        k = rng.random()
        if k < 0.5:
            cmds.append(f"write -P {rng.randrange(256)} {off} {ln}")
        elif k < 0.65:
            cmds.append(f"write -z {off} {ln}")
        elif k < 0.75:
            cmds.append(f"write -z -u {off} {ln}")
        elif k < 0.9 or not compressed:
            cmds.append(f"discard {off} {ln}")
        elif size // CLUSTERS[cs] > 0:
            at = rng.randrange(0, size // CLUSTERS[cs]) * CLUSTERS[cs]
            cmds.append(f"write -c -P {rng.randrange(256)} {at} {CLUSTERS[cs]}")
    return cmds


def qemu_io(image: Path, cmds: list[str]) -> subprocess.CompletedProcess:
    args = [a for c in cmds for a in ("-c", c)]
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", *args, str(image)], capture_output=True, text=True
    )


# qemu-io's result line for one command: done, or failed with an errno's text.
RESULT = re.compile(r"(wrote|discard) \d+/\d+ bytes at offset \d+$|(\w+) failed: (.+)$")


def qemu_io_setup(image: Path, cmds: list[str]) -> None:
    """Write ``image`` with qemu-io, checking that every command did what the
    script says. QEMU may refuse two things only: a compressed write to a
    cluster already allocated (it writes compressed clusters only into
    unallocated ones: EIO), and, once it has marked the image corrupt, every
    later request (ENOMEDIUM). Any other failure, or an image qemu-io could not
    open, means the image is not the one the script describes."""
    proc = qemu_io(image, cmds)
    said = proc.stdout + proc.stderr
    results = [m for m in map(RESULT.match, proc.stdout.splitlines()) if m]
    assert len(results) == len(cmds), f"qemu-io ran {len(results)} of {len(cmds)}: {said}"
    corrupt = "Marking image as corrupt" in proc.stderr
    assert corrupt or not proc.stderr, said
    failed = 0
    for cmd, result in zip(cmds, results, strict=True):
        if result.group(3) is None:
            continue
        failed += 1
        refused = cmd.startswith("write -c ") and result.group(3) == "Input/output error"
        after_corrupt = corrupt and result.group(3) == "No medium found"
        assert refused or after_corrupt, f"{cmd}: {result.group(0)}"
    assert proc.returncode == (1 if failed else 0), said


@pytest.mark.parametrize("case", range(CASES))
def test_reads_agree_with_qemu_img_convert(tmp_path: Path, case: int) -> None:
    rng = random.Random(1000 + case)
    cs, opts = random_options(rng)
    image, size = make_image(rng, tmp_path, opts, cs)
    qemu_io_setup(image, random_script(rng, size, cs, compressed=True))
    expected = tmp_path / "expected.raw"
    converted = subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image), str(expected)], capture_output=True
    )
    what = f"case {case}: {opts}"
    if converted.returncode != 0:
        # QEMU cannot read what qemu-io wrote (it happens with compressed writes
        # over shared clusters): we must refuse too, never return bytes.
        with pytest.raises(bv.Error), bv.open(image) as img:
            img.read(0, img.size)
        return
    with bv.open(image) as img:
        assert img.read(0, img.size) == expected.read_bytes(), what
    assert bv.verify(expected, image).identical, what


@pytest.mark.parametrize("case", range(CASES))
def test_writes_agree_with_qemu_io(tmp_path: Path, case: int) -> None:
    rng = random.Random(2000 + case)
    cs, opts = random_options(rng)
    theirs, size = make_image(rng, tmp_path, opts, cs)
    ours = tmp_path / "o.qcow2"
    shutil.copyfile(theirs, ours)
    cmds = random_script(rng, size, cs, compressed=False)
    what = f"case {case}: {opts}; script: {cmds}"
    t = qemu_io(theirs, cmds)
    # The script has no compressed writes: QEMU runs every command of it.
    assert (t.returncode, t.stderr) == (0, ""), what + t.stdout + t.stderr
    args = [a for c in cmds for a in ("-c", c)]
    o = subprocess.run(
        [sys.executable, "-m", "blkverify_rs", "io", "-f", "qcow2", *args, str(ours)],
        capture_output=True,
        text=True,
    )

    def norm(s: str) -> str:
        return re.sub(r"\d+ ops; [^\n]*", "", s)

    assert (norm(o.stdout), o.stderr, o.returncode) == (norm(t.stdout), t.stderr, t.returncode)
    compare = subprocess.run(
        ["qemu-img", "compare", str(theirs), str(ours)], capture_output=True, text=True
    )
    assert compare.returncode == 0, what + compare.stdout
    check = subprocess.run(["qemu-img", "check", str(ours)], capture_output=True, text=True)
    assert check.returncode == 0, what + check.stdout
    maps = [
        subprocess.run(["qemu-io", "-c", "map", str(p)], capture_output=True, text=True).stdout
        for p in (theirs, ours)
    ]
    if case in V2_MAP_GAPS:
        # Strict: once the writer matches QEMU here, the case must leave the list.
        assert maps[0] != maps[1], f"case {case} now maps as QEMU does: drop it from V2_MAP_GAPS"
        pytest.xfail(V2_MAP_GAP)
    assert maps[0] == maps[1], what
