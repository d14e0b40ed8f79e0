"""Replays: :func:`replay` runs a record (a ``serve --trace`` trace, or an
``exercise --log`` op log) through the mirrored device again, without the
client, and stops at the first finding, as the live run did.

A module of its own, imported on first use (``blkverify_rs.replay``).
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blkverify_rs import _native
from blkverify_rs.serve_api import ServeFinding

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ReplayFinding(ServeFinding):
    """A difference a replay found: serve's finding record (``message``,
    ``request``, ``connection``, ``sector``, both sides' bytes, ``mapping``),
    so a replay's finding compares with the live one field by field.
    ``request`` (= ``op_number``) is the request number a trace recorded, or
    an op log's op number; ``connection`` is ``None`` for an op log.
    ``last_change`` names the last op before it that wrote the first differing
    byte, and ``diagnosis`` what the test side's bytes are, when that can be
    told (zeros, an older write's data)."""


@dataclass(frozen=True)
class ReplayResult:
    """What :func:`replay` did and found: ``ops`` run (``issued`` started) of
    the record's ``total``, at ``queue_depth``, in ``elapsed_s``; ``verified``
    when the whole device was verified after the last op; ``ending`` notes a
    trace cut short (it replays up to its last whole record); ``mismatches``
    (at most one: a replay stops at the first)."""

    record: str
    kind: str
    spec: str
    ops: int
    issued: int
    total: int
    queue_depth: int
    elapsed_s: float
    ops_per_s: float
    verify_elapsed_s: float
    bytes_read: int
    bytes_written: int
    verified: bool
    size: int
    test_format: str
    in_place: bool
    ending: str | None
    mismatches: list[ReplayFinding]
    reproduce: str

    @property
    def clean(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        """The result as ``blkverify replay --json`` prints it."""
        out = {k: v for k, v in self.__dict__.items() if k != "mismatches"}
        out["mismatches"] = [m.to_dict() for m in self.mismatches]
        return out


def resolve_spec(recording: Any, spec: PathLike | None, test_command: str | None) -> str:
    """The device to replay on: ``spec`` (``blkverify:RAW:TEST``), or with a
    ``test_command`` the raw reference alone; an op log's own spec when none
    is given. A trace names the images serve used, which serve changed, so a
    trace's replay must name the images as they were when serve started."""
    text = None if spec is None else os.fspath(spec)
    sides = None if text is None else _native.parse_spec(text)
    if test_command is not None:
        if sides is not None:
            raise ValueError(
                f"{text}: with a test command, give the raw reference alone (RAW, not "
                "blkverify:RAW:TEST): the command serves the test side"
            )
        if text is None:
            if recording.kind == "trace":
                raise ValueError(
                    f"{recording.path}: name the raw reference as it was when serve started "
                    f"(the trace's {recording.header['raw']} is as serve left it)"
                )
            recorded = recording.spec
            parsed = None if recorded is None else _native.parse_spec(recorded)
            if parsed is None:
                raise ValueError(f"{recording.path}: the log names no raw reference: give RAW")
            text = parsed[0]
        return text
    if text is not None:
        if sides is None:
            raise ValueError(f"{text}: a replay needs a mirrored device, blkverify:RAW:TEST")
        return text
    if recording.kind == "trace":
        header = recording.header
        raise ValueError(
            f"{recording.path}: name the images as they were when serve started "
            f"(blkverify:RAW:TEST): the trace's {header['raw']} and {header['test']} are "
            "as serve left them"
        )
    if recording.spec is None:
        raise ValueError(f"{recording.path}: the log names no device: give blkverify:RAW:TEST")
    return recording.spec


def replay_once(
    recording: Any,
    spec: str,
    test_command: str | None,
    trial: int = 0,
    **options: Any,
) -> dict[str, Any]:
    """One replay through the native engine: on ``spec`` (the raw reference
    alone with ``test_command``, which then serves a fresh test side for it,
    stopped afterwards). Returns the native dict."""
    if test_command is None:
        return recording.replay(spec, **options)
    from blkverify_rs.test_side import TestSide

    with TestSide(test_command, trial=trial) as side:
        return recording.replay(_native.make_spec(spec, side.uri), **options)


def _reproduce(
    record: str,
    spec: str,
    test_command: str | None,
    format: str | None,
    queue_depth: int | None,
    in_place: bool,
    timeout: float | None,
) -> str:
    words = ["blkverify", "replay", record, spec]
    if test_command is not None:
        words += ["--test-command", test_command]
    if format is not None:
        words += ["-f", format]
    if queue_depth is not None:
        words += ["--queue-depth", str(queue_depth)]
    if in_place:
        words.append("--in-place")
    if timeout is not None:
        words += ["--timeout", f"{timeout:g}"]
    return shlex.join(words)


def replay(
    record: PathLike,
    spec: PathLike | None = None,
    *,
    format: str | None = None,
    queue_depth: int | None = None,
    verify: bool = True,
    in_place: bool = False,
    test_command: str | None = None,
    timeout: float | None = None,
    backing: bool = True,
    max_backing_depth: int = _native.DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Replay ``record`` (a ``serve --trace`` trace or an ``exercise --log`` op
    log) on the mirrored device ``spec`` (``blkverify:RAW:TEST``, the images
    as they were when the recorded run started), and stop at the first
    finding. At queue depth 1 (the default) a trace's requests run one at a
    time in the order serve applied them, so the replay meets the live run's
    finding at the same request, with the same message and sector.

    The images are never written: writes go to copy-on-write overlays, so a
    replay can be run again (``in_place`` writes them instead, to explore them
    afterwards at the finding's sector). An NBD test side is written; with
    ``test_command`` (see ``blkverify_rs.test_side``) a command serves a fresh
    one, and ``spec`` is the raw reference alone. ``verify`` checks the whole
    device after the last op. A trace cut short replays up to its last whole
    record (``ending`` says so).
    """
    record_text = os.fspath(record)
    recording = _native.Recording(record_text)
    device = resolve_spec(recording, spec, test_command)
    d = replay_once(
        recording,
        device,
        test_command,
        queue_depth=queue_depth,
        final_check="whole" if verify else "skip",
        in_place=in_place,
        format=format,
        timeout=timeout,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        progress=progress,
    )
    for key in ("seed", "mix", "size_mix"):
        d.pop(key, None)
    if test_command is not None:
        d["spec"] = device
    findings = [ReplayFinding(**m) for m in d.pop("mismatches")]
    reproduce = _reproduce(
        record_text, device, test_command, format, queue_depth, in_place, timeout
    )
    return ReplayResult(mismatches=findings, reproduce=reproduce, in_place=in_place, **d)
