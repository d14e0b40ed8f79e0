"""``blkverify serve``'s Python face: :func:`serve` starts the mirrored device as
an NBD server on Rust threads and returns a :class:`Server`, a context manager
that a driver's own test suite can use as a fixture::

    with bv.serve("raw.img", "test.qcow2", persistent=True) as server:
        subprocess.run(["qemu-img", "convert", "-n", "disk.qcow2", server.uri], check=True)
    assert not server.findings, server.findings[0].message

A module of its own, imported on first use (``blkverify_rs.serve``), so that
``import blkverify_rs`` does not pay for dataclasses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from blkverify_rs import _native
from blkverify_rs.exercise_api import ExerciseFinding

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ServeFinding(ExerciseFinding):
    """A difference serve found: ``exercise``'s mismatch record (``message`` is
    the seed's line, ``sector``/``first_byte`` and both sides' bytes, or
    ``test_ret``/``raw_ret``), plus ``request`` (the global request number, the
    order serve applied requests in; ``op_number`` is the same), ``connection``
    (numbered from 1) and ``mapping`` (where the test side keeps the byte, as
    ``Image.locate`` says). ``op`` is the request (``"read 1048576 4096"``);
    ``request``, ``connection`` and ``op`` are ``None`` for the final flush
    (``phase``). ``last_change`` is always ``None`` (serve keeps no history).
    """

    request: int | None
    connection: int | None
    mapping: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        """The finding as ``serve --report`` writes it (one JSON line)."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class ServeSummary:
    """What a serve did: ``requests`` (admitted to the device; ``by_command``
    counts them by NBD command), ``refused`` (failed the protocol's checks),
    ``connections`` (clients that entered transmission), ``dropped_replies``
    (their client left while the request ran; it ran on both sides),
    ``truncated_requests`` (the client left mid-request: not run),
    ``findings``, ``stopped_by``, ``elapsed_s``, and for each side (``test``,
    ``raw``) the bytes ``read``, ``written``, ``zeroed`` and ``discarded``;
    ``test_image``, ``test_format`` and ``raw_image`` name the sides.
    ``trace`` is what a trace recorded (``path``, ``requests``, ``writes``,
    ``write_bytes``, ``new_blocks``, ``repeated_blocks``, ``zero_blocks``,
    ``file_bytes``), ``None`` without one; ``trace_error`` says why it could
    not be written, if it could not."""

    requests: int
    by_command: dict[str, int]
    refused: int
    connections: int
    dropped_replies: int
    truncated_requests: int
    findings: int
    stopped_by: str
    elapsed_s: float
    test: dict[str, int]
    raw: dict[str, int]
    test_image: str
    test_format: str
    raw_image: str
    trace: dict[str, Any] | None = None
    trace_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Server:
    """A running ``blkverify serve``: ``uri`` to connect to, ``findings`` so
    far, ``stop()``. As a context manager it stops the server on exit (and
    waits for it: requests in flight finish, both sides are flushed, the images
    closed). ``summary`` is there once it has ended."""

    def __init__(self, native: _native.Server) -> None:
        self._native = native
        self._findings: list[ServeFinding] = []
        self._summary: ServeSummary | None = None

    @property
    def uri(self) -> str:
        """``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST:PORT/EXPORT``."""
        return self._native.uri

    @property
    def stopping(self) -> bool:
        """Whether the server is stopping or has stopped (on its own too: a
        mismatch under ``on_mismatch="stop"``, the last client leaving)."""
        return self._native.stopping

    @property
    def trace_error(self) -> str | None:
        """Why the trace (``trace=``) stopped being written, if it failed."""
        return self._native.trace_error

    def new_findings(self) -> list[ServeFinding]:
        """The findings made since the last call (the first call: all so far)."""
        fresh = [ServeFinding(**d) for d in self._native.findings(len(self._findings))]
        self._findings += fresh
        return fresh

    @property
    def findings(self) -> list[ServeFinding]:
        """Every finding so far, in the order found."""
        self.new_findings()
        return list(self._findings)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds (``None``: until it ends) for the
        server to end; returns whether it has. Python signal handlers run
        while it waits (an exception they raise is raised here)."""
        return self._native.wait(timeout)

    def stop(self, wait: bool = True, reason: str | None = None) -> ServeSummary | None:
        """Ask the server to stop; with ``wait``, wait for it and return the
        summary (raising the error that ended it, if any)."""
        self._native.stop(reason)
        return self.summary_wait() if wait else None

    def remove_socket(self) -> None:
        """Remove the Unix socket (and its private directory) at once, for a
        process that exits without stopping the server (a forced exit)."""
        self._native.remove_socket()

    def summary_wait(self) -> ServeSummary:
        """Wait for the end and return the summary."""
        if self._summary is None:
            self._summary = ServeSummary(**self._native.summary())
            self.new_findings()
        return self._summary

    @property
    def summary(self) -> ServeSummary | None:
        """The summary, once the server has ended (else ``None``)."""
        if self._summary is None and self._native.wait(0):
            return self.summary_wait()
        return self._summary

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop(reason="the Python context ended")

    def __repr__(self) -> str:
        return f"<blkverify_rs.Server {self.uri}>"


def serve(
    raw: PathLike,
    test: PathLike | None = None,
    *,
    format: str | None = None,
    read_only: bool = False,
    socket: PathLike | None = None,
    port: int | None = None,
    bind: str | None = None,
    export_name: str = "",
    shared: int = 1,
    persistent: bool = False,
    on_mismatch: str = "stop",
    force_share: bool = False,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
    trace: PathLike | None = None,
) -> Server:
    """Serve the mirrored device of ``raw`` (the raw reference) and ``test``
    (``format``, or probed; an NBD URI makes serve a verifying proxy) over NBD,
    on Rust threads; returns once the socket listens. ``raw`` may instead be a
    ``blkverify:RAW:TEST`` spec, with ``test`` left out.

    Listens on a fresh Unix socket in a private directory, or ``socket``, or TCP
    ``port`` (0: a free one) on ``bind`` (default ``127.0.0.1``). Serves
    ``shared`` clients at once; without ``persistent`` it stops when the last
    client leaves. ``on_mismatch``: ``"stop"`` (the request fails with EIO and
    the server stops), ``"eio"`` (it fails; serving goes on) or
    ``"reference"`` (the client gets the reference's bytes). ``read_only``
    exports read-only (and is needed for a format blkverify cannot write);
    ``force_share`` opens images another process holds (read-only only).
    ``trace`` records every request, in the order serve applied it to both
    sides, to that file (see :func:`replay` and :func:`shrink`).
    """
    if test is None:
        spec = _native.parse_spec(os.fspath(raw))
        if spec is None:
            raise ValueError(f"{os.fspath(raw)}: serve needs RAW and TEST, or blkverify:RAW:TEST")
        raw, test = spec
    native = _native.serve(
        os.fspath(raw),
        os.fspath(test),
        format=format,
        read_only=read_only,
        socket=None if socket is None else os.fspath(socket),
        port=port,
        bind=bind,
        export_name=export_name,
        shared=shared,
        persistent=persistent,
        on_mismatch=on_mismatch,
        force_share=force_share,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        timeout=timeout,
        trace=None if trace is None else os.fspath(trace),
    )
    return Server(native)
