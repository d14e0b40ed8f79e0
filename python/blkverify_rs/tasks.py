"""Units of work that run the same in this process or on a cluster's worker.

Each is a plain function over paths and options that pickle: a pair as
:func:`blkverify_rs.check_pair` takes it, and a dict of the keyword options
``verify`` takes (``backing``, ``threads``, ...). Each returns plain values
that pickle too: a report dict as the native ``verify`` makes it, or the
exception verifying the pair raised, as a value (``bv.Error``, ``OSError``,
``ValueError``), so that one pair's failure is that pair's result and never a
failed task. Nothing here knows Dask: :mod:`blkverify_rs.cluster` sends these
functions to workers, and a caller may as well run them here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from blkverify_rs import _native

# What verifying a pair may raise for that pair alone (a bad image, a file
# that cannot be opened, a range the disk does not have).
PAIR_ERRORS = (_native.Error, OSError, ValueError, OverflowError)


def verify_range(
    pair: Mapping[str, Any],
    options: Mapping[str, Any],
    start: int = 0,
    length: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | BaseException:
    """Verify ``length`` bytes of ``pair`` from ``start`` (``None``: to the end).

    The whole disk gives the report ``verify`` gives; a range gives a report
    with ``range`` set, for :func:`merge` to join with its neighbours.
    """
    try:
        return _native.verify(pair, progress=progress, start=start, length=length, **options)
    except PAIR_ERRORS as exc:
        return exc


def verify_pairs(
    pairs: list[Mapping[str, Any]],
    options: Mapping[str, Any],
    split: int,
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any] | BaseException]:
    """Verify each of ``pairs`` in turn, in one task (each opened once, and
    closed before the next): its report, or, for a disk larger than
    ``split`` bytes, the report of its first ``split`` bytes (``range`` set:
    the caller verifies the other ranges and merges them), or its error.
    ``progress(done, total)`` counts the bytes done over all the pairs."""
    results: list[dict[str, Any] | BaseException] = []
    before = 0
    for pair in pairs:
        each = None
        if progress is not None:

            def each(done: int, total: int, before: int = before) -> None:
                progress(before + done, total)

        try:
            result = _native.verify(pair, progress=each, split=split, **options)
        except PAIR_ERRORS as exc:
            results.append(exc)
            continue
        results.append(result)
        span = result.get("range")
        before += int(span[1]) if span is not None else int(result["virtual_size"])
    return results


# The options that open an image (of those a batch passes its tasks).
OPEN_KEYS = (
    "backing",
    "max_backing_depth",
    "allow_backing_anywhere",
    "timeout",
    "force_share",
)


def side_options(pair: Mapping[str, Any], side: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that open ``side`` (``"raw"`` or ``"test"``) of ``pair`` as
    verifying it would: its format, the snapshot (test side), the backing
    policy, and the threads to hash with."""
    out = {k: options[k] for k in OPEN_KEYS if options.get(k) is not None}
    out["format"] = pair.get(f"{side}_format")
    if side == "test":
        out["snapshot"] = pair.get("snapshot")
    out["threads"] = options.get("threads", 0)
    return out


def digest_span(
    path: str,
    options: Mapping[str, Any],
    first: int,
    end: int,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any] | BaseException:
    """The block digests of blocks ``[first, end)`` of the image at ``path``
    (see the native ``digest_span``; ``first == end`` just opens it), or the
    error, as a value."""
    try:
        return _native.digest_span(path, first, end, progress=progress, **options)
    except PAIR_ERRORS as exc:
        return exc


def probe_sides(
    items: list[tuple[str, dict[str, Any]]], options: Mapping[str, Any]
) -> list[dict[str, Any] | BaseException]:
    """Open each ``(path, open options)`` of ``items``, in one task: its size
    and format, or the error opening it gives. ``options`` is unused (the
    items carry their own): it keeps the task functions' shape."""
    del options
    return [digest_span(path, opts, 0, 0) for path, opts in items]


def locate(
    path: str, options: Mapping[str, Any], offsets: list[int]
) -> list[dict[str, Any] | None]:
    """Where each of ``offsets`` lives in the metadata of the image at
    ``path`` (the mapping a report gives a finding), opened with ``options``
    (those of :func:`side_options`); best effort, as a report's mappings are:
    an image that no longer opens gives none."""
    opts = {k: v for k, v in options.items() if k in ("format", "snapshot", *OPEN_KEYS)}
    try:
        with _native.open(path, **opts) as image:
            return [image.locate(o) if o < image.size else None for o in offsets]
    except PAIR_ERRORS:
        return [None] * len(offsets)


def check_spans(
    pair: Mapping[str, Any],
    raw: Mapping[str, Any],
    test: Mapping[str, Any],
    raw_spans: list[dict[str, Any] | BaseException],
    test_spans: list[dict[str, Any] | BaseException],
    options: Mapping[str, Any],
) -> dict[str, Any] | BaseException:
    """The report of ``pair`` from its sides' block spans, hashed where each
    side lives: the report ``verify`` gives against the raw side's block
    digests file. ``raw`` and ``test`` are the sides' probes (size, format).
    A span that failed is the pair's error (the raw side's first)."""
    for span in [*raw_spans, *test_spans]:
        if isinstance(span, BaseException):
            return span
    flags = {}
    for key in ("all", "strict"):
        value = pair.get(key)
        flags[key] = bool(options.get(key, False) if value is None else value)
    try:
        report = _native.check_spans(
            raw_spans,
            test_spans,
            raw=pair["raw"],
            test=pair["test"],
            raw_format=raw["format"],
            test_format=test["format"],
            raw_size=raw["size"],
            test_size=test["size"],
            algorithm=raw["algorithm"],
            **flags,
        )
    except PAIR_ERRORS as exc:
        return exc
    report["bytes_read"] = sum(int(s["bytes_read"]) for s in [*raw_spans, *test_spans])
    report["warnings"] = [*raw["warnings"], *test["warnings"], *report["warnings"]]
    return report


def merge(
    pair: Mapping[str, Any], parts: list[dict[str, Any] | BaseException], options: Mapping[str, Any]
) -> dict[str, Any] | BaseException:
    """One report from the outcomes of ``pair``'s consecutive ranges, in
    guest order: the report verifying the whole pair gives (``elapsed_s`` and
    ``bytes_read`` aside), or the error that decides it. The pair's own
    ``all`` and ``strict`` win over ``options``'."""
    flags = {}
    for key in ("all", "strict"):
        value = pair.get(key)
        flags[key] = bool(options.get(key, False) if value is None else value)
    try:
        return _native.merge_reports(parts, **flags)
    except PAIR_ERRORS as exc:
        return exc
