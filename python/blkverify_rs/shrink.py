"""Shrink a failing op log to a minimal failing sequence (delta debugging).

Each trial replays a subset of the log's ops, in their order and with their
original op numbers (so every write keeps its bytes), on fresh copies of the
images, at queue depth 1, and keeps the subset if it still ends in a finding of
the same kind (``contents`` or ``return_value``). The sector may move: a lost
write found by a later read in the full log is found by the final verify in the
shrunk one, which is the point. The result is 1-minimal: removing any one op
makes the failure go away.

The copies sit next to the originals (hidden names, removed afterwards), so a
qcow2's relative backing file name still resolves; the originals are only ever
read. Each trial copies both images, so shrinking suits small images; an NBD
test side cannot be restored by us and is refused.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from blkverify_rs import _native
from blkverify_rs._native import Error
from blkverify_rs.exercise_api import ExerciseFinding, exercise

T = TypeVar("T")


@dataclass(frozen=True)
class ShrinkResult:
    """What :func:`shrink` found: the minimal log it wrote and its finding."""

    log: str
    ops_before: int
    ops_after: int
    trials: int
    finding: ExerciseFinding
    reproduce: str

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if k != "finding"}
        out["finding"] = self.finding.to_dict()
        return out


def shrink(
    log: str | os.PathLike[str],
    out: str | os.PathLike[str],
    spec: str | None = None,
    *,
    format: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ShrinkResult:
    """Shrink the failing op log ``log`` into ``out``; see the module docstring.

    ``spec`` (default: the log's) names the images as they were before the
    failing run; they are copied for each trial and never written.
    ``progress(trials, ops)`` is called after each trial.
    """
    import shlex

    log_path, out_path = Path(log), Path(out)
    recorded = _native.read_log(log_path)
    ops: list[tuple[int, str]] = recorded["ops"]
    if spec is None:
        spec = recorded["spec"]
    sides = None if spec is None else _native.parse_spec(spec)
    if sides is None:
        raise ValueError(f"{log_path}: shrinking needs a blkverify:RAW:TEST spec")
    raw, test = (Path(p) for p in sides)
    if str(test).startswith("nbd"):
        raise ValueError(
            f"{test}: shrinking replays on fresh copies of the images, and an NBD export "
            "cannot be copied; shrink on image files"
        )
    for side in (raw, test):
        if not side.is_file():
            raise FileNotFoundError(2, "shrinking needs the image file to copy", str(side))
    tag = f".blkverify-shrink-{os.getpid()}-"
    raw_copy = raw.with_name(tag + raw.name)
    test_copy = test.with_name(tag + test.name)
    trial_log = out_path.with_name(tag + out_path.name)
    trial_spec = _native.make_spec(str(raw_copy), str(test_copy))
    trials = 0

    def log_of(subset: list[tuple[int, str]], spec: str | None) -> dict[str, Any]:
        """The log to replay: the recorded seed and size, queue depth 1."""
        return {**recorded, "queue_depth": 1, "spec": spec, "ops": subset}

    def attempt(subset: list[tuple[int, str]]) -> ExerciseFinding | None:
        nonlocal trials
        trials += 1
        shutil.copyfile(raw, raw_copy)
        shutil.copyfile(test, test_copy)
        _native.write_log(trial_log, log_of(subset, None))
        result = exercise(trial_spec, replay=trial_log, format=format)
        if progress is not None:
            progress(trials, len(subset))
        return result.mismatches[0] if result.mismatches else None

    try:
        first = attempt(ops)
        if first is None:
            raise Error(
                f"{log_path}: replaying the log on fresh copies of {raw} and {test} "
                "(queue depth 1) finds nothing, so there is nothing to shrink"
            )
        if first.op_number is not None:
            # Nothing after the failing op ran; drop it all at once.
            cut = next(i for i, (number, _) in enumerate(ops) if number == first.op_number)
            ops_run = ops[: cut + 1]
        else:
            ops_run = ops

        def fails(subset: list[tuple[int, str]]) -> bool:
            found = attempt(subset)
            return found is not None and found.kind == first.kind

        minimal = _ddmin(ops_run, fails)
        final = attempt(minimal)
        if final is None:  # a flaky driver: the last subset no longer fails
            raise Error(f"{log_path}: the failure is not reproducible; shrinking stopped")
        _native.write_log(out_path, log_of(minimal, spec), [f"finding: {final.message}"])
    finally:
        for p in (raw_copy, test_copy, trial_log):
            p.unlink(missing_ok=True)
    reproduce = shlex.join(["blkverify", "exercise", "--replay", str(out_path)])
    return ShrinkResult(
        log=str(out_path),
        ops_before=len(ops),
        ops_after=len(minimal),
        trials=trials,
        finding=final,
        reproduce=reproduce,
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
