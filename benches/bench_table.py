"""Measure the issues' tables: ours against QEMU (and blksum for digests),
interleaved, medians of N.

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
    images.update(make_images.vpc_vdi_pairs(args.directory, 2 * args.scale))
    cases = compare_cases(images)
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
    cases += digest_cases(images, build_blksum(args.directory / "blksum"))
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
        f"| case | QEMU or blksum (s) | ours (s) | ratio | ours peak RSS (MiB) |"
        f"  (median of {args.rounds}, load average {os.getloadavg()[0]:.2f})"
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
    # Digest speed against the machine's: SHA-256 of 64 KiB buffers on every core.
    rate = sha256_rate()
    ours_raw = statistics.median(s for s, _ in samples["digest: fully allocated raw"]["o"])
    full_raw = images["allocated"][0]
    share = full_raw.stat().st_size / ours_raw / rate
    print(f"\nSHA-256 on every core (openssl speed): {rate / 1e6:.0f} MB/s; the raw digest")
    print(f"hashes at {full_raw.stat().st_size / ours_raw / 1e6:.0f} MB/s, {share:.0%} of it.")
    return 0


def compare_cases(images: dict[str, tuple[Path, Path]]) -> list[tuple[str, list[str], list[str]]]:
    """(name, qemu-img compare, our verify) for each pair; each side's suffix is its format."""
    ours = [sys.executable, "-m", "blkverify_rs", "verify", "-q"]
    return [
        (
            name,
            [
                *["qemu-img", "compare", "-q", "-f", raw.suffix[1:], "-F", test.suffix[1:]],
                *[str(raw), str(test)],
            ],
            [*ours, str(raw), str(test)],
        )
        for name, (raw, test) in images.items()
    ]


def digest_cases(
    images: dict[str, tuple[Path, Path]], blksum: str
) -> list[tuple[str, list[str], list[str]]]:
    """(name, blksum -c, our digest): blkhash 0.11 through the page cache too."""
    ours = [sys.executable, "-m", "blkverify_rs", "digest"]
    return [
        (name, [blksum, "-c", str(image)], [*ours, str(image)])
        for name, image in (
            ("digest: fully allocated raw", images["allocated"][0]),
            ("digest: the same data as qcow2", images["allocated"][1]),
            ("digest: zstd-compressed qcow2, OS-like data", images["zstd"][1]),
            ("digest: sparse qcow2", images["sparse"][1]),
        )
    ]


def build_blksum(cache: Path) -> str:
    """The real blksum, built once into ``cache`` (scripts/build-blksum.sh)."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "build-blksum.sh"
    out = subprocess.run(["sh", str(script), str(cache)], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"bench_table: cannot build blksum: {out.stderr.strip()}")
    return out.stdout.strip().splitlines()[-1]


def sha256_rate(seconds: int = 3) -> float:
    """Bytes per second SHA-256 hashes 64 KiB buffers on every core at once."""
    cores = os.cpu_count() or 1
    proc = subprocess.run(
        ["openssl", "speed", "-elapsed", "-mr", "-multi", str(cores), "-seconds", str(seconds),
         "-bytes", "65536", "-evp", "sha256"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    total = [line for line in proc.stdout.splitlines() if line.startswith("+F:")][-1]
    return float(total.rsplit(":", 1)[1])


if __name__ == "__main__":
    sys.exit(main())
