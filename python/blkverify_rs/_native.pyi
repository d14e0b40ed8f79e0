"""Type stubs for the native module (kept in step with src/python/mod.rs)."""

from collections.abc import Callable
from typing import Any

__version__: str
READABLE_FORMATS: list[str]

class Error(Exception): ...
class FormatError(Error): ...
class CorruptImageError(Error): ...

class MismatchError(Error):
    op: str
    offset: int
    length: int
    sector: int | None
    first_byte: int | None
    test_ret: int | None
    raw_ret: int | None

class Image:
    @property
    def size(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buf: Any) -> int: ...
    def map(
        self, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, str, int | None]]: ...
    def locate(self, offset: int) -> dict[str, Any] | None: ...
    def info(self) -> dict[str, str]: ...
    @property
    def read_only(self) -> bool: ...
    def write(self, offset: int, data: Any) -> int: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Image: ...
    def __exit__(self, _exc_type: Any, _exc: Any, _tb: Any) -> bool: ...

class Device:
    @property
    def size(self) -> int: ...
    @property
    def format(self) -> str: ...
    @property
    def test_format(self) -> str: ...
    @property
    def raw(self) -> str: ...
    @property
    def test(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def closed(self) -> bool: ...
    @property
    def read_only(self) -> bool: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def readinto(self, offset: int, buf: Any) -> int: ...
    def write(self, offset: int, data: Any) -> int: ...
    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None: ...
    def discard(self, offset: int, length: int) -> None: ...
    def flush(self) -> None: ...
    def map(
        self, offset: int = 0, length: int | None = None
    ) -> list[tuple[int, int, str, int | None]]: ...
    def info(self) -> dict[str, str]: ...
    def close(self) -> None: ...
    def __enter__(self) -> Device: ...
    def __exit__(self, _exc_type: Any, _exc: Any, _tb: Any) -> bool: ...

def open_device(
    spec: str | None = None,
    *,
    raw: str | None = None,
    test: str | None = None,
    format: str | None = None,
    read_only: bool = True,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
) -> Device: ...
def open(
    path: str,
    format: str | None = None,
    read_only: bool = True,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    timeout: float | None = None,
) -> Image: ...
def verify(
    raw: str,
    test: str,
    *,
    all: bool = False,
    strict: bool = False,
    raw_format: str | None = None,
    test_format: str | None = None,
    snapshot: str | None = None,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    threads: int = 0,
    chunk_size: int = 0,
    max_runs: int = 100000,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]: ...
def verify_many(
    pairs: list[dict[str, Any]],
    *,
    all: bool = False,
    strict: bool = False,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    threads: int = 0,
    max_runs: int = 100000,
    progress: Callable[[int, int, int, int], None] | None = None,
) -> list[dict[str, Any] | Exception]: ...
def probe_format(path: str) -> str: ...
def create(
    path: str,
    size: int | None = None,
    format: str = "qcow2",
    cluster_size: int = 65536,
    backing: str | None = None,
    backing_format: str | None = None,
    version: int = 3,
    refcount_bits: int = 16,
    extended_l2: bool = False,
    lazy_refcounts: bool = False,
) -> None: ...
def exercise(
    spec: str | None = None,
    *,
    ops: int | None = None,
    duration: float | None = None,
    seed: int | None = None,
    mix: str | None = None,
    size_mix: str | None = None,
    queue_depth: int | None = None,
    log: str | None = None,
    replay: str | None = None,
    format: str | None = None,
    timeout: float | None = None,
    verify: bool = True,
    backing: bool = True,
    max_backing_depth: int = 16,
    allow_backing_anywhere: bool = False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]: ...
