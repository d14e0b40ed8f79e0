"""What ``serve --trace`` costs, and what a replay of it costs (issue 22).

    nice -n 10 python benches/bench_trace.py DIR [--rounds 5] [--ios 60000]
                                             [--size-mib 1024] [--tree PATH]

Each round, for each test format (raw, qcow2; the order rotates), serves a fresh
pair of SIZE images (a raw reference and the test image, made by qemu-img) twice,
without and with ``--trace`` (the order rotates too), to fio's nbd engine:

    fio --ioengine=nbd --rw=randrw --rwmixread=70 --bs=4k --verify=crc32c
        --iodepth=8 --number_ios=IOS --size=SIZE

and records fio's ops/s (read + write IOPS of its JSON report), its run time,
serve's peak RSS (``VmHWM`` of /proc/PID/status, read before serve is stopped),
and the CPU time serve and fio spent per request (/proc/PID/stat; fio's
``usr_cpu``/``sys_cpu``), which other processes' load barely moves: on two
cores shared by fio and serve, ops/s follow the CPU each request costs.
The traced run's trace is then replayed, ``blkverify replay --no-verify`` on
fresh images (copy-on-write overlays), and its own ``elapsed_s`` set against
fio's run time. Prints medians over the rounds.

Then the trace's size per GiB written, for fio's data and for a file-system
build: ``mke2fs -t ext4 -d TREE`` through nbdfuse on a traced serve of a qcow2
(TREE: /usr/share/doc unless given).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 1 << 30


def run(cmd: list, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True, **kw)


class Serve:
    def __init__(self, *args) -> None:
        self.err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blkverify_rs", "serve", *(str(a) for a in args)],
            stdout=subprocess.PIPE,
            stderr=self.err,
        )
        assert self.proc.stdout is not None
        self.uri = self.proc.stdout.readline().decode().strip()
        if not self.uri:
            raise RuntimeError(self.stderr())

    def cpu_s(self) -> float:
        """serve's CPU time so far (user + system, every thread)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return 0

    def stop(self) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read().decode(errors="replace")


def fresh_pair(d: Path, fmt: str, size: int) -> tuple[Path, Path]:
    raw, test = d / "raw.img", d / f"test.{fmt}"
    for p in (raw, test):
        p.unlink(missing_ok=True)
    run(["qemu-img", "create", "-q", "-f", "raw", raw, size])
    run(["qemu-img", "create", "-q", "-f", fmt, test, size])
    return raw, test


def fio(uri: str, ios: int, size: int, cwd: Path) -> dict:
    out = run(
        [
            "fio",
            "--name=trace",
            "--ioengine=nbd",
            f"--uri={uri}",
            "--rw=randrw",
            "--rwmixread=70",
            "--bs=4k",
            "--verify=crc32c",
            "--iodepth=8",
            f"--number_ios={ios}",
            f"--size={size}",
            "--output-format=json",
        ],
        cwd=cwd,
    )
    job = json.loads(out.stdout[out.stdout.index("{") :])["jobs"][0]
    runtime = job["job_runtime"] / 1000
    ops = job["read"]["total_ios"] + job["write"]["total_ios"]
    return {
        "ops_per_s": job["read"]["iops"] + job["write"]["iops"],
        "runtime_s": runtime,
        "written": job["write"]["io_bytes"],
        "ops": ops,
        "fio_cpu_us_per_op": (job["usr_cpu"] + job["sys_cpu"]) / 100 * runtime / ops * 1e6,
    }


def one_run(d: Path, fmt: str, traced: bool, ios: int, size: int) -> dict:
    raw, test = fresh_pair(d, fmt, size)
    trace = d / f"{fmt}.bvt"
    args = ["--persistent", *(["--trace", trace] if traced else []), raw, test]
    serve = Serve(*args)
    try:
        cpu_before = serve.cpu_s()
        result = fio(serve.uri, ios, size, d)
        result["hwm_mib"] = serve.hwm_kib() / 1024
        # The writer thread may still be busy with the last batches: give it
        # a moment, so that its CPU is counted.
        time.sleep(0.5)
        result["serve_cpu_us_per_op"] = (serve.cpu_s() - cpu_before) / result["ops"] * 1e6
    finally:
        status = serve.stop()
    if status != 0:
        raise RuntimeError(f"serve exited {status}: {serve.stderr()}")
    if traced:
        result["trace_bytes"] = trace.stat().st_size
        raw, test = fresh_pair(d, fmt, size)
        started = time.monotonic()
        out = subprocess.run(
            [sys.executable, "-m", "blkverify_rs", "replay", "--json", "--no-verify", trace,
             f"blkverify:{raw}:{test}"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(out.stderr)
        replay = json.loads(out.stdout)
        result["replay_s"] = replay["elapsed_s"]
        result["replay_wall_s"] = time.monotonic() - started
        result["replay_ops_per_s"] = replay["ops_per_s"]
    return result


def fs_build(d: Path, tree: Path, size: int) -> dict:
    raw, test = fresh_pair(d, "qcow2", size)
    trace = d / "fs.bvt"
    serve = Serve("--persistent", "--trace", trace, raw, test)
    mnt = d / "mnt"
    mnt.mkdir(exist_ok=True)
    fuse = subprocess.Popen(["nbdfuse", mnt / "disk", serve.uri], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not (mnt / "disk").exists():
            assert time.monotonic() < deadline and fuse.poll() is None, "nbdfuse did not mount"
            time.sleep(0.05)
        started = time.monotonic()
        run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, mnt / "disk"])
        elapsed = time.monotonic() - started
    finally:
        subprocess.run(["fusermount3", "-u", mnt], check=False)
        try:
            fuse.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(fuse.pid, signal.SIGKILL)
            fuse.wait()
        serve.stop()
    summary = [line for line in serve.stderr().splitlines() if "serve: trace " in line]
    import blkverify_rs as bv

    recording = bv.Recording(trace)
    written = sum(op[3] for op in recording.ops() if op[1].startswith("write "))
    return {
        "trace_bytes": trace.stat().st_size,
        "written": written,
        "requests": len(recording),
        "mke2fs_s": elapsed,
        "summary": summary[0] if summary else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ios", type=int, default=60000)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--tree", type=Path, default=Path("/usr/share/doc"))
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    size = args.size_mib << 20
    load_before = os.getloadavg()
    results: dict[tuple[str, bool], list[dict]] = {}
    formats = ["raw", "qcow2"]
    for r in range(args.rounds):
        order = formats[r % 2 :] + formats[: r % 2]
        for fmt in order:
            modes = [False, True] if (r // 2) % 2 == 0 else [True, False]
            for traced in modes:
                res = one_run(args.dir, fmt, traced, args.ios, size)
                results.setdefault((fmt, traced), []).append(res)
                print(f"round {r + 1} {fmt} {'traced' if traced else 'plain'}: {res}", flush=True)
    load_after = os.getloadavg()
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print()
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}")
    print()
    print("| test | serve (ops/s) | serve --trace (ops/s) | traced/plain | serve CPU/op plain | "
          "traced | fio CPU/op | VmHWM plain | VmHWM traced | replay (s) | fio's run (s) | "
          "replay ops/s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for fmt in formats:
        plain, traced = results[(fmt, False)], results[(fmt, True)]
        p_ops = med([x["ops_per_s"] for x in plain])
        t_ops = med([x["ops_per_s"] for x in traced])
        print(
            f"| {fmt} | {p_ops:,.0f} | {t_ops:,.0f} | {t_ops / p_ops:.2f} | "
            f"{med([x['serve_cpu_us_per_op'] for x in plain]):.1f} µs | "
            f"{med([x['serve_cpu_us_per_op'] for x in traced]):.1f} µs | "
            f"{med([x['fio_cpu_us_per_op'] for x in plain + traced]):.1f} µs | "
            f"{med([x['hwm_mib'] for x in plain]):.0f} MiB | "
            f"{med([x['hwm_mib'] for x in traced]):.0f} MiB | "
            f"{med([x['replay_s'] for x in traced]):.2f} | "
            f"{med([x['runtime_s'] for x in traced]):.2f} | "
            f"{med([x['replay_ops_per_s'] for x in traced]):,.0f} |"
        )
    fio_bytes = [x["trace_bytes"] / x["written"] * GIB for xs in results.values() for x in xs
                 if "trace_bytes" in x]  # fmt: skip
    print()
    print(f"fio's data: {med(fio_bytes) / (1 << 20):.0f} MiB of trace per GiB written")
    fs = fs_build(args.dir, args.tree, size)
    per = fs["trace_bytes"] / fs["written"] * GIB / (1 << 20)
    print(
        f"mke2fs -d {args.tree}: {fs['requests']} requests, {fs['written'] / (1 << 20):.0f} MiB "
        f"written in {fs['mke2fs_s']:.1f} s, trace {fs['trace_bytes'] / (1 << 20):.1f} MiB: "
        f"{per:.0f} MiB per GiB written"
    )
    print(fs["summary"])


if __name__ == "__main__":
    main()
