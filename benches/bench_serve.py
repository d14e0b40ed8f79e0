"""``blkverify serve`` against QEMU's blkverify under ``qemu-nbd``, and against
``qemu-nbd`` serving the test image alone (no check at all), side by side in
interleaved rounds (issue 21):

- fio's nbd engine, ``--rw=randrw --rwmixread=70 --bs=4k --verify=crc32c``,
  queue depth 1 and 8, a fixed number of ops, on fresh images (a sparse raw
  reference, and a test side that is a fresh qcow2 or a fresh raw file);
- sequential: ``qemu-img convert -n -O raw`` of a fully allocated image of
  random data into each server (fresh images again);
- serve's peak RSS (VmHWM from /proc/PID/status, mappings included) while fio
  writes the whole export at queue depth 8;
- a control round: the test side differs from the reference at one byte in
  every 64 KiB, and the same fio run must be stopped by serve's finding;
- for scale, the sequential case's bytes written with no server: fio writing
  them to one fresh file, and to two at once, then fsyncing (one is what QEMU's
  blkverify makes durable at the client's flush, two what serve does).

Every serve run is checked for honest work: the bytes its summary says each
side read and wrote equal what the client moved (fio's own counts, or the
image size for convert). Each round runs every server once per case, in a
rotating order; the table gives medians.

    python benches/bench_serve.py DIR [--rounds 5] [--ops 60000] [--mib 1024]

DIR holds the images (about 3 x MIB plus 2 x 2 x MIB for the sequential case;
never commit them). Serve runs in a process of its own through ``bv.serve``
(what ``blkverify serve`` runs), so that its summary's byte counts come back
exact rather than rounded for people.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

MiB = 1 << 20
IMPLS = ("qemu-nbd", "qemu-blkverify", "blkverify-serve")
NICE = ["nice", "-n", "10"]

# The server process for serve: bv.serve on a socket, until SIGTERM; then its
# summary as one JSON line on stdout.
SERVE_SNIPPET = """
import json, signal, sys
import blkverify_rs as bv
raw, test, fmt, sock, policy = sys.argv[1:6]
server = bv.serve(raw, test, format=fmt, socket=sock, persistent=True, on_mismatch=policy)
signal.signal(signal.SIGTERM, lambda *_: server.stop(wait=False, reason="SIGTERM"))
print(server.uri, flush=True)
while not server.wait(0.2):
    pass
s = server.summary
print(json.dumps({"test": s.test, "raw": s.raw, "findings": s.findings,
                  "requests": s.requests, "refused": s.refused}), flush=True)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def fresh_pair(directory: Path, fmt: str, size: int) -> tuple[Path, Path]:
    """A sparse raw reference and a fresh test image (qcow2 or raw) of `size`."""
    raw, test = directory / "ref.raw", directory / f"test.{fmt}"
    for path in (raw, test):
        path.unlink(missing_ok=True)
    sh("qemu-img", "create", "-q", "-f", "raw", str(raw), str(size))
    sh("qemu-img", "create", "-q", "-f", fmt, str(test), str(size))
    # Every run starts with the disk quiet: the last run's dirty pages and the
    # deleted images' freed blocks are written out first, not during this run.
    os.sync()
    return raw, test


@dataclass
class Server:
    """One NBD server on a fresh Unix socket, stopped by its PID."""

    impl: str
    raw: Path
    test: Path
    fmt: str
    sock: Path
    policy: str = "stop"
    proc: subprocess.Popen = field(init=False)
    summary: dict | None = None
    peak_rss_kib: int | None = None

    def __post_init__(self) -> None:
        self.sock.unlink(missing_ok=True)
        if self.impl == "blkverify-serve":
            argv = [sys.executable, "-c", SERVE_SNIPPET]
            argv += [str(self.raw), str(self.test), self.fmt, str(self.sock), self.policy]
            self.proc = subprocess.Popen(
                NICE + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            assert self.proc.stdout is not None
            if not self.proc.stdout.readline():
                raise RuntimeError(f"serve did not start: {self.proc.stderr.read()}")
            return
        if self.impl == "qemu-blkverify":
            opts = (
                f"driver=blkverify,raw.driver=raw,raw.file.filename={self.raw},"
                f"test.driver={self.fmt},test.file.filename={self.test}"
            )
            argv = ["qemu-nbd", "--cache=writeback", "--persistent", "-k", str(self.sock)]
            argv += ["--image-opts", opts]
        else:
            argv = ["qemu-nbd", "-f", self.fmt, "--cache=writeback", "--persistent"]
            argv += ["-k", str(self.sock), str(self.test)]
        self.proc = subprocess.Popen(NICE + argv, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(self.sock))
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{self.impl} did not start") from None
                time.sleep(0.02)
            finally:
                probe.close()

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def rss(self) -> None:
        """Note the process's peak RSS so far."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                self.peak_rss_kib = int(line.split()[1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.rss()
            self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=120)
        if self.impl == "blkverify-serve":
            lines = [line for line in (out or "").splitlines() if line.startswith("{")]
            if not lines:
                raise RuntimeError(f"serve gave no summary: {err}")
            self.summary = json.loads(lines[-1])


def fio_argv(uri: str, depth: int, ops: int, size_mib: int, rw: str = "randrw") -> list[str]:
    return [
        "fio",
        "--name=bench",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={rw}",
        "--rwmixread=70",
        "--bs=4k",
        "--verify=crc32c",
        f"--iodepth={depth}",
        f"--size={size_mib}M",
        *([f"--number_ios={ops}"] if ops else []),
        "--output-format=json",
    ]


def run_fio(argv: list[str], cwd: Path) -> dict:
    """fio's job figures: ops/s, and the bytes read and written."""
    out = subprocess.run(NICE + argv, capture_output=True, text=True, cwd=cwd, check=False)
    if out.returncode != 0 or "{" not in out.stdout:
        raise RuntimeError(f"fio failed: {out.stderr[-2000:]}")
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    return {
        "ops_per_s": job["read"]["iops"] + job["write"]["iops"],
        "read": job["read"]["io_bytes"],
        "written": job["write"]["io_bytes"],
        "error": job["error"],
    }


def check_honest(server: Server, read: int | None, written: int) -> None:
    """Serve's summary: each side read and wrote what the client moved."""
    if server.impl != "blkverify-serve":
        return
    s = server.summary
    assert s is not None
    assert s["findings"] == 0 and s["refused"] == 0, s
    for side in ("test", "raw"):
        assert s[side]["written"] == written, (side, s, written)
        if read is not None:
            assert s[side]["read"] == read, (side, s, read)


def fio_case(d: Path, impl: str, fmt: str, depth: int, ops: int, mib: int) -> dict:
    raw, test = fresh_pair(d, fmt, mib * MiB)
    server = Server(impl, raw, test, fmt, d / "nbd.sock")
    try:
        figures = run_fio(fio_argv(server.uri, depth, ops, mib), d)
    finally:
        server.stop()
    check_honest(server, figures["read"], figures["written"])
    return {**figures, "peak_rss_kib": server.peak_rss_kib}


def convert_case(d: Path, impl: str, fmt: str, source: Path) -> dict:
    size = int(
        json.loads(
            subprocess.run(
                ["qemu-img", "info", "--output=json", str(source)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )["virtual-size"]
    )
    raw, test = fresh_pair(d, fmt, size)
    server = Server(impl, raw, test, fmt, d / "nbd.sock")
    try:
        started = time.perf_counter()
        argv = ["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(source), server.uri]
        subprocess.run(NICE + argv, check=True)
        seconds = time.perf_counter() - started
    finally:
        server.stop()
    check_honest(server, None, size)
    return {"seconds": seconds, "peak_rss_kib": server.peak_rss_kib, "summary": server.summary}


def plain_case(d: Path, files: int, size: int) -> dict:
    """The sequential case's bytes written by a plain program, with no NBD and
    no image format, for scale:
    fio writing `size` bytes in 2 MiB pieces to `files` fresh sparse files at
    once (a job each, with serve's write-behind: writeback started after every
    piece), then fsyncing them. One file is what QEMU's blkverify makes durable
    at the client's final flush (it flushes the test side only); two are what
    serve's flush makes durable (both sides)."""
    paths = [d / f"plain{i}.raw" for i in range(files)]
    argv = ["fio", "--rw=write", "--bs=2M", f"--size={size}", "--ioengine=psync"]
    argv += ["--fallocate=none", "--sync_file_range=write:1", "--end_fsync=1"]
    for i, path in enumerate(paths):
        path.unlink(missing_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
        argv += [f"--name=plain{i}", f"--filename={path}"]
    os.sync()
    try:
        started = time.perf_counter()
        subprocess.run(NICE + argv, check=True, cwd=d, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return {"seconds": seconds}


def memory_case(d: Path, mib: int) -> dict:
    """Serve's peak RSS while fio writes the whole export once at depth 8."""
    raw, test = fresh_pair(d, "qcow2", mib * MiB)
    server = Server("blkverify-serve", raw, test, "qcow2", d / "nbd.sock")
    try:
        figures = run_fio(fio_argv(server.uri, 8, 0, mib, rw="randwrite"), d)
    finally:
        server.stop()
    check_honest(server, figures["read"], figures["written"])
    return {**figures, "peak_rss_kib": server.peak_rss_kib}


def control_case(d: Path, ops: int, mib: int) -> dict:
    """The test side differs from the reference at one byte of every 64 KiB: the
    fio run of the benchmark must be stopped by serve's finding."""
    raw, test = fresh_pair(d, "qcow2", mib * MiB)
    planted = d / "planted.raw"
    planted.unlink(missing_ok=True)
    with open(planted, "wb") as f:
        f.truncate(mib * MiB)
        for i in range(mib * 16):
            f.seek(i * 64 * 1024 + 1000)
            f.write(b"\xa5")
    test.unlink()
    sh("qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(planted), str(test))
    planted.unlink()
    server = Server("blkverify-serve", raw, test, "qcow2", d / "nbd.sock")
    out = subprocess.run(
        NICE + fio_argv(server.uri, 8, ops, mib), capture_output=True, text=True, cwd=d
    )
    server.stop()
    assert server.summary is not None and server.summary["findings"] >= 1, server.summary
    assert out.returncode != 0, "fio did not see the stop"
    return {"findings": server.summary["findings"], "requests": server.summary["requests"]}


def rotated(seq: tuple[str, ...], k: int) -> list[str]:
    k %= len(seq)
    return list(seq[k:] + seq[:k])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=60_000)
    parser.add_argument("--mib", type=int, default=1024, help="export size for fio")
    parser.add_argument("--convert-mib", type=int, default=2048)
    parser.add_argument("--cases", default="fio,convert,plain,memory,control")
    parser.add_argument("--formats", default="qcow2,raw")
    parser.add_argument("--json", type=Path, help="write every sample here")
    args = parser.parse_args()
    d = args.dir
    d.mkdir(parents=True, exist_ok=True)
    cases = args.cases.split(",")
    formats = args.formats.split(",")
    samples: dict[str, dict[str, list[dict]]] = {}
    loads = [os.getloadavg()[0]]

    def note(case: str, impl: str, sample: dict) -> None:
        samples.setdefault(case, {}).setdefault(impl, []).append(sample)
        print(f"{case:32} {impl:16} {json.dumps(sample)}", file=sys.stderr, flush=True)

    source = None
    if "convert" in cases:
        sys.path.insert(0, str(Path(__file__).parent))
        import make_images

        _, source = make_images.full_pair(d, args.convert_mib)
    for r in range(args.rounds):
        loads.append(os.getloadavg()[0])
        for fmt in formats:
            if "fio" in cases:
                for depth in (1, 8):
                    for impl in rotated(IMPLS, r):
                        case = f"fio randrw QD{depth}, test {fmt}"
                        note(case, impl, fio_case(d, impl, fmt, depth, args.ops, args.mib))
            if "convert" in cases and source is not None:
                for impl in rotated(IMPLS, r):
                    note(f"convert {args.convert_mib} MiB, test {fmt}", impl,
                         convert_case(d, impl, fmt, source))  # fmt: skip
        if "plain" in cases:
            for files in (1, 2):
                note(f"plain: fio, {args.convert_mib} MiB to {files} file(s), durable", "fio",
                     plain_case(d, files, args.convert_mib * MiB))  # fmt: skip
        if "memory" in cases and r == 0:
            note("memory: QD8 randwrite of the export", "blkverify-serve", memory_case(d, args.mib))
        if "control" in cases and r == 0:
            note("control: planted corruption", "blkverify-serve",
                 control_case(d, args.ops, args.mib))  # fmt: skip
    loads.append(os.getloadavg()[0])
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "loads": loads}, indent=1))
    print(f"load average (1 min) over the run: {', '.join(f'{x:.2f}' for x in loads)}")
    heads = ["case", "qemu-nbd (no check)", "QEMU blkverify", "blkverify serve"]
    heads += ["serve / QEMU blkverify", "serve peak RSS (MiB)"]
    print("| " + " | ".join(heads) + " |")
    print("|---|---|---|---|---|---|")
    for case, by_impl in samples.items():
        if case.startswith(("memory", "control", "plain")):
            continue
        key = "ops_per_s" if case.startswith("fio") else "seconds"
        med = {i: statistics.median(s[key] for s in v) for i, v in by_impl.items()}
        rss = max(s["peak_rss_kib"] or 0 for s in by_impl["blkverify-serve"]) / 1024
        if key == "ops_per_s":
            cells = [f"{med[i]:,.0f} ops/s" for i in IMPLS]
            ratio = med["blkverify-serve"] / med["qemu-blkverify"]
        else:
            cells = [f"{med[i]:.2f} s" for i in IMPLS]
            ratio = med["qemu-blkverify"] / med["blkverify-serve"]
        print(f"| {case} | {' | '.join(cells)} | {ratio:.2f}x | {rss:.0f} |")
    for case, by_impl in samples.items():
        if case.startswith("plain"):
            times = [s["seconds"] for s in by_impl["fio"]]
            print(f"{case}: median {statistics.median(times):.2f} s of {len(times)}")
    for case in ("memory: QD8 randwrite of the export", "control: planted corruption"):
        for s in samples.get(case, {}).get("blkverify-serve", []):
            print(f"{case}: {json.dumps(s)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
