"""The abi3 wheel against today's build, side by side in one run (issue 25).

    python benches/bench_abi3.py DIR [--scale 1024] [--rounds 7] [--reads 200000]

Run it with CPython 3.11 or later, from a checkout with Rust. It builds three
wheels of the checkout for this interpreter into DIR/wheels, installs each into
its own venv under DIR/venvs, and times them:

- ``current``: today's build, what ``pip install .`` installs (the host's C
  compiler and linker, an extension for this CPython only);
- ``abi3``: the wheel that ships for CPython >= 3.11 (scripts/build-wheels.sh's
  build: zig, manylinux2014, the ``abi3`` feature);
- ``zig-cp311``: that zig build without ``abi3``, which tells what the limited
  API costs apart from what the toolchain costs.

Each round runs every build in turn (the order rotates each round). One process
per build times the three benches the issue names, in-process with
``time.perf_counter``:

- ``verify``: ``bv.verify`` of DIR's fully allocated qcow2 (2 x scale MiB of
  random data, 64 KiB clusters; make_images.full_pair) against its raw copy;
- ``reads``: READS sequential 4 KiB ``read`` calls on the mirrored device
  ``bv.open(raw=RAW, test=QCOW2)``, from a Python loop;
- ``map``: ``bv.map`` of a qcow2 of 262,144 extents (512-byte clusters, data
  in every other one, made by ``qemu-img convert -S 512``).

Each is also given as the CPU time its process spent (``time.process_time``,
every thread), which another process's load on the cores barely moves: the
verify runs on both cores, so its wall time doubles whenever anything else
runs. Then the command's start-up, each the median of 20 runs: ``blkverify --version``
and ``blkverify verify --help``. Prints a Markdown table of the medians over the
rounds and each build's time over ``current``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import make_images

ROOT = Path(__file__).resolve().parent.parent
MAP_EXTENTS = 262_144
STARTUP_RUNS = 20
BUILDS = ["current", "abi3", "zig-cp311"]

DRIVER = """
import json, sys, time
import blkverify_rs as bv

raw, qcow2, image, reads, extents = sys.argv[1:4] + [int(a) for a in sys.argv[4:6]]
out = {}

def timed(name, fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    out[name] = time.perf_counter() - wall
    out[name + " cpu"] = time.process_time() - cpu  # every thread of the process
    return result

assert timed("verify", lambda: bv.verify(raw, qcow2)).identical
with bv.open(raw=raw, test=qcow2) as dev:
    read, end = dev.read, dev.size - 4096

    def loop():
        offset = 0
        for _ in range(reads):
            read(offset, 4096)
            offset = offset + 4096 if offset < end else 0

    timed("reads", loop)
found = timed("map", lambda: bv.map(image))
assert len(found) == extents, len(found)
print(json.dumps(out))
"""


def sh(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in argv], check=True, **kw)


def map_image(d: Path) -> Path:
    """A qcow2 whose map is MAP_EXTENTS extents: 512-byte clusters, data in
    every other cluster of 128 MiB, the rest unallocated."""
    image = d / "map-262144.qcow2"
    if image.exists():
        return image
    raw = d / "map-262144.raw"
    with open(raw, "wb") as f:
        f.truncate(MAP_EXTENTS * 512)
        for i in range(0, MAP_EXTENTS, 2):
            f.seek(i * 512)
            f.write(bytes([i // 2 % 255 + 1]) * 512)
    sh("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512",
       "-S", "512", raw, image)  # fmt: skip
    extents = json.loads(sh("qemu-img", "map", "--output=json", image, capture_output=True).stdout)
    assert len(extents) == MAP_EXTENTS, len(extents)
    raw.unlink()
    return image


def build_wheels(d: Path) -> dict[str, Path]:
    """The three builds' wheels for this interpreter, built from the checkout."""
    sh(sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
       "-r", ROOT / "scripts" / "wheel-tools.txt")  # fmt: skip
    env = dict(os.environ, CARGO_ZIGBUILD_PYTHON_PATH=sys.executable)
    zig = ["--zig", "--compatibility", "manylinux2014"]
    flags = {"current": [], "abi3": [*zig, "--features", "abi3"], "zig-cp311": zig}
    wheels = {}
    for name, extra in flags.items():
        out = d / "wheels" / name
        for old in out.glob("*.whl"):
            old.unlink()
        sh("nice", "-n", "10", "maturin", "build", "--release", "--interpreter", sys.executable,
           "--out", out, *extra, cwd=ROOT, env=env)  # fmt: skip
        (wheels[name],) = out.glob("*.whl")
    return wheels


def install(d: Path, name: str, wheel: Path) -> Path:
    venv = d / "venvs" / name
    if not (venv / "bin" / "python").exists():
        sh(sys.executable, "-m", "venv", venv)
    pip = [venv / "bin" / "python", "-m", "pip", "install", "--quiet",
           "--disable-pip-version-check"]  # fmt: skip
    sh(*pip, "click>=8.1")
    sh(*pip, "--force-reinstall", "--no-deps", wheel)
    return venv


def startup(argv: list[str]) -> float:
    times = []
    for _ in range(STARTUP_RUNS):
        start = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_round(venv: Path, args: list[str]) -> dict[str, float]:
    out = sh(venv / "bin" / "python", "-c", DRIVER, *args, capture_output=True, text=True)
    result = json.loads(out.stdout)
    cli = str(venv / "bin" / "blkverify")
    result["--version"] = startup([cli, "--version"])
    result["verify --help"] = startup([cli, "verify", "--help"])
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", type=Path)
    parser.add_argument("--scale", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reads", type=int, default=200_000)
    args = parser.parse_args()
    if sys.version_info < (3, 11):
        parser.error("needs CPython >= 3.11 (the abi3 wheel's floor)")
    d = args.directory.resolve()
    d.mkdir(parents=True, exist_ok=True)
    raw, qcow2 = make_images.full_pair(d, 2 * args.scale)
    image = map_image(d)
    venvs = {name: install(d, name, wheel) for name, wheel in build_wheels(d).items()}
    argv = [str(raw), str(qcow2), str(image), str(args.reads), str(MAP_EXTENTS)]
    for venv in venvs.values():  # warm the page cache and the venvs' byte code
        one_round(venv, argv)
    load = os.getloadavg()[0]
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in BUILDS}
    for r in range(args.rounds):
        for name in BUILDS[r % len(BUILDS) :] + BUILDS[: r % len(BUILDS)]:
            for key, value in one_round(venvs[name], argv).items():
                samples[name].setdefault(key, []).append(value)
    med = {n: {k: statistics.median(v) for k, v in s.items()} for n, s in samples.items()}
    print(f"CPython {sys.version.split()[0]}, medians of {args.rounds} rounds, "
          f"load average {load:.2f} at the start, {os.getloadavg()[0]:.2f} at the end")  # fmt: skip
    print()
    print("Each cell: the median, and in brackets the fastest round; the ratios are of medians.")
    print()
    print("| bench | current | abi3 | abi3 / current | zig-cp311 | zig-cp311 / current |")
    print("|---|---|---|---|---|---|")
    rows = [
        ("verify", f"whole-image verify, {2 * args.scale} MiB qcow2 vs raw (s)", 1, 3),
        ("verify cpu", "  the same, CPU time of all its threads (s)", 1, 3),
        ("reads", f"{args.reads} x 4 KiB mirrored reads from Python (s)", 1, 3),
        ("reads cpu", "  the same, CPU time (s)", 1, 3),
        ("map", f"bv.map, {MAP_EXTENTS:,} extents (s)", 1, 3),
        ("map cpu", "  the same, CPU time (s)", 1, 3),
        ("--version", "`blkverify --version` (ms)", 1000, 1),
        ("verify --help", "`blkverify verify --help` (ms)", 1000, 1),
    ]
    for key, label, scale, digits in rows:
        cell = {
            n: f"{med[n][key] * scale:.{digits}f} ({min(samples[n][key]) * scale:.{digits}f})"
            for n in BUILDS
        }
        cur, abi3, zig = (med[n][key] for n in BUILDS)
        print(
            f"| {label} | {cell['current']} | {cell['abi3']} | {abi3 / cur:.3f} | "
            f"{cell['zig-cp311']} | {zig / cur:.3f} |"
        )
    print()
    for name in BUILDS:  # every sample, in ms
        each = (f"{k} " + " ".join(f"{x * 1000:.1f}" for x in v) for k, v in samples[name].items())
        print(f"{name}: " + "; ".join(each))
    return 0


if __name__ == "__main__":
    sys.exit(main())
