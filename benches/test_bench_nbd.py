"""``exercise`` against ``qemu-nbd``, side by side with fio's nbd engine on the
same kind of server: 4 KiB random reads and writes, 70/30, at queue depth 8 and
1 (issue 10's target: at depth 8, at least fio's ops/s).

    BLKVERIFY_BENCH_MIB=1024 pytest benches/test_bench_nbd.py --benchmark-enable

Each round gets a fresh qcow2 (metadata preallocated, so neither side pays
for cluster allocation) and its raw twin, served by its own ``qemu-nbd``;
setting them up is not timed. Both tools run the same number of ops, and
``extra_info`` records the ops/s each reports itself (start-up excluded), the
ratio of ours to fio's, the load average and the command.

The comparison is harsh on us, as the issue says: with ``rw=randrw`` fio
verifies only reads of blocks it wrote itself, while ``exercise`` sends every
op to both sides (the raw reference is a local file) and compares every read.
The final whole-device verify is left out (``--no-verify``): fio has none.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import BENCH_MIB

OPS = 200_000 if "--benchmark-enable" in sys.argv else 400
_ops_per_s: dict[str, float] = {}


class Export:
    """A fresh qcow2 and its raw twin (both zeros), the qcow2 served by qemu-nbd."""

    def __init__(self, directory: Path, name: str) -> None:
        self.qcow2 = directory / f"{name}.qcow2"
        self.raw = directory / f"{name}.raw"
        self.sock = directory / f"{name}.sock"
        for path in (self.qcow2, self.raw, self.sock):
            path.unlink(missing_ok=True)
        size = f"{BENCH_MIB}M"
        subprocess.run(
            [
                *("qemu-img", "create", "-q", "-f", "qcow2"),
                *("-o", "preallocation=metadata", str(self.qcow2), size),
            ],
            check=True,
        )
        subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(self.raw), size], check=True)
        self.proc = subprocess.Popen(
            [
                *("qemu-nbd", "--persistent", "--shared=8", "-k", str(self.sock)),
                *("-f", "qcow2", "--cache=writeback", str(self.qcow2)),
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.sock))
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("qemu-nbd did not start") from None
                time.sleep(0.02)
            finally:
                probe.close()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.wait(timeout=10)


def command(impl: str, export: Export, depth: int) -> list[str]:
    if impl == "fio":
        return [
            "fio",
            "--name=randrw",
            "--ioengine=nbd",
            f"--uri={export.uri}",
            "--rw=randrw",
            "--rwmixread=70",
            "--bs=4k",
            f"--iodepth={depth}",
            "--verify=crc32c",
            f"--size={BENCH_MIB}M",
            f"--io_size={OPS * 4}k",
            "--output-format=json",
        ]
    return [
        sys.executable,
        "-m",
        "blkverify_rs",
        "exercise",
        f"blkverify:{export.raw}:{export.uri}",
        f"--queue-depth={depth}",
        "--mix=read=70,write=30",
        "--size-mix=4k=1",
        f"--ops={OPS}",
        "--seed=1",
        "--no-verify",
        "--json",
    ]


def reported_ops_per_s(impl: str, stdout: str) -> float:
    """The ops/s the tool reports itself (its start-up excluded)."""
    if impl == "fio":
        job = json.loads(stdout[stdout.index("{") :])["jobs"][0]
        return float(job["read"]["iops"] + job["write"]["iops"])
    return float(json.loads(stdout)["ops_per_s"])


@pytest.mark.parametrize("depth", [8, 1])
@pytest.mark.parametrize("impl", ["fio", "blkverify-exercise"])
def test_randrw_4k_against_qemu_nbd(benchmark, tmp_path: Path, impl: str, depth: int) -> None:
    exports: list[Export] = []
    figures: list[float] = []

    def setup() -> tuple[tuple[Export], dict]:
        exports.append(Export(tmp_path, f"round{len(exports)}"))
        return (exports[-1],), {}

    def run(export: Export) -> None:
        try:
            # In the round's directory: fio leaves its verify state file in its cwd.
            result = subprocess.run(
                command(impl, export, depth),
                capture_output=True,
                text=True,
                check=False,
                cwd=tmp_path,
            )
        finally:
            export.stop()
        assert result.returncode == 0, result.stderr
        figures.append(reported_ops_per_s(impl, result.stdout))

    group = f"4 KiB randrw 70/30 against qemu-nbd, queue depth {depth}"
    benchmark.group = group
    benchmark.extra_info["implementation"] = impl
    benchmark.extra_info["ops"] = OPS
    benchmark.pedantic(run, setup=setup, rounds=3, iterations=1)
    ops_per_s = sorted(figures)[len(figures) // 2]
    benchmark.extra_info["ops_per_s"] = round(ops_per_s)
    benchmark.extra_info["loadavg"] = os.getloadavg()
    benchmark.extra_info["command"] = " ".join(command(impl, exports[-1], depth))
    if impl == "fio":
        _ops_per_s[group] = ops_per_s
    elif group in _ops_per_s:
        benchmark.extra_info["ratio_to_fio"] = round(ops_per_s / _ops_per_s[group], 2)
