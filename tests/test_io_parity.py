"""`blkverify io` against the installed `qemu-io`: the same command scripts through both
tools, on raw and qcow2 images, compared byte for byte (stdout, stderr, exit status, and
the images afterwards). The only normalisation is the timing figures (elapsed time and
rates) on the statistics line, which differ from run to run in both tools."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys

import pytest
from conftest import MiB, qemu_img, qemu_io, run

# "<size>, <n> ops; <time> (<rate>/sec and <rate> ops/sec)"
TIMING = re.compile(r"^(.+), (\d+) ops; .+ \(.+/sec and .+ ops/sec\)$")
# -C: "<bytes>,<ops>,<time>,<rate>,<rate>"
TIMING_C = re.compile(r"^(\d+),(\d+),\d+:\d\d:\d\d\.\d\d,[^,]+,[^,]+$")


# The QEMU whose qemu-io output `blkverify io` follows (see io_cmds.py).
FOLLOWED_QEMU = "10.0"


@functools.cache
def qemu_io_version() -> str:
    """The installed qemu-io's version, ``10.0.2`` say."""
    out = run(["qemu-io", "--version"]).stdout
    m = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    return m.group(1) if m else out.strip()


def version_note() -> str:
    """Said with every failed comparison: whether the installed qemu-io is the one
    `blkverify io` follows, so that a different QEMU is named as the likely cause."""
    version = qemu_io_version()
    if version == FOLLOWED_QEMU or version.startswith(FOLLOWED_QEMU + "."):
        return f" [qemu-io {version}, the version blkverify io follows]"
    return (
        f" [the installed qemu-io is version {version}, not QEMU {FOLLOWED_QEMU}, whose "
        "output blkverify io follows: the difference may come from the QEMU version]"
    )


def normalise(text: str) -> str:
    out = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\n")
        m = TIMING.match(body)
        if m:
            body = f"{m.group(1)}, {m.group(2)} ops; TIME (RATE/sec and RATE ops/sec)"
        m = TIMING_C.match(body)
        if m:
            body = f"{m.group(1)},{m.group(2)},TIME,RATE,RATE"
        out.append(body + line[len(line.rstrip("\n")) :])
    return "".join(out)


def io_argv(tool: list, spec, fmt: str | None, cmds: list, read_only: bool) -> list:
    argv = list(tool)
    if fmt:
        argv += ["-f", fmt]
    if read_only:
        argv.append("-r")
    for c in cmds:
        argv += ["-c", c]
    return [*argv, str(spec)]


def run_qemu_io(spec, fmt, cmds, read_only=False) -> subprocess.CompletedProcess:
    return run(io_argv(["qemu-io"], spec, fmt, cmds, read_only), check=False)


def run_ours(spec, fmt, cmds, read_only=False, stdin: str | None = None):
    argv = io_argv([sys.executable, "-m", "blkverify_rs", "io"], spec, fmt, cmds, read_only)
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)


def assert_same(ours, theirs, what: str) -> None:
    what += version_note()
    assert normalise(ours.stdout) == normalise(theirs.stdout), f"stdout differs: {what}"
    assert ours.stderr == theirs.stderr, f"stderr differs: {what}"
    assert ours.returncode == theirs.returncode, f"exit status differs: {what}"


# ----------------------------------------------------------------------------------------
# scripts
# ----------------------------------------------------------------------------------------

# Reads, queries and bad arguments: run on every image, read-only.
READ_SCRIPT = [
    "read -v 0 64",
    "read 0 512",
    "r -q 4k 4k",
    "read -C 0 1k",
    "read -v 70000 100",
    "read -P 0xab 0 64k",
    "read -P 0xab 0 1k",
    "read -P 0xcd -s 1000 -l 24 261120 5000",
    "read -P 0xcd 263144 5000",
    "read -P 0x42 -s 4 1048472 8",
    "readv 0 512 1k 3",
    "readv -v 1048560 16 16",
    "readv -P 0xab 0 64k 64k",
    "readv -q -C 4k 4k",
    "read 0 .5k",
    "read 0 1.5k",
    "read 0 0x10",
    "read 0 010",
    "read 0 1.k",
    "read 0 +1",
    "read 1M 0",
    "length",
    "l",
    "alloc 0",
    "alloc 0 1M",
    "alloc 1 1",
    "a 60k 12k",
    "alloc 0 0",
    "alloc 3M 4M",
    "alloc 1G",
    "map",
    "flush",
    "help read",
    "help readv",
    "help write",
    "help writev",
    "help discard",
    "help alloc",
    "help map",
    "help flush",
    "help length",
    "help info",
    "help help",
    # bad arguments
    "read",
    "read 0",
    "r",
    "read x 1",
    "read 0 1x",
    "read 0 1kB",
    "read 0 1.5",
    "read 0 .5",
    "read 0 1e2",
    "read 0 0x1k",
    "read 0 3G",
    "read 0 1e",
    "read 0 8E",
    "read 0 99999999999999999999",
    "read -- 0 -1",
    "read --foo 0 1",
    "read --P 0 1",
    "read -: 0 1",
    "read 0 1 -q -x",
    "read 0 -1",
    "read -z 0 1",
    "read -P 300 0 1",
    "read -P 0x1g 0 1",
    "read -P 1",
    "read -P 1 -s",
    "read -s 1 0 1",
    "read -P 1 -s 20 -l 10 0 16",
    "read 1E 1",
    "read 100M 512",
    "readv 0 0x",
    "readv 0 3G",
    "readv 0 1G 1G 1G",
    "readv 100M 512",
    "alloc 0x 1",
    "alloc",
    "length 1",
    "map 1",
    "help foo",
    "bogus",
    "write 0 1",
    "writev 0 512",
    "discard 0 512",
    "write",
]

# Writes on a writable copy, then reads of what they did.
WRITE_SCRIPT = [
    "write -P 0x41 0 3",
    "write 512 1k",
    "w -q -P 7 200k 1",
    "write -z 8k 4k",
    "write -z -u 12k 4k",
    "write -C -P 0x55 20000 10",
    "write -f -P 9 300k 4k",
    "writev -P 0x11 100 3 5",
    "writev 1k 512 512",
    "writev -q -C 2M 1",
    "discard 64k 4k",
    "discard 1 1",
    "discard -q 128k 64k",
    "discard -C 3M 512",
    "write 0 0",
    "discard 1M 0",
    "flush",
    "read -v 0 48",
    "read -P 0x41 0 3",
    "read -P 0xcd 512 1k",
    "read -P 0 8k 8k",
    "read -v 96 16",
    "read -P 9 300k 4k",
    "alloc 0 1M",
    "map",
    # bad arguments and failures
    "write -u 0 1",
    "write -z -P 1 0 1",
    "write -P 300 0 1",
    "write -x 0 1",
    "write 0",
    "write 0 3G",
    "write 100M 1",
    "write -z 100M 512",
    "writev 100M 512",
    "writev 0 3G",
    "writev 0 1G 1G 1G",
    "writev 0 1x",
    "discard 100M 512",
    "discard 0 3G",
    "discard -x 0 1",
    "write -P 0x5a 4M-1 1",
]


@pytest.fixture(scope="module")
def images(zoo) -> dict:
    return {
        "raw": zoo["raw"],
        "raw_sparse": zoo["raw_sparse"],
        "qcow2_c4k": zoo["qcow2_c4k"],
        "qcow2_v2": zoo["qcow2_v2"],
        "qcow2_zero_alloc": zoo["qcow2_zero_alloc"],
        "qcow2_zlib": zoo["qcow2_zlib"],
        "qcow2_extl2": zoo["qcow2_extl2"],
        "qcow2_data_file": zoo["qcow2_data_file"],
        "chain_3level": zoo["chain_3level"],
    }


READ_IMAGES = [
    "raw",
    "raw_sparse",
    "qcow2_c4k",
    "qcow2_v2",
    "qcow2_zero_alloc",
    "qcow2_zlib",
    "qcow2_extl2",
    "qcow2_data_file",
    "chain_3level",
]


@pytest.mark.parametrize("name", READ_IMAGES)
def test_read_script_matches_qemu_io(images, name):
    img = images[name]
    theirs = run_qemu_io(img.path, img.fmt, READ_SCRIPT, read_only=True)
    ours = run_ours(img.path, img.fmt, READ_SCRIPT, read_only=True)
    assert theirs.returncode == 1  # the script holds failing commands on purpose
    assert_same(ours, theirs, name)


@pytest.mark.parametrize("name", ["qcow2_c4k", "qcow2_extl2", "qcow2_data_file", "qcow2_v2"])
def test_info_matches_qemu_io(images, name):
    img = images[name]
    theirs = run_qemu_io(img.path, img.fmt, ["info"], read_only=True)
    ours = run_ours(img.path, img.fmt, ["info"], read_only=True)
    assert "Format specific information:" in theirs.stdout
    assert_same(ours, theirs, name)


def test_info_raw_matches_qemu_io(images):
    img = images["raw"]
    assert_same(
        run_ours(img.path, "raw", ["info"], read_only=True),
        run_qemu_io(img.path, "raw", ["info"], read_only=True),
        "raw info",
    )


@pytest.mark.parametrize("name", ["raw", "raw_sparse"])
def test_write_script_matches_qemu_io(images, tmp_path, name):
    img = images[name]
    theirs_img = tmp_path / "theirs.raw"
    ours_img = tmp_path / "ours.raw"
    shutil.copyfile(img.path, theirs_img)
    shutil.copyfile(img.path, ours_img)
    theirs = run_qemu_io(theirs_img, "raw", WRITE_SCRIPT)
    ours = run_ours(ours_img, "raw", WRITE_SCRIPT)
    assert theirs.returncode == 1
    assert_same(ours, theirs, name)
    assert ours_img.read_bytes() == theirs_img.read_bytes()
    assert ours_img.read_bytes() != img.path.read_bytes()


def test_device_write_script_matches_qemu_io_on_the_plain_image(images, tmp_path):
    """Through blkverify:RAW:TEST every command prints what qemu-io prints for the plain
    image, and afterwards both sides hold what qemu-io wrote."""
    img = images["raw"]
    theirs_img = tmp_path / "theirs.raw"
    raw = tmp_path / "raw.img"
    test = tmp_path / "test.img"
    for p in (theirs_img, raw, test):
        shutil.copyfile(img.path, p)
    theirs = run_qemu_io(theirs_img, "raw", WRITE_SCRIPT + READ_SCRIPT[:30])
    ours = run_ours(f"blkverify:{raw}:{test}", "raw", WRITE_SCRIPT + READ_SCRIPT[:30])
    assert_same(ours, theirs, "device")
    assert raw.read_bytes() == theirs_img.read_bytes()
    assert test.read_bytes() == theirs_img.read_bytes()


def test_device_reads_a_qcow2_test_side_like_qemu_io(images, tmp_path):
    img = images["qcow2_zero_alloc"]
    raw = tmp_path / "ref.raw"
    shutil.copyfile(img.expected, raw)
    cmds = [c for c in READ_SCRIPT if not c.startswith(("write", "writev", "discard"))]
    theirs = run_qemu_io(img.path, "qcow2", cmds, read_only=True)
    ours = run_ours(f"blkverify:{raw}:{img.path}", "qcow2", cmds, read_only=True)
    assert_same(ours, theirs, "qcow2 device")


def test_read_only_refuses_writes_like_qemu_io(images, tmp_path):
    img = images["raw"]
    copy = tmp_path / "ro.raw"
    shutil.copyfile(img.path, copy)
    cmds = ["write 0 1", "write", "write -x 0 1", "writev 0 1", "discard 0 1", "flush"]
    cmds += ["read -P 0xab 0 1"]
    theirs = run_qemu_io(copy, "raw", cmds, read_only=True)
    ours = run_ours(copy, "raw", cmds, read_only=True)
    assert "Block node is read-only" in theirs.stderr
    assert_same(ours, theirs, "read-only")
    assert copy.read_bytes() == img.path.read_bytes()


def test_quit_stops_the_script_like_qemu_io(images):
    img = images["raw"]
    cmds = ["read -v 0 16", "quit", "read 0 1", "bogus"]
    theirs = run_qemu_io(img.path, "raw", cmds, read_only=True)
    ours = run_ours(img.path, "raw", cmds, read_only=True)
    assert theirs.returncode == 0
    assert_same(ours, theirs, "quit")


def test_stdin_commands_behave_as_c_commands(images):
    """Commands from a pipe give the output qemu-io gives for the same -c commands
    (with no prompt: the prompt is printed only when stdin is a terminal)."""
    img = images["qcow2_c4k"]
    cmds = ["read -v 0 32", "", "  length  ", "map", "read 0 1x", "alloc 0 1M"]
    theirs = run_qemu_io(img.path, "qcow2", [c for c in cmds if c.strip()], read_only=True)
    ours = run_ours(img.path, "qcow2", [], read_only=True, stdin="\n".join(cmds) + "\n")
    assert_same(ours, theirs, "stdin")


def test_help_lists_only_commands_qemu_io_lists_the_same_way(images):
    img = images["raw"]
    theirs = run_qemu_io(img.path, "raw", ["help"], read_only=True)
    ours = run_ours(img.path, "raw", ["help"], read_only=True)
    assert ours.returncode == theirs.returncode == 0
    qemu_lines = set(theirs.stdout.splitlines())
    ours_lines = ours.stdout.splitlines()
    # the command lines (all but the trailing hint) each appear verbatim in qemu-io's list
    body = [line for line in ours_lines if line and not line.startswith("Use 'help")]
    assert len(body) == 12
    assert all(line in qemu_lines for line in body), f"{set(body) - qemu_lines}{version_note()}"
    hint = "\nUse 'help commandname' for extended help.\n"
    assert ours.stdout.endswith(hint)
    assert theirs.stdout.endswith(hint), version_note()


def test_qcow2_map_after_qemu_writes_matches(tmp_path):
    """Allocation as qemu-io reports it, on an image shaped for it: data, zero clusters
    (plain and unmapped) and holes, with 64 KiB clusters."""
    p = tmp_path / "alloc.qcow2"
    qemu_img("create", "-f", "qcow2", p, 4 * MiB)
    qemu_io(
        p, "write -P 1 64k 4k", "write -z 256k 64k", "write -P 2 1000k 24k", "write -z -u 2M 1M"
    )
    cmds = ["map", "alloc 0 4M", "alloc 60k 12k", "alloc 256k 128k", "alloc 1000k 1M", "info"]
    assert_same(
        run_ours(p, "qcow2", cmds, read_only=True),
        run_qemu_io(p, "qcow2", cmds, read_only=True),
        "alloc",
    )


@pytest.mark.parametrize("name", ["qcow2_c4k", "qcow2_v2", "qcow2_extl2", "qcow2_zero_alloc"])
def test_write_script_on_qcow2_matches_qemu_io(images, tmp_path, name):
    """The same write script through qemu-io (QEMU's qcow2 driver) and through ours:
    the same output, images with the same contents, and ours passes qemu-img check."""
    img = images[name]
    theirs_img = tmp_path / "theirs.qcow2"
    ours_img = tmp_path / "ours.qcow2"
    shutil.copyfile(img.path, theirs_img)
    shutil.copyfile(img.path, ours_img)
    theirs = run_qemu_io(theirs_img, "qcow2", WRITE_SCRIPT)
    ours = run_ours(ours_img, "qcow2", WRITE_SCRIPT)
    assert theirs.returncode == 1
    assert_same(ours, theirs, name)
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(ours_img), str(theirs_img)],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr
    check = subprocess.run(["qemu-img", "check", str(ours_img)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
