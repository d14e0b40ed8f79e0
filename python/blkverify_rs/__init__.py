"""blkverify-rs: prove that a block driver returns the right bytes.

Open images of every format blkverify reads (raw, qcow2, vmdk, vpc, vhdx, vdi:
:func:`formats` lists them) and NBD exports with :func:`open`, mirror I/O to a
test image and a raw reference with ``open("blkverify:RAW:TEST")`` (a
:class:`Device` that raises :class:`MismatchError` at the first corrupt
sector), compare whole images with :func:`verify` and :func:`verify_many` (or
:func:`iter_verify_many`, one report at a time), hash
them with :func:`digest`, list or draw an image's allocation with :func:`map`
and :func:`map_html`, run a seeded workload with :func:`exercise`, serve the
mirrored device over NBD with :func:`serve` (recording a trace of a client's
requests), and :func:`replay` and :func:`shrink` a recorded run. The
heavy work runs in Rust with the GIL released. docs/python.md is the guide.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

from blkverify_rs import _native
from blkverify_rs._native import (
    DEFAULT_BACKING_DEPTH,
    DIGEST_ALGORITHMS,
    DIGESTS_FORMAT,
    MAX_QUEUE_DEPTH,
    ON_MISMATCH,
    SECTOR_SIZE,
    BlockDigests,
    CorruptImageError,
    Device,
    Error,
    FormatError,
    Image,
    MapExtent,
    MismatchError,
    Recording,
    check_pair,
    formats,
    is_nbd_uri,
    parse_size,
)

__version__: str = _native.__version__

__all__ = [
    "DEFAULT_BACKING_DEPTH",
    "DIGESTS_FORMAT",
    "DIGEST_ALGORITHMS",
    "MAX_QUEUE_DEPTH",
    "ON_MISMATCH",
    "SECTOR_SIZE",
    "BlockDigests",
    "BlockMismatch",
    "CorruptImageError",
    "Device",
    "Digest",
    "Error",
    "ExerciseFinding",
    "ExerciseResult",
    "FormatError",
    "Image",
    "MapExtent",
    "Mismatch",
    "MismatchError",
    "Recording",
    "ReplayFinding",
    "ReplayResult",
    "Report",
    "ServeFinding",
    "ServeSummary",
    "Server",
    "ShrinkResult",
    "__version__",
    "check_pair",
    "create",
    "digest",
    "exercise",
    "formats",
    "is_nbd_uri",
    "iter_verify_many",
    "map",
    "map_html",
    "open",
    "parse_size",
    "replay",
    "serve",
    "shrink",
    "verify",
    "verify_many",
]

PathLike = str | os.PathLike[str]


def open(
    path: PathLike | None = None,
    format: str | None = None,
    read_only: bool = True,
    snapshot: str | None = None,
    *,
    raw: PathLike | None = None,
    test: PathLike | None = None,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
    force_share: bool = False,
) -> Image | Device:
    """Open an image, or a mirrored blkverify device.

    ``path`` is an image file, or a ``blkverify:RAW:TEST`` spec (the raw path ends
    at the first colon after the prefix); for paths that contain colons, give
    ``raw=`` and ``test=`` instead. A spec returns a :class:`Device`: reads go to
    both sides and are compared (:class:`MismatchError` on a difference), writes,
    ``write_zeroes``, ``discard`` and ``flush`` go to both sides. ``format``,
    ``snapshot`` and the backing options apply to the test image; the raw side is
    always read as a raw image.

    ``format`` is one of ``formats(readable=True)`` or ``None`` to probe. ``read_only=False``
    opens for ``write``, ``write_zeroes``, ``discard`` and ``flush`` (formats blkverify
    cannot write, such as vmdk or vhdx, open read-only whatever it says); nothing is
    ever written otherwise. ``snapshot`` reads an internal qcow2 snapshot (by ID
    or name) instead of the active disk. ``backing=False`` reads unallocated
    ranges as zeros instead of following the backing chain, and
    ``allow_backing_anywhere`` follows backing files outside the image's directory.
    An image path (or the test side) may also be an NBD URI
    (``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``);
    ``timeout`` (seconds, default 30) bounds its connect and every request.

    Image files are locked as QEMU locks them, until :meth:`Image.close`: a
    qcow2 image another process (a VM, ``qemu-nbd``) has open for writing is
    refused, for writing and for reading, with QEMU's error (``OSError``,
    ``EAGAIN``: ``Failed to get "write" lock``); while we have a qcow2 open
    for writing, QEMU's tools are refused it. Raw images share writes, as in
    QEMU. ``force_share=True`` (``-U`` in qemu-img) reads an image anyway;
    it is refused with ``read_only=False``.
    """
    # The same options, whichever of the three ways the image is opened.
    options: dict[str, Any] = {
        "format": format,
        "read_only": read_only,
        "snapshot": snapshot,
        "backing": backing,
        "max_backing_depth": max_backing_depth,
        "allow_backing_anywhere": allow_backing_anywhere,
        "timeout": timeout,
        "force_share": force_share,
    }
    if raw is not None or test is not None:
        if path is not None or raw is None or test is None:
            raise ValueError("give either a path (or a blkverify:RAW:TEST spec) or raw= and test=")
        return _native.open_device(os.fspath(raw), os.fspath(test), **options)
    if path is None:
        raise ValueError("open() needs a path, a blkverify:RAW:TEST spec, or raw= and test=")
    return _native.open(os.fspath(path), **options)


def create(
    path: PathLike,
    size: int | None = None,
    format: str = "qcow2",
    cluster_size: int = 65536,
    backing: PathLike | None = None,
    backing_format: str | None = None,
    *,
    version: int = 3,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
) -> None:
    """Create a new ``raw`` or ``qcow2`` image of ``size`` bytes (replacing ``path``).

    qcow2 options mirror ``qemu-img create -o``: ``cluster_size``, ``version`` (2 for
    compat=0.10, 3 for compat=1.1), ``refcount_bits``, ``extended_l2``,
    ``lazy_refcounts``. With a ``backing`` file, ``size`` defaults to the backing
    file's size and ``backing_format`` to its probed format; the name is stored as
    given (relative names resolve against the new image's directory).
    """
    _native.create(
        os.fspath(path),
        size=size,
        format=format,
        cluster_size=cluster_size,
        backing=None if backing is None else os.fspath(backing),
        backing_format=backing_format,
        version=version,
        refcount_bits=refcount_bits,
        extended_l2=extended_l2,
        lazy_refcounts=lazy_refcounts,
    )


class _Record:
    """A small immutable record (a frozen dataclass without importing
    ``dataclasses``, which costs more start-up time than the rest of the package)."""

    __slots__ = ()
    _defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **values: Any) -> None:
        for name in self.__slots__:
            if name in values:
                value = values.pop(name)
            elif name in self._defaults:
                value = self._defaults[name]
                value = type(value)(value) if isinstance(value, (list, dict)) else value
            else:
                raise TypeError(f"{type(self).__name__}() missing argument: {name!r}")
            object.__setattr__(self, name, value)
        if values:
            raise TypeError(f"{type(self).__name__}() got unexpected arguments: {sorted(values)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.__slots__)

    def __hash__(self) -> int:
        return hash(tuple(repr(getattr(self, n)) for n in self.__slots__))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickle through __init__ (the default sets slots one by one, which
        # __setattr__ refuses): reports travel back from cluster workers.
        return (_rebuild, (type(self), {n: getattr(self, n) for n in self.__slots__}))

    def __repr__(self) -> str:
        fields = ", ".join(f"{n}={getattr(self, n)!r}" for n in self.__slots__)
        return f"{type(self).__name__}({fields})"

    # The --json keys in order; a key whose default is None is left out while
    # it is None. A record with other rules writes its own to_dict.
    _json: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """The record as the CLI's ``--json`` prints it."""
        out: dict[str, Any] = {}
        for name in self._json:
            value = getattr(self, name)
            if value is not None or self._defaults.get(name, 0) is not None:
                out[name] = value
        return out


def _rebuild(cls: type[_Record], values: dict[str, Any]) -> _Record:
    return cls(**values)


class Mismatch(_Record):
    """A run of consecutive mismatching 512-byte sectors."""

    __slots__ = ("error", "first_byte", "length", "mapping", "offset", "ref_mapping", "sector")
    _defaults: ClassVar[dict[str, Any]] = {"error": None, "mapping": None, "ref_mapping": None}
    sector: int
    offset: int
    length: int
    first_byte: int
    error: str | None
    # Where the first differing byte lives in the test image's metadata, and in
    # the reference's when it has metadata (is not raw).
    mapping: dict[str, Any] | None
    ref_mapping: dict[str, Any] | None
    _json = ("sector", "offset", "length", "first_byte", "error", "mapping", "ref_mapping")


class BlockMismatch(_Record):
    """A run of consecutive blocks whose digests differ from a block digests
    file's (a digest does not say which byte differs, so there is no
    ``first_byte``)."""

    __slots__ = ("block", "blocks", "error", "length", "mapping", "offset")
    _defaults: ClassVar[dict[str, Any]] = {"error": None, "mapping": None}
    block: int
    blocks: int
    offset: int
    length: int
    error: str | None
    mapping: dict[str, Any] | None
    _json = ("block", "blocks", "offset", "length", "error", "mapping")


class Report(_Record):
    """What :func:`verify` found. Against a block digests file, ``block_size``
    is set and the mismatches are :class:`BlockMismatch` runs."""

    # The fields, and those --json prints, are the native report's: one list
    # (ReportFields in src/python/verify.rs) for both sides.
    __slots__ = _native.REPORT_FIELDS
    _json = _native.REPORT_JSON_FIELDS
    _defaults: ClassVar[dict[str, Any]] = {
        "warnings": [],
        "mismatches": [],
        "block_size": None,
        "test_options": {},
        "range": None,
    }
    raw: str
    test: str
    raw_format: str
    test_format: str
    virtual_size: int
    raw_size: int
    test_size: int
    identical: bool
    bytes_compared: int
    elapsed_s: float
    truncated: bool
    warnings: list[str]
    mismatches: list[Mismatch] | list[BlockMismatch]
    range: tuple[int, int] | None
    """``(start, length)`` when the report covers part of the disk only."""
    block_size: int | None
    bytes_read: int
    # How verify opened TEST (format, snapshot, backing policy), so that
    # to_html draws the image verify read; not part of to_dict.
    test_options: dict[str, Any]

    def to_html(self, path: PathLike, progress: Callable[[int, int], None] | None = None) -> None:
        """Write the HTML map of the test image with every finding marked on it
        (see :func:`map_html`). The test image is opened again, as verify
        opened it, and its metadata walked once; unreadable metadata is drawn
        as such rather than raised."""
        from blkverify_rs import html_map

        html_map.write_report(self, os.fspath(path), progress=progress)

    def to_dict(self) -> dict[str, Any]:
        """The report as the CLI's ``--json`` prints it."""
        out = super().to_dict()
        out["warnings"] = list(self.warnings)
        out["mismatches"] = [m.to_dict() for m in self.mismatches]
        if self.range is not None:
            out["range"] = {"start": self.range[0], "length": self.range[1]}
        return out


def verify(
    raw: PathLike,
    test: PathLike,
    all: bool = False,
    *,
    raw_format: str | None = None,
    test_format: str | None = None,
    strict: bool = False,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
    start: int | str = 0,
    length: int | str | None = None,
    force_share: bool = False,
) -> Report:
    """Compare every guest sector of ``test`` with the reference ``raw``. Either
    side may be in any format blkverify reads (see :func:`formats`; probed unless
    ``raw_format``/``test_format`` say); the name ``raw`` is historical.

    Stops at the first mismatching sector unless ``all`` is true. A read error
    on the test side is a finding (a mismatch with ``error`` set); one on the
    reference side raises. ``progress(done, total)`` is called about ten times a
    second from the calling thread. ``force_share`` reads images that another
    process has open for writing (see :func:`open`).

    ``start`` and ``length`` (bytes, or sizes such as ``"1G"``) verify that
    range only (``length=None``: to the end). Both are multiples of 512, but a
    range may end where the disk does; the report's ``range`` says which bytes
    it covers. Reports of consecutive ranges merge into the whole-disk report
    (a cluster does that with large pairs, see :func:`verify_many`).

    ``raw`` may instead be a block digests file (written by :func:`digest` with
    ``blocks=``): recognised by its magic, or named with ``raw_format="digests"``.
    ``test`` is then hashed block by block, and the mismatches are the
    :class:`BlockMismatch` runs of blocks whose digests differ.
    """
    pair = {
        "raw": raw,
        "test": test,
        "raw_format": raw_format,
        "test_format": test_format,
        "snapshot": snapshot,
        "all": all,
        "strict": strict,
    }
    d = _native.verify(
        pair,
        progress=progress,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        threads=threads,
        start=start,
        length=length,
        force_share=force_share,
    )
    return _report(d)


def _report(d: dict[str, Any]) -> Report:
    d = dict(d)
    kind = Mismatch if d.get("block_size") is None else BlockMismatch
    mismatches = [kind(**m) for m in d.pop("mismatches")]
    return Report(mismatches=mismatches, **d)


class Digest(_Record):
    """An image's digest, as :func:`digest` computes it."""

    __slots__ = (
        "algorithm", "block_size", "bytes_read", "elapsed_s", "hexdigest", "image", "size",
        "warnings",
    )  # fmt: skip
    _defaults: ClassVar[dict[str, Any]] = {"warnings": []}
    image: str
    hexdigest: str
    algorithm: str
    block_size: int
    size: int
    bytes_read: int
    elapsed_s: float
    warnings: list[str]

    def to_dict(self) -> dict[str, Any]:
        """The digest as ``blkverify digest --json`` prints it."""
        return {
            "image": self.image,
            "digest": self.hexdigest,
            "algorithm": self.algorithm,
            "block_size": self.block_size,
            "size": self.size,
            "elapsed_s": self.elapsed_s,
        }


def digest(
    path: PathLike,
    format: str | None = None,
    *,
    algorithm: str = "sha256",
    threads: int = 0,
    blocks: PathLike | None = None,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    client: Any = None,
    split: int | str | None = None,
    scheduler_timeout: float = 30.0,
    force_share: bool = False,
) -> Digest:
    """The digest of the guest data of the image at ``path``: blkhash 0.11's
    construction, ``H(H(b1) || ... || H(bN) || le64(size))`` over 64 KiB blocks,
    what ``blksum`` prints. ``algorithm`` is ``"sha256"`` or ``"blake3"``.

    The image opens as :func:`open` opens it (``format``, ``snapshot``, the
    backing options, NBD URIs). Ranges it maps as zeros are not read. With
    ``blocks``, the block digests file is written there too (see
    :class:`BlockDigests`). ``progress(done, total)`` is called about ten times
    a second; the work runs on ``threads`` threads (0: one per core) with the
    GIL released. ``force_share=True`` (``-U``) reads an image another process
    has open for writing (see :func:`open`).

    With ``client`` (a ``distributed.Client``), the image (at a path every
    worker sees, or an NBD URI) is hashed on the Dask cluster's workers, in
    ranges of ``split`` bytes (a multiple of 64 KiB; default: the image split
    between the cluster's worker threads, 64 MiB to 64 GiB a range); only
    block digests come back, and the outer hash (and ``blocks``) is computed
    here, in order: the digest is the one hashing it here gives. ``threads``
    is then per task; a cluster without workers for ``scheduler_timeout``
    seconds raises ``TimeoutError``.
    """
    options = {
        "format": format,
        "snapshot": snapshot,
        "backing": backing,
        "max_backing_depth": max_backing_depth,
        "allow_backing_anywhere": allow_backing_anywhere,
        "timeout": timeout,
        "algorithm": algorithm,
        "threads": threads,
        "force_share": force_share,
    }
    blocks = None if blocks is None else os.fspath(blocks)
    if client is None:
        d = _native.digest(os.fspath(path), progress=progress, blocks=blocks, **options)
    else:
        from blkverify_rs import cluster

        d = cluster.digest(
            client,
            os.fspath(path),
            options,
            split=split,
            timeout=scheduler_timeout,
            blocks=blocks,
            progress=progress,
        )
    d["hexdigest"] = d.pop("digest")
    return Digest(**d)


def verify_many(
    pairs: Iterable[tuple[PathLike, PathLike] | Mapping[str, Any]],
    all: bool = False,
    *,
    strict: bool = False,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    threads: int = 0,
    progress: Callable[[int, int, int, int], None] | None = None,
    client: Any = None,
    split: int | str = 64 << 30,
    scheduler_timeout: float = 30.0,
    force_share: bool = False,
) -> list[Report | Exception]:
    """Verify many pairs at once, within one core budget (``threads`` in all,
    0: one per core): pairs run side by side and share the worker threads.

    ``pairs`` holds ``(raw, test)`` tuples or dicts with ``raw``, ``test`` and
    optionally ``raw_format``, ``test_format``, ``snapshot``, ``all``,
    ``strict`` (``all`` and ``strict`` default to the arguments of the same
    name) and ``workers`` (or ``raw_workers`` and ``test_workers``). A
    malformed pair raises ``ValueError`` (see
    :func:`check_pair`) before anything runs.

    With ``client`` (a ``distributed.Client``; ``pip install
    "blkverify-rs[dask]"``) each pair runs as tasks on the Dask cluster's
    workers, which must see its paths (give them absolute). A pair's
    ``workers`` (names, addresses or hosts) pin it to the workers that can; if
    none of them is in the cluster, or all have been gone for
    ``scheduler_timeout`` seconds (a worker restarted under its name keeps its
    pairs), that pair ends with an error, as do all pairs left if the cluster
    has no worker for that long. A pair with ``raw_workers`` and
    ``test_workers`` has its sides hashed where each lives (block digests in
    ranges of ``split`` bytes, compared here: the report is that of
    :func:`verify` against the raw side's block digests file); without
    ``client`` those pins mean nothing. A pair larger than
    ``split`` bytes (a multiple of 64 KiB; default 64 GiB) is verified as
    ranges of that size on as many workers and merged into the report one
    verify gives. ``threads`` is then per task (0: the host's cores split
    between the task slots of all the workers on the host).

    Returns one item per pair, in order: its :class:`Report`, or, when the pair
    could not be verified (an image that cannot be opened, a reference read
    error), the exception :func:`verify` would have raised, as a value
    (``bv.Error`` or ``OSError``): one bad pair never hides the others' results.
    ``progress(done, total, pairs_done, pairs_total)`` is called about ten times
    a second. Ctrl-C raises ``KeyboardInterrupt``. ``force_share`` applies to
    every pair, as in :func:`verify`. The list holds every report: for many
    pairs, :func:`iter_verify_many` gives them one by one instead.
    """
    return list(
        iter_verify_many(
            list(pairs),
            all,
            strict=strict,
            backing=backing,
            max_backing_depth=max_backing_depth,
            allow_backing_anywhere=allow_backing_anywhere,
            threads=threads,
            progress=progress,
            client=client,
            split=split,
            scheduler_timeout=scheduler_timeout,
            force_share=force_share,
        )
    )


def iter_verify_many(
    pairs: Iterable[tuple[PathLike, PathLike] | Mapping[str, Any]],
    all: bool = False,
    *,
    strict: bool = False,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    threads: int = 0,
    progress: Callable[[int, int, int, int], None] | None = None,
    client: Any = None,
    split: int | str = 64 << 30,
    scheduler_timeout: float = 30.0,
    force_share: bool = False,
) -> Iterator[Report | Exception]:
    """:func:`verify_many`, one result at a time: yields each pair's
    :class:`Report` (or its exception, as a value) in order, as soon as it and
    the pairs before it are done, in memory and file descriptors that do not
    grow with the number of pairs. The arguments are :func:`verify_many`'s.

    Only the pairs being verified are open (no more at once than the
    open-file limit, ``ulimit -n``, leaves room for: when that is fewer than
    the threads would run, a ``RuntimeWarning`` says so, once), and at most
    1,024 pairs are read ahead of the one yielded: a pair that takes long
    holds back the results after it (see docs/batch.md). ``pairs`` is read
    as it is consumed; when it can be read twice (a list, or any iterable
    that is not its own iterator), a first pass checks every pair
    (``ValueError`` before anything runs) and takes the progress total from
    the files' sizes, corrected as each pair opens. A one-shot iterator (a
    generator) is read once: a malformed pair then raises when its turn
    comes, after the results of the pairs before it, and the progress totals
    count the pairs read so far. Stop early by closing the iterator (or
    dropping it): the pairs being verified are cancelled.
    """
    options = {
        "all": all,
        "strict": strict,
        "backing": backing,
        "max_backing_depth": max_backing_depth,
        "allow_backing_anywhere": allow_backing_anywhere,
        "threads": threads,
        "force_share": force_share,
    }
    pairs_total = total = None
    if not isinstance(pairs, Iterator):  # it can be read twice: a first pass
        pairs_total, total = _native.scan_pairs(pairs)
    if client is None:
        stream = _native.verify_stream(
            pairs, progress=progress, pairs_total=pairs_total, total=total, **options
        )
        return _reports(stream)
    from blkverify_rs import cluster

    return _reports(
        cluster.iter_verify_many(
            client,
            (_pair_dict(p) for p in pairs),
            options,
            split=split,
            timeout=scheduler_timeout,
            progress=progress,
            pairs_total=pairs_total,
            total=total,
        )
    )


def _reports(results: Iterator[dict[str, Any] | BaseException]) -> Iterator[Report | Exception]:
    """Report dicts as :class:`Report` (exceptions as they are); closing this
    closes ``results``."""
    try:
        for r in results:
            yield r if isinstance(r, BaseException) else _report(r)
    finally:
        close = getattr(results, "close", None)
        if close is not None:
            close()


def _pair_dict(pair: tuple[PathLike, PathLike] | Mapping[str, Any]) -> dict[str, Any]:
    """A pair checked (``ValueError`` as :func:`check_pair` says) and made a
    dict of plain values, to travel to another process."""
    check_pair(pair)
    d = dict(pair) if isinstance(pair, Mapping) else {"raw": pair[0], "test": pair[1]}
    d = {k: v for k, v in d.items() if v is not None}
    d["raw"], d["test"] = os.fspath(d["raw"]), os.fspath(d["test"])
    for key in ("workers", "raw_workers", "test_workers"):
        if key in d:
            d[key] = [str(w) for w in d[key]]
    return d


def map(
    path: PathLike,
    format: str | None = None,
    *,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    force_share: bool = False,
) -> list[MapExtent]:
    """The allocation map of the whole image at ``path``, as ``qemu-img map``
    gives it: a list of :class:`MapExtent` in guest order, neighbours that
    agree (kind, depth, file and, for data, a contiguous host range) merged.

    A ``MapExtent`` is immutable, with ``offset``, ``length``, ``kind``
    (``data``, ``compressed``, ``zero`` or ``unallocated``: what the metadata
    of the layer that answers says), ``depth`` (that layer: 0 the image, 1 its
    backing file...; for ``unallocated``, the deepest layer asked),
    ``host_offset`` (where a data range's first byte is stored in ``file``,
    else None) and ``file`` (the file holding a data range's bytes: the image,
    its external data file; else the image at ``depth``); ``to_dict()`` gives
    the ``--json`` object.

    The image is opened read-only as :func:`open` opens it (the backing
    policy applies) and only its metadata is read, once. Unreadable metadata
    raises :class:`CorruptImageError`. ``progress(done, total)`` is called now
    and then; Ctrl-C raises ``KeyboardInterrupt``. ``force_share=True``
    (``-U``) reads an image another process has open for writing (see
    :func:`open`).
    """
    return _native.map(
        os.fspath(path),
        progress=progress,
        format=format,
        snapshot=snapshot,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        timeout=timeout,
        force_share=force_share,
    )


def map_html(
    path: PathLike,
    out: PathLike,
    format: str | None = None,
    *,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = DEFAULT_BACKING_DEPTH,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    force_share: bool = False,
) -> None:
    """Write ``out``: one self-contained HTML page drawing the guest address
    space of the image at ``path``, coloured by mapping kind, with a legend
    (bytes and share per kind), the image's facts and a scale. The image is
    opened as :func:`map` opens it. docs/map.md describes the page."""
    from blkverify_rs import html_map

    html_map.write_image(
        os.fspath(path),
        os.fspath(out),
        progress=progress,
        format=format,
        snapshot=snapshot,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        timeout=timeout,
        force_share=force_share,
    )


# The exercise workload's API is imported on first use: it needs dataclasses,
# and `import blkverify_rs` stays light for the CLI's start-up.
_LAZY = {
    "exercise": "blkverify_rs.exercise_api",
    "ExerciseFinding": "blkverify_rs.exercise_api",
    "ExerciseResult": "blkverify_rs.exercise_api",
    "replay": "blkverify_rs.replay_api",
    "ReplayFinding": "blkverify_rs.replay_api",
    "ReplayResult": "blkverify_rs.replay_api",
    "shrink": "blkverify_rs.shrink",
    "ShrinkResult": "blkverify_rs.shrink",
    "serve": "blkverify_rs.serve_api",
    "Server": "blkverify_rs.serve_api",
    "ServeFinding": "blkverify_rs.serve_api",
    "ServeSummary": "blkverify_rs.serve_api",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blkverify_rs' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
