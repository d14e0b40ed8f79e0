"""Measure the issue's table: ours against QEMU, interleaved, medians of N.

    python benches/bench_table.py DIR [--scale 1024] [--rounds 3]

Builds the images in DIR if needed (make_images.py), warms the page cache,
then runs each case's commands in turn, round after round, so that a busy
machine slows both sides alike. Wall time and peak RSS come from wait4.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import make_images

READS = 200000


def timed(argv: list[str]) -> tuple[float, int, int]:
    """(seconds, peak RSS in KiB, exit status) of one run."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    return time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status)


def reads_snippet(path: Path, count: int) -> str:
    return (
        "import blkverify_rs as bv\n"
        f"img = bv.open({str(path)!r}); r = img.read; end = img.size - 4096; o = 0\n"
        f"for _ in range({count}):\n    r(o, 4096); o = o + 4096 if o < end else 0\n"
    )


def device_reads_snippet(raw: Path, test: Path, count: int) -> str:
    return (
        "import blkverify_rs as bv\n"
        f"dev = bv.open(raw={str(raw)!r}, test={str(test)!r})\n"
        "r = dev.read; end = dev.size - 4096; o = 0\n"
        f"for _ in range({count}):\n    r(o, 4096); o = o + 4096 if o < end else 0\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--scale", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    images = make_images.build_all(args.directory, args.scale)
    ours = [sys.executable, "-m", "blkverify_rs"]
    cases = []
    for name, (raw, test) in images.items():
        cases.append(
            (
                name,
                [
                    "qemu-img",
                    "compare",
                    "-q",
                    "-f",
                    "raw",
                    "-F",
                    test.suffix[1:],
                    str(raw),
                    str(test),
                ],
                [*ours, "verify", "-q", str(raw), str(test)],
            )
        )
    qcow2 = images["allocated"][1]
    cases.append(
        (
            f"{READS} x 4 KiB reads",
            [
                "qemu-img",
                "bench",
                "-f",
                "qcow2",
                "-c",
                str(READS),
                "-d",
                "1",
                "-s",
                "4k",
                str(qcow2),
            ],
            [sys.executable, "-c", reads_snippet(qcow2, READS)],
        )
    )
    raw_full = images["allocated"][0]
    cases.append(
        (
            f"{READS} x 4 KiB mirrored reads (device vs QEMU blkverify)",
            [
                "qemu-img",
                "bench",
                "-c",
                str(READS),
                "-d",
                "1",
                "-s",
                "4k",
                f"blkverify:{raw_full}:{qcow2}",
            ],
            [sys.executable, "-c", device_reads_snippet(raw_full, qcow2, READS)],
        )
    )
    cases.append(("--version", None, [str(Path(sys.executable).parent / "blkverify"), "--version"]))
    for _, _, command in cases:  # warm the page cache (our reader skips sparse holes)
        timed(command)
    samples: dict[str, dict[str, list[tuple[float, int]]]] = {
        c[0]: {"q": [], "o": []} for c in cases
    }
    for _ in range(args.rounds):
        for name, reference, command in cases:
            for key, argv in (("q", reference), ("o", command)):
                if argv is None:
                    continue
                seconds, rss, code = timed(argv)
                if code != 0:
                    print(f"{name}: {argv[0]} exited {code}", file=sys.stderr)
                samples[name][key].append((seconds, rss))
    print(
        f"| case | QEMU (s) | ours (s) | ratio | ours peak RSS (MiB) |  (median of {args.rounds})"
    )
    print("|---|---|---|---|---|")
    for name, _, _ in cases:
        q = samples[name]["q"]
        o = samples[name]["o"]
        o_med = statistics.median(s for s, _ in o)
        rss = max(r for _, r in o) / 1024
        if q:
            q_med = statistics.median(s for s, _ in q)
            print(f"| {name} | {q_med:.3f} | {o_med:.3f} | {q_med / o_med:.2f}x | {rss:.0f} |")
        else:
            print(f"| {name} | - | {o_med * 1000:.0f} ms | - | {rss:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
