"""A real Linux guest whose disk is any NBD URI (issue 23): the harness of the guest tests.

    boot = build_guest(cache_dir)             # the cloud kernel + our initramfs
    result = run_guest("nbd+unix:///?socket=/tmp/x/nbd.sock", boot)
    assert result.result_line == "ok", result.console_text

The guest (scripts/guest/init) makes ext4 on its NVMe disk, copies a tree of about
4 MiB, syncs, drops its page cache, reads the tree back with cmp, deletes files,
runs fstrim, runs ``e2fsck -fn`` and prints ``BLKVERIFY-GUEST: ok`` or
``BLKVERIFY-GUEST: FAIL <step>`` on its serial console, then powers off.  QEMU runs
under TCG (never KVM) and is killed by its PID if it outlives ``timeout``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "guest" / "build.sh"

RESULT_RE = re.compile(r"^BLKVERIFY-GUEST: (.+?)\s*$", re.M)
STEP_RE = re.compile(r"^BLKVERIFY-STEP: (\S+) ([0-9.]+)\s*$", re.M)
# busybox cmp: "/tree/./d1/f03.bin /mnt/tree/./d1/f03.bin differ: char 5, line 1"
CMP_RE = re.compile(r"^/tree/(?:\./)?(\S+) /mnt/tree/\S+ differ: char (\d+), line \d+", re.M)


@dataclass(frozen=True)
class GuestBoot:
    kernel: Path
    initramfs: Path
    kernel_package: str  # "linux-image-6.1.0-NN-cloud-amd64 VERSION"
    tree: Path  # the tree the guest copies (a host copy of the initramfs's /tree)


@dataclass
class GuestResult:
    result_line: str | None  # "ok" or "FAIL <step>"; None if the guest printed none
    console_text: str  # everything on the serial console
    wall_s: float  # from starting QEMU to its exit (or kill)
    returncode: int | None  # QEMU's exit status (None if it had to be killed)
    timed_out: bool  # QEMU outlived ``timeout`` and was killed
    qemu_stderr: str = ""
    steps: dict[str, float] = field(default_factory=dict)  # step -> guest uptime at its start

    @property
    def ok(self) -> bool:
        return self.result_line == "ok"

    def cmp_failures(self) -> list[tuple[str, int]]:
        """(path in the tree, byte offset) of each file the guest read back wrong."""
        return [(m.group(1), int(m.group(2)) - 1) for m in CMP_RE.finditer(self.console_text)]

    def describe(self) -> str:
        tail = "\n".join(self.console_text.splitlines()[-60:])
        return (
            f"result={self.result_line!r} rc={self.returncode} timed_out={self.timed_out} "
            f"wall={self.wall_s:.1f}s\n--- console (tail) ---\n{tail}\n"
            f"--- qemu stderr ---\n{self.qemu_stderr}"
        )


def build_guest(out_dir: Path) -> GuestBoot:
    """Fetch the kernel (once: kept in ``out_dir``) and build the initramfs (every call)."""
    out_dir = Path(out_dir)
    proc = subprocess.run(
        ["sh", str(BUILD_SCRIPT), str(out_dir)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{proc.stderr}")
    return GuestBoot(
        kernel=out_dir / "vmlinuz",
        initramfs=out_dir / "initramfs.cpio.gz",
        kernel_package=(out_dir / "kernel.pkg").read_text().strip(),
        tree=out_dir / "tree",
    )


def qemu_argv(
    disk_uri: str,
    boot: GuestBoot,
    console: Path,
    *,
    memory_mib: int = 512,
    smp: int = 1,
    limit_s: int = 240,
    nvme_io_timeout_s: int = 60,
) -> list[str]:
    """The QEMU command line: TCG, no default devices, the disk on ``disk_uri`` over NVMe."""
    append = " ".join(
        [
            "console=ttyS0",
            "loglevel=4",
            "panic=-1",  # a dead /init reboots at once, and -no-reboot makes that an exit
            f"nvme_core.io_timeout={nvme_io_timeout_s}",
            f"blkverify.limit={limit_s}",
        ]
    )
    return [
        "qemu-system-x86_64",
        "-accel",
        "tcg",
        "-machine",
        "pc",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-m",
        str(memory_mib),
        "-smp",
        str(smp),
        "-kernel",
        str(boot.kernel),
        "-initrd",
        str(boot.initramfs),
        "-append",
        append,
        "-serial",
        f"file:{console}",
        "-drive",
        f"if=none,id=d,format=raw,discard=unmap,file={disk_uri}",
        "-device",
        "nvme,drive=d,serial=bv",
    ]


def run_guest(
    disk_uri: str,
    boot: GuestBoot,
    *,
    timeout: float = 300.0,
    memory_mib: int = 512,
    smp: int = 1,
    work_dir: Path | None = None,
) -> GuestResult:
    """Boot the guest on ``disk_uri`` (any NBD URI QEMU takes) and wait for it to power off.

    The guest gives up by itself (``FAIL timeout``) ``timeout - 60`` seconds after boot;
    QEMU is killed by its PID at ``timeout``.  Never raises for what the guest did: the
    result says it.
    """
    own_dir = work_dir is None
    d = Path(tempfile.mkdtemp(prefix="guest-")) if own_dir else Path(work_dir)
    console = d / "console.txt"
    stderr_path = d / "qemu.stderr"
    console.unlink(missing_ok=True)  # never read a previous run's console
    argv = qemu_argv(
        disk_uri,
        boot,
        console,
        memory_mib=memory_mib,
        smp=smp,
        limit_s=max(int(timeout) - 60, 30),
    )
    start = time.monotonic()
    timed_out = False
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    wall = time.monotonic() - start
    text = console.read_bytes().decode(errors="replace") if console.exists() else ""
    text = text.replace("\r\n", "\n")
    qemu_err = stderr_path.read_text(errors="replace")
    if own_dir:
        for p in (console, stderr_path):
            p.unlink(missing_ok=True)
        d.rmdir()
    m = RESULT_RE.search(text)
    return GuestResult(
        result_line=m.group(1) if m else None,
        console_text=text,
        wall_s=wall,
        returncode=None if timed_out else proc.returncode,
        timed_out=timed_out,
        qemu_stderr=qemu_err,
        steps={s.group(1): float(s.group(2)) for s in STEP_RE.finditer(text)},
    )
