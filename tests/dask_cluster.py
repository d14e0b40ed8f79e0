"""A Dask cluster of real processes on 127.0.0.1 for the tests and the
benchmarks: a ``dask scheduler`` and named ``dask worker`` processes of one
thread each (no nanny, so a worker's PID is the worker), stopped by PID."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A scheduler and its workers, as processes of their own."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port"])
        self.client = distributed.Client(self.address, timeout=60, set_as_default=False)

    def start(self, name: str, args: list[str], cwd: Path | None = None) -> subprocess.Popen:
        if name == "scheduler":
            args = [*args, self.address.rsplit(":", 1)[1], "--no-dashboard"]
        else:
            args = ["worker", self.address, "--name", name, "--nthreads", "1", "--no-nanny"]
            args += ["--host", "127.0.0.1", "--no-dashboard"]
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "dask", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or self.root,
        )
        log.close()
        self.procs[name] = proc
        return proc

    def add_worker(self, name: str, cwd: Path | None = None) -> subprocess.Popen:
        proc = self.start(name, [], cwd)
        deadline = time.monotonic() + 60
        while name not in self.worker_names():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((self.root / f"{name}.log").read_text())
            time.sleep(0.1)
        return proc

    def worker_names(self) -> dict[str, str]:
        """name -> address of the live workers."""
        workers = self.client.scheduler_info()["workers"]
        return {str(info["name"]): address for address, info in workers.items()}

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        self.client.close()
        for name in [n for n in self.procs if n != "scheduler"]:
            self.stop(name)
        if "scheduler" in self.procs:
            self.stop("scheduler")
