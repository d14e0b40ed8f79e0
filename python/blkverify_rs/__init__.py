"""blkverify-rs: prove that a block driver returns the right bytes.

Open qcow2 and raw images with :func:`open`, mirror I/O to a test image and a raw
reference with ``open("blkverify:RAW:TEST")`` (a :class:`Device` that raises
:class:`MismatchError` at the first corrupt sector), and compare whole images with
:func:`verify`. The heavy work runs in Rust with the GIL released.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from blkverify_rs import _native
from blkverify_rs._native import (
    CorruptImageError,
    Device,
    Error,
    FormatError,
    Image,
    MismatchError,
)
from blkverify_rs.shrink import ShrinkResult, shrink

__version__: str = _native.__version__

__all__ = [
    "CorruptImageError",
    "Device",
    "Error",
    "ExerciseFinding",
    "ExerciseResult",
    "FormatError",
    "Image",
    "Mismatch",
    "MismatchError",
    "Report",
    "ShrinkResult",
    "__version__",
    "create",
    "exercise",
    "open",
    "shrink",
    "verify",
]

PathLike = str | os.PathLike[str]

SECTOR_SIZE = 512


BLKVERIFY_PREFIX = "blkverify:"


def open(
    path: PathLike | None = None,
    format: str | None = None,
    read_only: bool = True,
    snapshot: str | None = None,
    *,
    raw: PathLike | None = None,
    test: PathLike | None = None,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
) -> Image | Device:
    """Open an image, or a mirrored blkverify device.

    ``path`` is an image file, or a ``blkverify:RAW:TEST`` spec (the raw path ends
    at the first colon after the prefix); for paths that contain colons, give
    ``raw=`` and ``test=`` instead. A spec returns a :class:`Device`: reads go to
    both sides and are compared (:class:`MismatchError` on a difference), writes,
    ``write_zeroes``, ``discard`` and ``flush`` go to both sides. ``format``,
    ``snapshot`` and the backing options apply to the test image; the raw side is
    always read as a raw image.

    ``format`` is ``"raw"``, ``"qcow2"`` or ``None`` to probe. ``read_only=False``
    opens for ``write``, ``write_zeroes``, ``discard`` and ``flush``; nothing is
    ever written otherwise. ``snapshot`` reads an internal qcow2 snapshot (by ID
    or name) instead of the active disk. ``backing=False`` reads unallocated
    ranges as zeros instead of following the backing chain, and
    ``allow_backing_anywhere`` follows backing files outside the image's directory.
    An image path (or the test side) may also be an NBD URI
    (``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``);
    ``timeout`` (seconds, default 30) bounds its connect and every request.
    """
    if raw is not None or test is not None:
        if path is not None or raw is None or test is None:
            raise ValueError("give either a path (or a blkverify:RAW:TEST spec) or raw= and test=")
        return _native.open_device(
            raw=os.fspath(raw),
            test=os.fspath(test),
            format=format,
            read_only=read_only,
            snapshot=snapshot,
            backing=backing,
            max_backing_depth=max_backing_depth,
            allow_backing_anywhere=allow_backing_anywhere,
            timeout=timeout,
        )
    if path is None:
        raise ValueError("open() needs a path, a blkverify:RAW:TEST spec, or raw= and test=")
    spec = os.fspath(path)
    if isinstance(spec, str) and spec.startswith(BLKVERIFY_PREFIX):
        return _native.open_device(
            spec,
            format=format,
            read_only=read_only,
            snapshot=snapshot,
            backing=backing,
            max_backing_depth=max_backing_depth,
            allow_backing_anywhere=allow_backing_anywhere,
            timeout=timeout,
        )
    return _native.open(
        spec,
        format=format,
        read_only=read_only,
        snapshot=snapshot,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        timeout=timeout,
    )


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


@dataclass(frozen=True)
class Mismatch:
    """A run of consecutive mismatching 512-byte sectors."""

    sector: int
    offset: int
    length: int
    first_byte: int
    error: str | None = None
    mapping: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "sector": self.sector,
            "offset": self.offset,
            "length": self.length,
            "first_byte": self.first_byte,
        }
        if self.error is not None:
            out["error"] = self.error
        if self.mapping is not None:
            out["mapping"] = self.mapping
        return out


@dataclass(frozen=True)
class Report:
    """What :func:`verify` found."""

    raw: str
    test: str
    raw_format: str
    test_format: str
    virtual_size: int
    raw_size: int
    test_size: int
    identical: bool
    bytes_compared: int
    bytes_read: int
    elapsed_s: float
    truncated: bool
    warnings: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as the CLI's ``--json`` prints it."""
        return {
            "raw": self.raw,
            "test": self.test,
            "raw_format": self.raw_format,
            "test_format": self.test_format,
            "virtual_size": self.virtual_size,
            "raw_size": self.raw_size,
            "test_size": self.test_size,
            "identical": self.identical,
            "bytes_compared": self.bytes_compared,
            "elapsed_s": self.elapsed_s,
            "truncated": self.truncated,
            "warnings": list(self.warnings),
            "mismatches": [m.to_dict() for m in self.mismatches],
        }


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
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    threads: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Compare every guest sector of ``test`` with the raw reference ``raw``.

    Stops at the first mismatching sector unless ``all`` is true. A read error
    on the test side is a finding (a mismatch with ``error`` set); one on the
    reference side raises. ``progress(done, total)`` is called about ten times a
    second from the calling thread.
    """
    d = _native.verify(
        os.fspath(raw),
        os.fspath(test),
        all=all,
        strict=strict,
        raw_format=raw_format,
        test_format=test_format,
        snapshot=snapshot,
        backing=backing,
        max_backing_depth=max_backing_depth,
        allow_backing_anywhere=allow_backing_anywhere,
        threads=threads,
        progress=progress,
    )
    mismatches = [Mismatch(**m) for m in d.pop("mismatches")]
    return Report(mismatches=mismatches, **d)


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
    max_backing_depth: int = 16,
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
    flight (never two that overlap). ``log`` writes the op log; ``replay`` runs a
    log's ops instead (``spec`` then defaults to the log's). ``verify`` checks the
    whole device after the last op. Stops at the first finding. Both sides are
    written, so run it on copies (or images you can recreate): a reproduction
    must start from the same contents.
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
