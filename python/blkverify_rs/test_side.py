"""A test side started by a command, fresh for each replay or shrink trial
(``--test-command``): an NBD server that replays cannot reset between trials
(the planted-bug server over a fresh copy of its file, ``qemu-nbd --snapshot``).

The command runs with ``sh -c`` in a session of its own, its output in files
of a private directory. Before it runs, these placeholders are replaced, each
quoted for the shell:

- ``{socket}``: a fresh Unix socket path in that private directory;
- ``{dir}``: the private directory itself (for a fresh copy of an image);
- ``{trial}``: the trial's number (0 for a replay).

The side is ready when the command prints an NBD URI (``nbd://...`` or
``nbd+unix://...``) as the first line of its standard output, or when
``{socket}`` accepts a connection (the URI is then
``nbd+unix:///?socket=SOCKET``). It is stopped after the trial: SIGTERM to its
process group, SIGKILL if it has not exited within 10 seconds; the directory
is removed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from blkverify_rs._native import Error

STOP_GRACE = 10.0


class TestSideError(Error):
    """The test command did not serve a test side."""


class TestSide:
    """The test side ``command`` serves (see the module doc); a context manager."""

    __test__ = False  # not a pytest class, whatever its name

    def __init__(self, command: str, trial: int = 0, timeout: float = 30.0) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bv-side-"))
        self.socket = self.dir / "nbd.sock"
        self.command = (
            command.replace("{socket}", shlex.quote(str(self.socket)))
            .replace("{dir}", shlex.quote(str(self.dir)))
            .replace("{trial}", str(trial))
        )
        self._out = self.dir / "stdout"
        self._err = self.dir / "stderr"
        with open(self._out, "wb") as out, open(self._err, "wb") as err:
            self.proc = subprocess.Popen(
                ["sh", "-c", self.command],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                start_new_session=True,
            )
        try:
            self.uri = self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def _first_line(self) -> str | None:
        try:
            text = self._out.read_text(errors="replace")
        except OSError:
            return None
        line, newline, _ = text.partition("\n")
        return line.strip() if newline else None

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self._first_line()
            if line is not None and line.startswith(("nbd://", "nbd+unix://")):
                return line
            if self.socket.exists():
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(str(self.socket))
                    return f"nbd+unix:///?socket={self.socket}"
                except OSError:
                    pass
                finally:
                    probe.close()
            if self.proc.poll() is not None:
                raise TestSideError(
                    f"the test command exited ({self.proc.returncode}) before serving: "
                    f"{self.command}: {self.stderr().strip()[-300:]}"
                )
            if time.monotonic() > deadline:
                raise TestSideError(
                    f"the test command served nothing within {timeout:g} s (no NBD URI on its "
                    f"first line of output, nothing listening on {{socket}}): {self.command}"
                )
            time.sleep(0.01)

    def stderr(self) -> str:
        try:
            return self._err.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Stop the command's process group (TERM, then KILL) and remove the
        private directory."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=STOP_GRACE)
        else:
            # The command may have left children behind in its group.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TestSide:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
