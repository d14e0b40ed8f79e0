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


def probe_pair(
    pair: Mapping[str, Any], options: Mapping[str, Any]
) -> dict[str, Any] | BaseException:
    """Open ``pair`` as verifying it would, and compare nothing: the (empty)
    range's report names the formats and sizes, and a pair that cannot be
    opened gives the very error verifying it would."""
    return verify_range(pair, options, start=0, length=0)


def probe_pairs(
    pairs: list[Mapping[str, Any]], options: Mapping[str, Any]
) -> list[dict[str, Any] | BaseException]:
    """:func:`probe_pair` for each of ``pairs``, in one task."""
    return [probe_pair(pair, options) for pair in pairs]


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
