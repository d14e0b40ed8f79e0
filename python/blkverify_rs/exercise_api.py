"""The exercise workload's Python face: :func:`exercise` and its result types.

A module of its own, imported on first use (``blkverify_rs.exercise``), so that
``import blkverify_rs`` (and ``blkverify --version``) does not pay for dataclasses.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blkverify_rs import _native

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class ExerciseFinding:
    """A difference :func:`exercise` found between the two sides.

    ``op_number`` and ``op`` (``"write 1049088 4096"``, as in the op log) name the
    operation; both are ``None`` when the final flush or verify found it (``phase``).
    ``kind`` is ``"contents"`` (``sector``, ``first_byte``, and the sector's bytes
    on each side as hex in ``test_bytes``/``raw_bytes``, drawn as ``hexdump``) or
    ``"return_value"`` (``test_ret``/``raw_ret``: 0 or a negative errno).
    ``last_change`` is the log line of the last op before it that changed the
    first differing byte; ``diagnosis`` says what the test side's bytes are when
    that can be told (zeros, or an older write's data).
    """

    op_number: int | None
    op: str | None
    phase: str
    kind: str
    message: str
    sector: int | None
    first_byte: int | None
    test_ret: int | None
    raw_ret: int | None
    test_error: str | None
    raw_error: str | None
    test_bytes: str
    raw_bytes: str
    hexdump: list[str]
    last_change: str | None
    diagnosis: str | None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class ExerciseResult:
    """What :func:`exercise` did and found."""

    spec: str
    ops: int
    issued: int
    seed: int
    queue_depth: int
    elapsed_s: float
    ops_per_s: float
    verify_elapsed_s: float
    bytes_read: int
    bytes_written: int
    verified: bool
    size: int
    test_format: str
    mix: str | None
    size_mix: str | None
    mismatches: list[ExerciseFinding]
    reproduce: str

    @property
    def clean(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        """The result as ``blkverify exercise --json`` prints it."""
        out = {k: v for k, v in self.__dict__.items() if k != "mismatches"}
        out["mismatches"] = [m.to_dict() for m in self.mismatches]
        return out


def _reproduce_command(
    spec: str | None,
    d: dict[str, Any],
    log: PathLike | None,
    replay: PathLike | None,
    format: str | None,
    timeout: float | None,
    queue_depth: int | None,
) -> str:
    """The command line that runs the same ops again."""
    words = ["blkverify", "exercise"]
    if log is not None or replay is not None:
        words += ["--replay", os.fspath(log if log is not None else replay)]  # type: ignore[arg-type]
        if spec is not None and log is None:
            words.append(spec)
    else:
        words += [
            d["spec"],
            "--seed",
            str(d["seed"]),
            "--ops",
            str(d["issued"]),
            "--mix",
            d["mix"],
            "--size-mix",
            d["size_mix"],
        ]
    if (log is None and replay is None) or queue_depth is not None:
        words += ["--queue-depth", str(d["queue_depth"])]
    if format is not None:
        words += ["-f", format]
    if timeout is not None:
        words += ["--timeout", f"{timeout:g}"]
    return shlex.join(words)


def exercise(
    spec: PathLike | None = None,
    *,
    ops: int | None = None,
    duration: float | None = None,
    seed: int | None = None,
    mix: str | dict[str, int] | None = None,
    size_mix: str | dict[int | str, int] | None = None,
    queue_depth: int | None = None,
    log: PathLike | None = None,
    replay: PathLike | None = None,
    format: str | None = None,
    timeout: float | None = None,
    verify: bool = True,
    backing: bool = True,
    max_backing_depth: int = _native.DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    progress: Callable[[int], None] | None = None,
) -> ExerciseResult:
    """Run a seeded random workload on the mirrored device ``spec``
    (``blkverify:RAW:TEST``; the test side may be an NBD URI) and check every read.

    ``ops`` (default 10000) or ``duration`` (seconds) bound the run; the same
    ``seed`` (default: random, reported) gives the same ops. ``mix`` weights the op
    kinds (``"read=60,write=25,zero=5,discard=5,flush=5"`` or a dict; kinds left
    out get 0), ``size_mix`` the request sizes (``"512=10,4k=35,...,4M=3"``: each
    SIZE=WEIGHT draws requests up to SIZE bytes). ``queue_depth`` ops are kept in
    flight (an op waits for any overlapping op unless both only read). ``log``
    writes the op log; ``replay`` runs a log's ops instead (``spec`` then
    defaults to the log's). ``verify`` checks the whole device after the last
    op. Stops at the first finding. Both sides are written, so run it on copies
    (or images you can recreate): a reproduction must start from the same
    contents.
    """
    if isinstance(mix, dict):
        mix = ",".join(f"{k}={v}" for k, v in mix.items())
    if isinstance(size_mix, dict):
        size_mix = ",".join(f"{k}={v}" for k, v in size_mix.items())
    spec_text = None if spec is None else os.fspath(spec)
    d = _native.exercise(
        spec_text,
        ops=ops,
        duration=duration,
        seed=seed,
        mix=mix,
        size_mix=size_mix,
        queue_depth=queue_depth,
        log=None if log is None else os.fspath(log),
        replay=None if replay is None else os.fspath(replay),
        format=format,
        timeout=timeout,
        verify=verify,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        progress=progress,
    )
    findings = [ExerciseFinding(**m) for m in d.pop("mismatches")]
    reproduce = _reproduce_command(spec_text, d, log, replay, format, timeout, queue_depth)
    return ExerciseResult(mismatches=findings, reproduce=reproduce, **d)
