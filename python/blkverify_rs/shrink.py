"""Shrink a failing record (a ``serve --trace`` trace or an ``exercise --log``
op log) to a minimal failing one: the smallest subsequence of its requests
that still gives a finding of the same kind (``contents`` or
``return_value``). The sector may move: a lost write found by a later read in
the full record is found by the final check in the shrunk one, which is the
point.

Each trial replays a subset, in the record's order and with the ops' own
numbers (a log's write keeps its bytes, a trace's write its data), at queue
depth 1, from the images as they were: on copy-on-write overlays of the image
files (never written, never copied), and for an NBD test side on a fresh one
that a test command serves for each trial (``test_command``, see
``blkverify_rs.test_side``). After the subset's last op, both sides are
flushed and every range its ops wrote or read is read back and compared; when
only the whole device's verify finds the difference (a write that landed
elsewhere), every trial verifies the whole device instead.

Trials are cheap, and ordered so that most are spent where they pay:

1. the requests after the one that found the difference are dropped (nothing
   after it ran);
2. one trial without the requests that change nothing (reads, block status,
   cache, flushes), the finding's own request kept; then without reads only;
3. one trial with only the requests that wrote the range the finding was
   read from (and the finding's request);
4. Zeller's ddmin on what is left, which makes the result 1-minimal: without
   any one of its requests the failure goes away.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from blkverify_rs import _native
from blkverify_rs._native import Error
from blkverify_rs.replay_api import ReplayFinding, replay_once, resolve_spec

T = TypeVar("T")


@dataclass(frozen=True)
class ShrinkResult:
    """What :func:`shrink` found: the minimal record it wrote (``log``: its
    path, an op log or a trace as the input was, ``kind``), how many ops it
    kept of how many, the trials it took, and the finding it still gives."""

    log: str
    kind: str
    ops_before: int
    ops_after: int
    trials: int
    elapsed_s: float
    finding: ReplayFinding
    reproduce: str

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "finding"}
        out["finding"] = self.finding.to_dict()
        return out


def shrink(
    record: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: str | os.PathLike[str] | None = None,
    *,
    format: str | None = None,
    test_command: str | None = None,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShrinkResult:
    """Shrink the failing record ``record`` into ``out`` (the same format);
    see the module docstring.

    ``spec`` names the images as they were before the failing run
    (``blkverify:RAW:TEST``; default: an op log's own): they are only read.
    An NBD test side cannot be reset by us: give ``test_command``, run for
    each trial to serve a fresh one, and ``spec`` is then the raw reference
    alone. ``progress(trials, ops)`` is called after each trial.
    """
    started = time.monotonic()
    record_path, out_path = os.fspath(record), os.fspath(out)
    recording = _native.Recording(record_path)
    device = resolve_spec(recording, spec, test_command)
    if test_command is None:
        # The TEST part as written (a path would fold a URI's "//").
        test = device.split(":", 2)[2]
        if _native.is_nbd_uri(test):
            raise ValueError(
                f"{test}: shrinking replays each trial from the images as they were, and an "
                "NBD export cannot be reset between trials: give a test command that "
                "serves a fresh one (--test-command)"
            )
    ops: list[tuple[Any, ...]] = recording.ops()
    trials = 0
    check = "touched"

    def attempt(positions: list[int]) -> ReplayFinding | None:
        nonlocal trials
        trials += 1
        d = replay_once(
            recording,
            device,
            test_command,
            trial=trials,
            positions=positions,
            queue_depth=1,
            final_check=check,
            format=format,
            timeout=timeout,
        )
        if progress is not None:
            progress(trials, len(positions))
        return ReplayFinding(**d["mismatches"][0]) if d["mismatches"] else None

    everything = list(range(len(ops)))
    first = attempt(everything)
    if first is None:
        check = "whole"
        first = attempt(everything)
    if first is None:
        raise Error(
            f"{record_path}: replaying it on {device} from the images as they are (queue "
            "depth 1) finds nothing, so there is nothing to shrink"
        )

    def fails(positions: list[int]) -> bool:
        found = attempt(positions)
        return found is not None and found.kind == first.kind

    kept = everything
    culprit = None
    if first.op_number is not None:
        # Nothing after the failing op ran.
        culprit = next(i for i, op in enumerate(ops) if op[0] == first.op_number)
        kept = everything[: culprit + 1]

    def without(drop: Callable[[int], bool]) -> list[int]:
        return [p for p in kept if p == culprit or not drop(p)]

    for drop in (
        lambda p: not ops[p][4],  # every op that changes nothing
        lambda p: ops[p][1].startswith(("read ", "cache ", "block_status ")),
    ):
        smaller = without(drop)
        if len(smaller) < len(kept) and fails(smaller):
            kept = smaller
            break
    if culprit is not None and ops[culprit][1] != "flush":
        start, end = ops[culprit][2], ops[culprit][2] + ops[culprit][3]
        focused = without(
            lambda p: not (ops[p][4] and ops[p][2] < end and start < ops[p][2] + ops[p][3])
        )
        if len(focused) < len(kept) and fails(focused):
            kept = focused
    minimal = _ddmin(kept, fails)
    final = attempt(minimal)
    if final is None:  # a flaky driver: the last subset no longer fails
        raise Error(f"{record_path}: the failure is not reproducible; shrinking stopped")
    comments = [f"finding: {final.message}"]
    written_spec = device if test_command is None else None
    recording.write(out_path, minimal, comments, written_spec)
    words = ["blkverify", "replay", out_path, device]
    if test_command is not None:
        words += ["--test-command", test_command]
    if format is not None:
        words += ["-f", format]
    return ShrinkResult(
        log=out_path,
        kind=recording.kind,
        ops_before=len(ops),
        ops_after=len(minimal),
        trials=trials,
        elapsed_s=time.monotonic() - started,
        finding=final,
        reproduce=shlex.join(words),
    )


def _ddmin(items: list[T], fails: Callable[[list[T]], bool]) -> list[T]:
    """Zeller's ddmin: a 1-minimal failing subsequence of ``items`` (which fails)."""
    if not items:
        return items
    if fails([]):
        return []
    n = 2
    while len(items) >= 2:
        size = -(-len(items) // n)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        for chunk in chunks:
            if fails(chunk):
                items, n = chunk, 2
                break
        else:
            for i in range(len(chunks)):
                rest = [x for j, c in enumerate(chunks) if j != i for x in c]
                if fails(rest):
                    items, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(items):
                    break
                n = min(len(items), 2 * n)
    return items
