"""qcow2 writes, ours against QEMU's, side by side (issue 10's targets).

- Allocating 4 KiB writes, one into each 64 KiB cluster of a fresh 1 GiB qcow2:
  ``qemu-img bench -w -t writeback -c N -s 4k -S 64k -d 1`` against the same
  pattern through ``bv.open(IMG, read_only=False).write`` in a Python loop, then
  one ``flush()``.
- Overwrites of the same, now allocated, clusters: the same two commands.
- ``blkverify exercise --no-verify`` on fresh 1 GiB images (4 KiB writes only, and
  the default mix), with the test side our qcow2 driver or ``qemu-nbd -f qcow2
  --cache=writeback`` over a unix socket.

Every round starts from fresh images (made in the round's setup, untimed). The
reference runs first in each group; ``extra_info["ratio"]`` on our entry is the
reference's median time over ours, so above 1 means faster than QEMU. CI runs
each once, small, as a smoke test; measure with
``BLKVERIFY_BENCH_WRITES=16000 pytest benches/test_bench_write.py --benchmark-enable``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ENABLED = "--benchmark-enable" in sys.argv
# The figures: 16000 writes (a 1 GiB image has 16384 clusters of 64 KiB).
WRITES = int(os.environ.get("BLKVERIFY_BENCH_WRITES", "16000" if ENABLED else "200"))
EXERCISE_OPS = int(os.environ.get("BLKVERIFY_BENCH_OPS", "20000" if ENABLED else "200"))
ROUNDS = 5 if ENABLED else 1
IMAGE_SIZE = "1G"
CLUSTER = 65536
_medians: dict[str, float] = {}


def fresh_qcow2(path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), IMAGE_SIZE], check=True)


def fresh_raw(path: Path) -> None:
    path.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), IMAGE_SIZE], check=True)


QEMU_BENCH = ["qemu-img", "bench", "-w", "-t", "writeback", "-d", "1", "-f", "qcow2"]


def qemu_bench_writes(path: Path, count: int) -> None:
    subprocess.run(
        [*QEMU_BENCH, "-c", str(count), "-s", "4k", "-S", "64k", str(path)],
        check=True,
        capture_output=True,
    )


def python_writes(path: Path, count: int) -> None:
    import blkverify_rs as bv

    data = b"\xa5" * 4096
    with bv.open(path, read_only=False) as img:
        write = img.write
        offset = 0
        for _ in range(count):
            write(offset, data)
            offset += CLUSTER
        img.flush()


def measure(benchmark, group: str, impl: str, target, args: tuple, setup=None) -> None:
    benchmark.group = group
    benchmark.extra_info["implementation"] = impl
    benchmark.extra_info["loadavg"] = Path("/proc/loadavg").read_text().split()[:3]

    def prepared():
        if setup is not None:
            setup()
        return args, {}

    benchmark.pedantic(target, setup=prepared, rounds=ROUNDS, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: a smoke run
        return
    median = stats.stats.median
    benchmark.extra_info["ops_per_s"] = round(args_count(args) / median)
    reference = _medians.get(group)
    if reference is None:
        _medians[group] = median
    else:
        benchmark.extra_info["ratio"] = round(reference / median, 2)


def args_count(args: tuple) -> int:
    return next((a for a in args if isinstance(a, int)), 1)


WRITE_IMPLS = ["qemu-img-bench", "blkverify-python"]


@pytest.mark.parametrize("impl", WRITE_IMPLS)
def test_allocating_writes(benchmark, impl: str, bench_dir: Path) -> None:
    image = bench_dir / f"alloc-{impl}.qcow2"
    target = python_writes if impl == "blkverify-python" else qemu_bench_writes
    benchmark.extra_info["writes"] = WRITES
    group = "allocating 4 KiB writes, one per 64 KiB cluster"
    measure(benchmark, group, impl, target, (image, WRITES), lambda: fresh_qcow2(image))
    check = subprocess.run(["qemu-img", "check", "-q", str(image)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.parametrize("impl", WRITE_IMPLS)
def test_overwrites(benchmark, impl: str, bench_dir: Path) -> None:
    image = bench_dir / f"overwrite-{impl}.qcow2"
    fresh_qcow2(image)
    qemu_bench_writes(image, WRITES)
    target = python_writes if impl == "blkverify-python" else qemu_bench_writes
    benchmark.extra_info["writes"] = WRITES
    group = "4 KiB overwrites of allocated clusters"
    measure(benchmark, group, impl, target, (image, WRITES))


QEMU_NBD = ["qemu-nbd", "--persistent", "--shared=4"]


def start_qemu_nbd(image: Path, socket: Path) -> subprocess.Popen:
    socket.unlink(missing_ok=True)
    server = subprocess.Popen(
        [*QEMU_NBD, "-k", str(socket), "-f", "qcow2", "--cache=writeback", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while not socket.exists():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"qemu-nbd did not start on {socket}")
        time.sleep(0.01)
    return server


class Servers:
    """The qemu-nbd of the current round, stopped before the next one starts."""

    def __init__(self) -> None:
        self.current: subprocess.Popen | None = None

    def replace(self, server: subprocess.Popen | None) -> None:
        self.stop()
        self.current = server

    def stop(self) -> None:
        if self.current is not None:
            self.current.send_signal(signal.SIGTERM)
            self.current.wait(timeout=10)
            self.current = None


@pytest.fixture
def servers() -> Iterator[Servers]:
    held = Servers()
    try:
        yield held
    finally:
        held.stop()


BLKVERIFY = [sys.executable, "-m", "blkverify_rs"]


def run_exercise(spec: str, mix: list[str], ops: int) -> None:
    result = subprocess.run(
        [*BLKVERIFY, "exercise", spec, "--ops", str(ops), "--seed", "1", "--no-verify", "-q", *mix],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


MIXES = {
    "4 KiB writes": ["--mix", "write=1", "--size-mix", "4k=1"],
    "default mix": [],
}


@pytest.mark.parametrize("mix", list(MIXES))
@pytest.mark.parametrize("impl", ["qemu-nbd", "blkverify-qcow2"])
def test_exercise(benchmark, impl: str, mix: str, bench_dir: Path, servers: Servers) -> None:
    work = bench_dir / f"exercise-{impl}-{mix.replace(' ', '-')}"
    work.mkdir(exist_ok=True)
    raw, test, socket = work / "r.raw", work / "t.qcow2", work / "nbd.sock"
    if impl == "qemu-nbd":
        spec = f"blkverify:{raw}:nbd+unix:///?socket={socket}"
    else:
        spec = f"blkverify:{raw}:{test}"

    def setup() -> None:
        servers.stop()
        fresh_raw(raw)
        fresh_qcow2(test)
        if impl == "qemu-nbd":
            servers.replace(start_qemu_nbd(test, socket))

    benchmark.extra_info["ops"] = EXERCISE_OPS
    group = f"exercise --no-verify, {mix}"
    measure(benchmark, group, impl, run_exercise, (spec, MIXES[mix], EXERCISE_OPS), setup)
    servers.stop()
    check = subprocess.run(["qemu-img", "check", "-q", str(test)], capture_output=True)
    assert check.returncode == 0, check.stdout + check.stderr
    shutil.rmtree(work)
