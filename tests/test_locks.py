"""QEMU's image locks, both ways, with QEMU's own tools as the oracle.

QEMU declares what it holds on an image, and what it will not share, with
one-byte open-file-description locks (block/file-posix.c). We must lock the same
bytes in the same situations, so that a running ``qemu-nbd`` or VM keeps our
writes (and, for formats with metadata, our reads) off its image, and our open
device keeps ``qemu-io`` off ours. The first test compares the bytes themselves
(as ``/proc/locks`` shows them) with what ``qemu-io`` locks in each situation;
the others check the behaviour and the messages end to end.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import qemu_img, qemu_io, run_cli
from test_nbd import QemuNbd

# How each tool opens an image in each mode.
QEMU_IO_FLAGS = {"rw": [], "ro": ["-r"], "U": ["-r", "-U"]}
OPEN_KWARGS = {"rw": {"read_only": False}, "ro": {}, "U": {"force_share": True}}


def locked_bytes(path: Path) -> list[int]:
    """The bytes of ``path``'s file (of QEMU's two ranges, and some beyond) that
    anyone holds a lock on, tested as QEMU tests them: would an exclusive lock
    conflict? (``/proc/locks`` shows the same, but a read of it races with
    other processes' locking and may skip lines.)"""
    found = []
    fd = os.open(path, os.O_RDONLY)
    try:
        for byte in [*range(100, 110), *range(200, 210)]:
            probe = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, byte, 1, 0)
            kind = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, probe))[0]
            if kind != fcntl.F_UNLCK:
                found.append(byte)
    finally:
        os.close(fd)
    return found


class QemuIoHolder:
    """``qemu-io`` with an image open, waiting for commands on its stdin."""

    def __init__(self, path: Path, fmt: str, mode: str, *others: Path) -> None:
        """Open ``path``; wait until it and ``others`` (the files it names) are locked."""
        self.error = ""
        self.proc = subprocess.Popen(
            ["qemu-io", *QEMU_IO_FLAGS[mode], "-f", fmt, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # qemu-io answers its first command once the open is complete, with every
        # lock in place (while it opens, it changes them in steps).
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"length\n")
        self.proc.stdin.flush()
        answered = self.proc.stdout.readline()
        if not answered or not all(locked_bytes(p) for p in (path, *others)):
            self.stop()
            raise RuntimeError(f"qemu-io did not open {path}: {self.error}")

    def stop(self) -> None:
        """End qemu-io (its stdin closes) and keep what it said on stderr."""
        try:
            _, err = self.proc.communicate(timeout=10)
            self.error = err.decode(errors="replace")
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A qcow2, a raw image, a qcow2 over a qcow2 backing file, a qcow2 over a raw
    backing file, and a qcow2 with an external data file, all made by qemu-img."""
    d = tmp_path_factory.mktemp("locks")
    qemu_img("create", "-f", "qcow2", d / "t.qcow2", "4M")
    qemu_img("create", "-f", "raw", d / "r.raw", "4M")
    qemu_img("create", "-f", "qcow2", d / "base.qcow2", "4M")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", d / "top.qcow2")
    qemu_img("create", "-f", "raw", d / "rbase.raw", "4M")
    qemu_img("create", "-f", "qcow2", "-b", "rbase.raw", "-F", "raw", d / "rtop.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={d / 'd.raw'}", d / "dt.qcow2", "4M")
    return {p.name: p for p in d.iterdir()}


# (image, its format, the files it locks: itself, a backing or data file)
CASES = [
    ("t.qcow2", "qcow2", ["t.qcow2"]),
    ("r.raw", "raw", ["r.raw"]),
    ("top.qcow2", "qcow2", ["top.qcow2", "base.qcow2"]),
    ("rtop.qcow2", "qcow2", ["rtop.qcow2", "rbase.raw"]),
    ("dt.qcow2", "qcow2", ["dt.qcow2", "d.raw"]),
]


@pytest.mark.parametrize("mode", ["rw", "ro", "U"])
@pytest.mark.parametrize(("name", "fmt", "files"), CASES, ids=[c[0] for c in CASES])
def test_we_lock_the_bytes_qemu_io_locks(images, name, fmt, files, mode) -> None:
    holder = QemuIoHolder(images[name], fmt, mode, *(images[f] for f in files))
    try:
        qemu = {f: locked_bytes(images[f]) for f in files}
    finally:
        holder.stop()
    assert all(not locked_bytes(images[f]) for f in files)
    assert all(qemu.values()), f"qemu-io locked nothing in some file: {qemu}"
    with bv.open(images[name], format=fmt, **OPEN_KWARGS[mode]):
        ours = {f: locked_bytes(images[f]) for f in files}
    assert ours == qemu
    assert all(not locked_bytes(images[f]) for f in files), "close() releases every lock"


@pytest.fixture(scope="module")
def read_only_formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Images of the formats we only read, made by qemu-img: VMDKs with a flat
    extent, with sparse extents, and over a VMDK parent; VHD, VHDX, VDI."""
    d = tmp_path_factory.mktemp("rolocks")
    qemu_img("create", "-f", "vmdk", "-o", "subformat=monolithicFlat", d / "flat.vmdk", "4M")
    qemu_img("create", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", d / "sp.vmdk", "4M")
    qemu_img("create", "-f", "vmdk", d / "vbase.vmdk", "4M")
    qemu_img("create", "-f", "vmdk", "-b", "vbase.vmdk", "-F", "vmdk", d / "vtop.vmdk")
    qemu_img("create", "-f", "vpc", d / "v.vhd", "4M")
    qemu_img("create", "-f", "vhdx", d / "x.vhdx", "4M")
    qemu_img("create", "-f", "vdi", d / "d.vdi", "4M")
    return {p.name: p for p in d.iterdir()}


READ_ONLY_CASES = [
    ("flat.vmdk", "vmdk", ["flat.vmdk", "flat-flat.vmdk"]),
    ("sp.vmdk", "vmdk", ["sp.vmdk", "sp-s001.vmdk"]),
    ("vtop.vmdk", "vmdk", ["vtop.vmdk", "vbase.vmdk"]),
    ("v.vhd", "vpc", ["v.vhd"]),
    ("x.vhdx", "vhdx", ["x.vhdx"]),
    ("d.vdi", "vdi", ["d.vdi"]),
]


@pytest.mark.parametrize("mode", ["ro", "U"])
@pytest.mark.parametrize(
    ("name", "fmt", "files"), READ_ONLY_CASES, ids=[c[0] for c in READ_ONLY_CASES]
)
def test_formats_we_only_read_lock_as_qemu_io_r_does(
    read_only_formats, name, fmt, files, mode
) -> None:
    # Every file the image names is locked: its extents (a flat one as a data
    # file, a sparse one as an image) and its parent.
    paths = [read_only_formats[f] for f in files]
    holder = QemuIoHolder(read_only_formats[name], fmt, mode, *paths)
    try:
        qemu = {f: locked_bytes(p) for f, p in zip(files, paths, strict=True)}
    finally:
        holder.stop()
    assert all(qemu.values()), f"qemu-io locked nothing in some file: {qemu}"
    with bv.open(read_only_formats[name], format=fmt, **OPEN_KWARGS[mode]):
        ours = {f: locked_bytes(p) for f, p in zip(files, paths, strict=True)}
    assert ours == qemu
    assert all(not locked_bytes(p) for p in paths), "close() releases every lock"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def served_qcow2(tmp_path: Path) -> Iterator[tuple[Path, Path, QemuNbd]]:
    """A qcow2 with data, its raw copy, and qemu-nbd serving the qcow2 for writing."""
    img, raw = tmp_path / "s.qcow2", tmp_path / "s.raw"
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_io(img, "write -P 0x5a 0 1M")
    qemu_img("convert", "-O", "raw", img, raw)
    server = QemuNbd(img, "qcow2", tmp_path / "s.sock")
    try:
        yield img, raw, server
    finally:
        server.stop()


WRITE_LOCK = 'Failed to get "write" lock'
SHARED_WRITE_LOCK = 'Failed to get shared "write" lock'


def test_a_running_qemu_nbd_blocks_our_writes_and_leaves_the_image_alone(
    served_qcow2, tmp_path: Path
) -> None:
    img, raw, _ = served_qcow2
    before = digest(img)
    io = run_cli("io", "-c", "write -P 0x33 0 4k", img)
    assert io.returncode == 1  # as qemu-io exits
    assert io.stderr == (
        f"blkverify: error: {img}: {WRITE_LOCK}: another process is using the image "
        "(a VM, qemu-nbd?)\n"
    )
    exercise = run_cli("exercise", f"blkverify:{raw}:{img}", "--ops", "50", "--seed", "1")
    assert exercise.returncode == 2
    assert WRITE_LOCK in exercise.stderr and "Traceback" not in exercise.stderr
    with pytest.raises(OSError) as info:
        bv.open(img, read_only=False)
    assert info.value.errno == errno.EAGAIN and WRITE_LOCK in str(info.value)
    assert digest(img) == before


def test_a_running_qemu_nbd_blocks_our_reads_unless_force_share(
    served_qcow2, tmp_path: Path
) -> None:
    img, raw, _ = served_qcow2
    # Like `qemu-img compare`, a read-only open refuses an image being written.
    qemu = subprocess.run(["qemu-img", "compare", raw, img], capture_output=True, text=True)
    assert qemu.returncode == 2 and SHARED_WRITE_LOCK in qemu.stderr
    verify = run_cli("verify", raw, img)
    assert verify.returncode == 2
    assert verify.stderr.startswith(f"blkverify: error: {img}: {SHARED_WRITE_LOCK}: ")
    assert "-U/--force-share reads it anyway" in verify.stderr
    manifest = tmp_path / "pairs.txt"
    manifest.write_text(f"{raw} {img}\n")
    assert run_cli("batch", manifest).returncode == 2
    assert run_cli("io", "-r", "-c", "read 0 4k", img).returncode == 1
    # -U reads anyway, as qemu-img -U and qemu-io -U do.
    assert run_cli("verify", "-U", raw, img).returncode == 0
    assert run_cli("batch", "-U", manifest).returncode == 0
    shared = run_cli("io", "-r", "-U", "-c", "read -P 0x5a 0 4k", img)
    assert shared.returncode == 0, shared.stderr
    with bv.open(img, force_share=True) as image:
        assert image.read(0, 4) == b"\x5a" * 4
    assert bv.verify(raw, img, force_share=True).identical
    assert bv.verify_many([(raw, img)], force_share=True)[0].identical


def test_digest_and_map_refuse_an_image_being_written_unless_force_share(
    served_qcow2,
) -> None:
    img, raw, _ = served_qcow2
    for command in (["digest"], ["map"], ["map", "--json"]):
        refused = run_cli(*command, img)
        assert refused.returncode == 2, command
        assert refused.stderr.startswith(f"blkverify: error: {img}: {SHARED_WRITE_LOCK}: ")
        assert "Traceback" not in refused.stderr
        shared = run_cli(*command, "-U", img)
        assert shared.returncode == 0, shared.stderr
    # -U digests what the server holds: the same digest as its raw copy's.
    assert (
        run_cli("digest", "-U", img).stdout.split()[0] == run_cli("digest", raw).stdout.split()[0]
    )
    with pytest.raises(OSError, match=SHARED_WRITE_LOCK):
        bv.digest(img)
    with pytest.raises(OSError, match=SHARED_WRITE_LOCK):
        bv.map(img)
    assert bv.digest(img, force_share=True).hexdigest == bv.digest(raw).hexdigest
    extents = bv.map(img, force_share=True)
    assert extents[0].kind == "data" and extents[0].length == 1024 * 1024
    # verify --html reopens TEST to draw it: with -U too.
    page = img.with_suffix(".html")
    drawn = run_cli("verify", "-U", "--html", page, raw, img)
    assert drawn.returncode == 0, drawn.stderr
    assert page.stat().st_size > 0


def test_force_share_is_refused_with_a_write_as_qemu_refuses_it(tmp_path: Path) -> None:
    img = tmp_path / "u.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    message = "force-share=on can only be used with read-only images"
    qemu = subprocess.run(["qemu-io", "-U", "-c", "read 0 1", img], capture_output=True, text=True)
    assert qemu.returncode == 1 and message in qemu.stderr
    ours = run_cli("io", "-U", "-c", "read 0 1", img)
    assert ours.returncode == 1
    assert ours.stderr == f"blkverify: error: {img}: {message}\n"
    with pytest.raises(ValueError, match=message):
        bv.open(img, read_only=False, force_share=True)


def test_our_open_image_blocks_qemu_io_until_close(tmp_path: Path) -> None:
    img, raw = tmp_path / "o.qcow2", tmp_path / "o.raw"
    qemu_img("create", "-f", "qcow2", img, "4M")
    qemu_img("convert", "-O", "raw", img, raw)
    with bv.open(f"blkverify:{raw}:{img}", read_only=False) as dev:
        dev.write(0, b"\x11" * 4096)
        write = subprocess.run(["qemu-io", "-c", "write 0 4k", img], capture_output=True, text=True)
        assert write.returncode == 1
        assert write.stderr == (
            f"qemu-io: can't open device {img}: {WRITE_LOCK}\n"
            f"Is another process using the image [{img}]?\n"
        )
        info = subprocess.run(["qemu-img", "info", img], capture_output=True, text=True)
        assert info.returncode == 1 and SHARED_WRITE_LOCK in info.stderr
        assert subprocess.run(["qemu-img", "info", "-U", img], capture_output=True).returncode == 0
        # The raw reference is shared, as QEMU shares raw images.
        assert (
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "read 0 4k", raw], capture_output=True
            ).returncode
            == 0
        )
    after = subprocess.run(
        ["qemu-io", "-c", "read -P 0x11 0 4k", img], capture_output=True, text=True
    )
    assert after.returncode == 0 and "Pattern verification failed" not in after.stdout


def test_locks_go_away_when_the_process_dies(tmp_path: Path) -> None:
    img = tmp_path / "k.qcow2"
    qemu_img("create", "-f", "qcow2", img, "1M")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time, blkverify_rs as bv\n"
            f"img = bv.open({str(img)!r}, read_only=False)\n"
            "print('open', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "open\n"
        blocked = subprocess.run(["qemu-io", "-c", "write 0 1", img], capture_output=True)
        assert blocked.returncode == 1
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate(timeout=10)
    assert locked_bytes(img) == []
    assert subprocess.run(["qemu-io", "-c", "write 0 1", img], capture_output=True).returncode == 0


def test_raw_images_share_writes_as_qemu_does(tmp_path: Path) -> None:
    raw = tmp_path / "w.raw"
    qemu_img("create", "-f", "raw", raw, "4M")
    server = QemuNbd(raw, "raw", tmp_path / "w.sock")
    try:
        # qemu-io may write to a raw image that qemu-nbd -f raw serves; so may we.
        qemu = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", raw])
        assert qemu.returncode == 0
        ours = run_cli("io", "-f", "raw", "-c", "write -P 2 4k 4k", raw)
        assert ours.returncode == 0, ours.stderr
        with bv.open(server.uri) as exported:
            assert exported.read(4096, 4096) == b"\x02" * 4096
    finally:
        server.stop()


def test_a_data_file_is_locked_as_qemu_locks_it(tmp_path: Path) -> None:
    img, data = tmp_path / "x.qcow2", tmp_path / "x.data"
    qemu_img("create", "-f", "qcow2", "-o", f"data_file={data}", img, "4M")
    # qemu-nbd serving the data file as raw lets nobody resize it: a writable qcow2
    # (which may grow its data file) is refused, a read-only one is not.
    server = QemuNbd(data, "raw", tmp_path / "x.sock")
    try:
        for mode, expect in (("rw", False), ("ro", True)):
            qemu = subprocess.run(
                ["qemu-io", *QEMU_IO_FLAGS[mode], "-c", "read 0 1", img],
                capture_output=True,
                text=True,
            )
            assert (qemu.returncode == 0) == expect, qemu.stderr
            try:
                with bv.open(img, **OPEN_KWARGS[mode]):
                    opened = True
            except OSError as e:
                assert 'Failed to get "resize" lock' in str(e) and str(data) in str(e)
                opened = False
            assert opened == expect
    finally:
        server.stop()
