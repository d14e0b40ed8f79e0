"""``blkverify batch`` at fleet scale: wall time and peak RSS against the number
of pairs, in table and ``--json`` mode, under a low descriptor limit; and a
shell loop of ``qemu-img compare`` over the same pairs, per pair (issue 26).

    nice -n 10 python benches/batch_scale.py DIR [--pairs 1000,10000,100000] [--modes table,json]
        [--nofile 1024] [--rounds 1] [--loop 500] [--cluster 2]

DIR gets a few small pairs (a 1 MiB qcow2 with 192 KiB written by qemu-io, and
its ``qemu-img convert -O raw`` copy; ``--distinct`` of them) and a manifest of
N lines per count that lists them over and over: every line is a pair opened,
verified and closed on its own (nothing is cached between pairs; the summary's
``bytes_compared`` says so). Each run is one ``blkverify batch --no-progress``
process, stdout to a file, RLIMIT_NOFILE's soft limit set to ``--nofile``;
peak RSS is the child's ``ru_maxrss`` from ``wait4``. ``--loop N`` times
``qemu-img compare`` over the manifest's first N pairs, in one ``sh`` loop (as
a user scripts it), for the per-pair comparison. ``--cluster N`` runs the
batches with ``--scheduler`` on a Dask cluster of N one-thread workers
started on this machine (tests/dask_cluster.py): the peak RSS is then the
client's. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

MiB = 1 << 20


def sh(*args: str) -> None:
    subprocess.run(list(args), check=True, stdout=subprocess.DEVNULL)


def make_pairs(d: Path, distinct: int) -> list[tuple[Path, Path]]:
    """``distinct`` small pairs (1 MiB qcow2, 192 KiB of data in 3 runs, its
    raw copy), built by qemu-img and qemu-io; kept when already there."""
    pairs = []
    for i in range(distinct):
        qcow2, raw = d / f"p{i}.qcow2", d / f"p{i}.raw"
        if not (qcow2.exists() and raw.exists()):
            sh("qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "1M")
            writes = [f"write -P {0x10 + i} {k * 320}k 64k" for k in range(3)]
            sh("qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), str(qcow2))
            sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(qcow2), str(raw))
        pairs.append((raw, qcow2))
    return pairs


def write_manifest(d: Path, pairs: list[tuple[Path, Path]], count: int) -> Path:
    path = d / f"manifest-{count}.txt"
    if not path.exists():
        lines = [f"{pairs[i % len(pairs)][0].name} {pairs[i % len(pairs)][1].name}\n"
                 for i in range(count)]  # fmt: skip
        path.write_text("".join(lines))
    return path


def run_limited(argv: list[str], nofile: int, out: Path) -> tuple[float, int, int]:
    """Run ``argv`` with RLIMIT_NOFILE's soft limit at ``nofile`` (stdout to
    ``out``): (wall seconds, peak RSS in KiB, exit status)."""

    def limit() -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

    errors = out.with_suffix(".err")
    with open(out, "wb") as f, open(errors, "wb") as e:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=f, stderr=e, preexec_fn=limit)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = code = os.waitstatus_to_exitcode(status)
    err = errors.read_text(errors="replace")
    if err.strip():
        print(f"  stderr ({len(err.splitlines())} lines): {err.splitlines()[0][:200]}")
    return wall, usage.ru_maxrss, code


def verified(out: Path, mode: str) -> tuple[int, int]:
    """Pairs reported identical, and the bytes compared in all (JSON mode)."""
    identical = compared = 0
    with open(out, encoding="utf-8") as f:
        for line in f:
            if mode == "json":
                record = json.loads(line)
                identical += record.get("identical") is True
                compared += record.get("bytes_compared", 0)
            elif " identical " in line:
                identical += 1
    return identical, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--pairs", default="1000,10000,100000")
    parser.add_argument("--modes", default="table,json")
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--distinct", type=int, default=4)
    parser.add_argument("--loop", type=int, default=0, help="qemu-img compare loop over N pairs")
    parser.add_argument("--blkverify", default=shutil.which("blkverify") or "blkverify")
    parser.add_argument("--cluster", type=int, default=0, help="one-thread Dask workers")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(args.dir, args.distinct)
    cluster = None
    scheduler: list[str] = []
    if args.cluster:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from dask_cluster import Cluster

        (args.dir / "cluster").mkdir(exist_ok=True)
        cluster = Cluster(args.dir / "cluster")
        for i in range(args.cluster):
            cluster.add_worker(f"w{i}")
        scheduler = ["--scheduler", cluster.address]
    try:
        run_all(args, pairs, scheduler)
    finally:
        if cluster is not None:
            cluster.close()


def run_all(args: argparse.Namespace, pairs: list[tuple[Path, Path]], scheduler: list[str]) -> None:
    print(f"load average {os.getloadavg()}; RLIMIT_NOFILE soft {args.nofile}")
    print("| pairs | mode | wall (s) | per pair (ms) | peak RSS (MiB) | identical | exit |")
    print("|---|---|---|---|---|---|---|")
    for count in [int(c) for c in args.pairs.split(",")]:
        manifest = write_manifest(args.dir, pairs, count)
        for mode in args.modes.split(","):
            flags = ["--json"] if mode == "json" else []
            for _ in range(args.rounds):
                out = args.dir / f"out-{count}-{mode}.txt"
                argv = [args.blkverify, "batch", "--no-progress", *scheduler, *flags, str(manifest)]
                wall, rss, code = run_limited(argv, args.nofile, out)
                identical, compared = verified(out, mode)
                if mode == "json" and compared != count * MiB:
                    print(f"  bytes compared {compared}, expected {count * MiB}")
                print(
                    f"| {count:,} | {mode} | {wall:.2f} | {wall / count * 1000:.3f} "
                    f"| {rss / 1024:.0f} | {identical:,} | {code} |",
                    flush=True,
                )
    if args.loop:
        manifest = write_manifest(args.dir, pairs, args.loop)
        script = 'while read r t; do qemu-img compare -q "$r" "$t" || exit 1; done < "$1"'
        start = time.perf_counter()
        subprocess.run(
            ["sh", "-c", script, "sh", str(manifest)],
            cwd=args.dir,
            check=True,
        )
        wall = time.perf_counter() - start
        print(
            f"| {args.loop:,} | qemu-img compare loop | {wall:.2f} "
            f"| {wall / args.loop * 1000:.3f} | - | {args.loop:,} | 0 |"
        )
    print(f"load average {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
