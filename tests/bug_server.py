"""The planted-bug NBD server of the tests: nbdkit's Python plugin over a plain file.

    with BugServer(image, bugs=[("lost-write", 3)]) as server:
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x22 60k 8k", server.uri])
        entries = server.fired()   # [{"kind": "lost-write", "first_sector": ..., ...}]

The bugs, how they are counted and the log format are documented at the top of
tests/bugserver/plugin.py.  The server is ``nbdkit -f --exit-with-parent -t 1 -U SOCK
-P PIDFILE python plugin.py file=IMAGE bug=KIND@N ... log=LOG``: one thread per
connection, so each connection's requests are applied in the order they arrived, and
every request of the plugin is serialised, so counts are deterministic.  It is stopped
by its PID (SIGTERM, then SIGKILL) in ``stop()``, which ``__exit__`` calls whether or not
the block raised (the ``bug_server`` fixture of conftest.py stops every server it started
at teardown); ``--exit-with-parent`` also ends it if the thread that started it dies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PLUGIN = Path(__file__).resolve().parent / "bugserver" / "plugin.py"
KINDS = ("lost-write", "late-write", "neighbour-read")


class BugServer:
    """nbdkit serving ``path`` with planted ``bugs`` (a list of (kind, n)), on a unix socket.

    ``socket``: the socket path (default: a fresh one in a private temporary directory,
    short enough for sun_path).  ``log``: the JSON-lines log of fired bugs (default: in
    that directory).  Starts at construction and waits until the server accepts.
    ``stop()`` (also ``__exit__``) ends it by PID and removes the private directory;
    ``fired()`` and ``stderr()`` still answer afterwards, from memory.
    """

    def __init__(
        self,
        path,
        bugs=(),
        log=None,
        socket=None,
        start_timeout: float = 20.0,
    ) -> None:
        self.path = Path(path)
        self.bugs = [(str(kind), int(n)) for kind, n in bugs]
        for kind, n in self.bugs:
            if kind not in KINDS or n < 1:
                raise ValueError(f"bug {kind}@{n}: kind must be one of {KINDS}, n >= 1")
        self._dir = Path(tempfile.mkdtemp(prefix="bugsrv-"))
        self.socket = Path(socket) if socket is not None else self._dir / "nbd.sock"
        self.log = Path(log) if log is not None else self._dir / "bugs.jsonl"
        self.stats_path = self._dir / "stats.json"
        self._final_stats: dict | None = None
        self.stderr_path = self._dir / "nbdkit.stderr"
        self._final_log: str | None = None
        self._final_stderr: str | None = None
        pidfile = self._dir / "nbdkit.pid"
        argv = [
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-t",
            "1",
            "-U",
            str(self.socket),
            "-P",
            str(pidfile),
            "python",
            str(PLUGIN),
            f"file={self.path}",
            f"log={self.log}",
            f"stats={self.stats_path}",
            *(f"bug={kind}@{n}" for kind, n in self.bugs),
        ]
        self.argv = argv
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        try:
            self._wait_ready(pidfile, start_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, pidfile: Path, timeout: float) -> None:
        # nbdkit writes its PID file once the socket listens; a connect() then proves it.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"nbdkit exited ({self.proc.returncode}) before listening: "
                    f"{self.argv}\n{self.stderr()}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit did not listen within {timeout}s: {self.argv}")
            if pidfile.exists() and self.socket.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
                finally:
                    probe.close()
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    def fired(self) -> list[dict]:
        """The log's entries so far, in the order the bugs fired (kept after ``stop()``)."""
        if self._final_log is not None:
            text = self._final_log
        elif self.log.exists():
            text = self.log.read_text()
        else:
            text = ""
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def stats(self) -> dict | None:
        """Requests and bytes served (see plugin.py), known once the server has stopped."""
        return self._final_stats

    def stderr(self) -> str:
        """What nbdkit printed on stderr (kept after ``stop()``)."""
        if self._final_stderr is not None:
            return self._final_stderr
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server by its PID (SIGTERM, then SIGKILL); return its exit status.

        The log and stderr are read into memory, then the private directory is removed.
        Calling it again is harmless.
        """
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        if self._final_log is None:
            self._final_log = self.log.read_text() if self.log.exists() else ""
            self._final_stderr = self.stderr()
            if self.stats_path.exists():
                self._final_stats = json.loads(self.stats_path.read_text())
            shutil.rmtree(self._dir, ignore_errors=True)
        return self.proc.returncode

    def __enter__(self) -> BugServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
