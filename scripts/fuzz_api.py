"""Fuzz the Python API with hypothesis (not run in CI): damage real qemu-img images
byte by byte and drive bv.open, reads, a writable open with writes, and bv.verify.

    python scripts/fuzz_api.py [EXAMPLES]      (default 2000; needs `pip install hypothesis`)

Every call must return or raise one of the package's errors (bv.Error and its
subclasses, OSError, ValueError) with a message; an "internal error" (a Rust panic
caught at the binding) or any other exception is a finding, and hypothesis prints
the smallest input that gives it. Run it from the repository root.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import blkverify_rs as bv
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MiB = 1 << 20
EXPECTED = (bv.Error, OSError, ValueError)


def make_bases(d: Path) -> list[Path]:
    out = []
    for name, opts, writes in [
        ("c4k", "cluster_size=4k", ["write -P 0xab 0 64k", "write -c 1M 4k", "write -z 2M 4k"]),
        ("extl2", "cluster_size=64k,extended_l2=on", ["write -P 0xab 0 8k", "write -c 1M 64k"]),
        ("v2", "cluster_size=4k,compat=0.10", ["write -P 0xab 0 64k"]),
        ("lazy", "cluster_size=4k,lazy_refcounts=on", ["write -P 0x5a 0 64k", "abort"]),
    ]:
        p = d / f"{name}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, p, "4M"], check=True)
        argv = ["qemu-io", "-f", "qcow2"]
        for w in writes:
            argv += ["-c", w]
        subprocess.run([*argv, p], capture_output=True, check=False)
        out.append(p)
    snap = d / "snap.qcow2"
    shutil.copyfile(out[0], snap)
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", snap], check=True)
    out.append(snap)
    return out


def check_error(exc: BaseException) -> None:
    if not isinstance(exc, EXPECTED):
        raise exc
    text = str(exc)
    if "internal error" in text or not text:
        raise AssertionError(f"bad error: {type(exc).__name__}: {text!r}") from exc


def main() -> None:
    examples = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    work = Path(tempfile.mkdtemp(prefix="fuzz-api-"))
    bases = make_bases(work)
    raw = work / "zeros.raw"
    raw.write_bytes(bytes(4 * MiB))
    img = work / "fuzzed.qcow2"
    counts = {"examples": 0, "opened": 0, "errors": 0}

    patches = st.lists(
        st.tuples(
            # mostly the metadata at the front, sometimes anywhere
            st.one_of(st.integers(0, 64 * 1024), st.integers(0, 8 * MiB)),
            st.binary(min_size=1, max_size=16),
        ),
        min_size=1,
        max_size=6,
    )

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        base=st.sampled_from(bases),
        patches=patches,
        truncate=st.one_of(st.none(), st.integers(0, 200 * 1024)),
        snapshot=st.sampled_from([None, "s1"]),
        writable=st.booleans(),
        reads=st.lists(st.tuples(st.integers(0, 4 * MiB), st.integers(1, 200_000)), max_size=4),
    )
    def one(base, patches, truncate, snapshot, writable, reads) -> None:
        counts["examples"] += 1
        shutil.copyfile(base, img)
        with open(img, "r+b") as f:
            size = img.stat().st_size
            for offset, data in patches:
                f.seek(offset % max(size, 1))
                f.write(data)
            if truncate is not None:
                f.truncate(truncate)
        try:
            opened = bv.open(img, snapshot=snapshot, backing=False, read_only=not writable)
        except BaseException as exc:
            counts["errors"] += 1
            check_error(exc)
            return
        counts["opened"] += 1
        with opened:
            for offset, length in reads:
                if opened.size == 0:
                    break
                offset %= opened.size
                length = min(length, opened.size - offset)
                try:
                    opened.read(offset, length)
                    if writable:
                        opened.write(offset, b"\x5a" * min(length, 70_000))
                except BaseException as exc:
                    check_error(exc)
        try:
            bv.verify(raw, img, backing=False, all=True)
        except BaseException as exc:
            check_error(exc)

    t0 = time.monotonic()
    try:
        one()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"fuzz_api: {counts['examples']} examples in {time.monotonic() - t0:.0f}s "
        f"({counts['opened']} opened, {counts['errors']} refused at open), no finding"
    )


if __name__ == "__main__":
    main()
