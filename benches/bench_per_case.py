"""Each case on its own: warm its files, then interleaved rounds; medians.

    python benches/bench_per_case.py DIR [--rounds 5] [CASE-SUBSTRING...]

DIR holds the images of ``bench_table.py`` (``make_images.py --scale 1024``).
``bench_table.py`` runs every case round-robin, which evicts the page cache when
the images outgrow memory; here each case's commands run twice first (warming its
files), then alternate for ``--rounds`` rounds, so QEMU (or blksum) and ours read
the same cached bytes. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import bench_table
import make_images


def cases(d: Path, scale: int) -> list[tuple[str, list[str], list[str]]]:
    images = make_images.build_all(d, scale)
    images.update(make_images.vpc_vdi_pairs(d, 2 * scale))
    blksum = bench_table.build_blksum(d / "blksum")
    return bench_table.compare_cases(images) + bench_table.digest_cases(images, blksum)


def timed(argv: list[str]) -> float:
    seconds, _, code = bench_table.timed(argv)
    if code != 0:
        print(f"{argv[0]} exited {code}", file=sys.stderr)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--scale", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("only", nargs="*", help="run the cases whose names contain one of these")
    args = parser.parse_intermixed_args()
    print(f"| case | QEMU or blksum (s) | ours (s) | ratio |  (medians of {args.rounds}, "
          f"load average {os.getloadavg()[0]:.2f} at the start)")  # fmt: skip
    print("|---|---|---|---|")
    for name, theirs, ours in cases(args.directory, args.scale):
        if args.only and not any(word in name for word in args.only):
            continue
        for argv in (theirs, ours, theirs, ours):
            timed(argv)
        t, o = [], []
        for _ in range(args.rounds):
            t.append(timed(theirs))
            o.append(timed(ours))
        tm, om = statistics.median(t), statistics.median(o)
        print(f"| {name} | {tm:.3f} | {om:.3f} | {tm / om:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
