"""``serve --trace``, ``blkverify replay`` and ``blkverify shrink`` (issue 22).

Real clients (qemu-io scripts, mke2fs through nbdfuse) drive ``blkverify serve``
in front of the planted-bug NBD server with a trace; the trace then replays
without the client, from copies of the images as they were when serve started,
and meets serve's finding at the same request, with the same message and
sector; shrink cuts it to a handful of requests that still fail. Each replay or
shrink trial gets a fresh bug server over a fresh copy of its file through
``--test-command``. A trace whose serve was SIGKILLed replays up to its last
whole record; damaged traces are one-line errors with exit status 2.

Every process a test starts (serve, the bug servers, nbdfuse, fio) is stopped
by its PID (or, for the test command, its process group) at teardown.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import blkverify_rs as bv
import pytest
from bug_server import PLUGIN
from conftest import KiB, MiB, qemu_img, run, run_cli
from test_serve import Mounted, make_tree

SIZE = 32 * MiB
CLUSTER = 64 * KiB


@pytest.fixture
def nbdfuse():
    """Mount exports with nbdfuse (test_serve's); every mount is undone (and
    nbdfuse stopped by PID) at teardown."""
    mounts: list[Mounted] = []

    def mount(mnt: Path, uri: str) -> Mounted:
        m = Mounted(mnt, uri)
        mounts.append(m)
        return m

    yield mount
    for m in mounts:
        if m.proc.poll() is None:
            m.unmount()


@pytest.fixture(scope="module")
def clusters(tmp_path_factory) -> Path:
    """A raw disk whose 64 KiB cluster i holds the byte i + 1: neighbours differ."""
    p = tmp_path_factory.mktemp("clusters") / "base.raw"
    qemu_img("create", "-f", "raw", p, 4 * MiB)
    run(
        [
            "qemu-io",
            "-f",
            "raw",
            *(a for i in range(64) for a in ("-c", f"write -P {i + 1} {i * CLUSTER} 64k")),
            p,
        ]
    )
    return p


def bug_command(pristine: Path, bug: str) -> str:
    """The test command of a fresh planted-bug server over a fresh copy of
    ``pristine``, on the socket shrink and replay give it."""
    return (
        f"cp {shlex.quote(str(pristine))} {{dir}}/disk.raw && exec nbdkit -f -t 1 "
        f"-U {{socket}} python {shlex.quote(str(PLUGIN))} file={{dir}}/disk.raw bug={bug}"
    )


def same_finding(replayed: dict, live: dict) -> None:
    for key in ("message", "request", "sector", "kind", "connection", "op"):
        assert replayed[key] == live[key], (key, replayed, live)


def replay_json(*args) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_cli("replay", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, json.loads(proc.stdout)


# --------------------------------------------------------------------------------------
# real clients on the planted-bug server: record, replay, shrink
# --------------------------------------------------------------------------------------


def test_qemu_io_scripts_are_traced_replayed_and_shrunk(
    tmp_path: Path, serve, bug_server, clusters: Path
) -> None:
    raw, disk = tmp_path / "raw.img", tmp_path / "disk.raw"
    shutil.copyfile(clusters, raw)
    shutil.copyfile(clusters, disk)
    trace = tmp_path / "qemu-io.bvt"
    report = tmp_path / "report.jsonl"
    bugs = bug_server(disk, bugs=[("lost-write", 3)])
    server = serve("--persistent", "--trace", trace, "--report", report, raw, bugs.uri)
    # Writes across 64 KiB boundaries (what lost-write counts) between writes
    # that cross none, then reads of what they wrote, over two connections.
    writes = [f"write -P {0x40 + i} {i * 128 + 60}k 8k" for i in range(6)]
    quiet = [f"write -P 0x{0x70 + i:x} {i * 128 + 8}k 4k" for i in range(6)]
    first = [a for pair in zip(quiet, writes, strict=True) for a in pair]
    run(["qemu-io", "-f", "raw", *(a for c in first for a in ("-c", c)), server.uri])
    reads = [f"read {i * 128}k 128k" for i in range(6)]
    run(["qemu-io", "-f", "raw", *(a for c in reads for a in ("-c", c)), server.uri], check=False)
    assert server.wait(timeout=20) == 1  # --on-mismatch stop
    [fired] = bugs.fired()
    [live] = [json.loads(line) for line in report.read_text().splitlines()]
    assert live["sector"] == fired["first_sector"] and live["connection"] == 2
    assert "blkverify: serve: trace " in server.stderr()

    command = bug_command(clusters, "lost-write@3")
    proc, out = replay_json(trace, clusters, "--test-command", command)
    assert proc.returncode == 1
    [replayed] = out["mismatches"]
    same_finding(replayed, live)
    assert out["ops"] == live["request"] + 1 and out["kind"] == "trace"

    shrunk = tmp_path / "min.bvt"
    proc = run_cli("shrink", "--json", trace, shrunk, clusters, "--test-command", command)
    assert proc.returncode == 1, proc.stderr
    result = json.loads(proc.stdout)
    # Three writes that cross a boundary: the third is lost, and read back.
    assert 3 <= result["ops_after"] <= 4, result
    assert result["ops_before"] == len(bv.Recording(trace))
    assert result["finding"]["kind"] == "contents"
    proc, again = replay_json(shrunk, clusters, "--test-command", command)
    assert proc.returncode == 1
    assert again["mismatches"][0]["kind"] == "contents"
    assert again["total"] == result["ops_after"]


def test_mke2fs_through_nbdfuse_is_traced_replayed_and_shrunk(
    tmp_path: Path, serve, bug_server, nbdfuse
) -> None:
    """ext4 built by mke2fs through nbdfuse on serve in front of the planted-bug
    server, whose third write is held back; the tree read back through a fresh
    mount meets the stale sector. The trace replays to that request; shrink cuts
    its thousand requests to the few writes the bug needs."""
    pristine = tmp_path / "blank.raw"
    qemu_img("create", "-f", "raw", pristine, SIZE)
    raw, disk = tmp_path / "raw.img", tmp_path / "disk.raw"
    shutil.copyfile(pristine, raw)
    shutil.copyfile(pristine, disk)
    tree = make_tree(tmp_path / "tree")
    trace = tmp_path / "mke2fs.bvt"
    report = tmp_path / "report.jsonl"
    bugs = bug_server(disk, bugs=[("late-write", 3)])
    server = serve(
        "--persistent", "--shared", "4", "--on-mismatch", "reference",
        "--trace", trace, "--report", report, raw, bugs.uri,
    )  # fmt: skip
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", tree, mounted.path])
    mounted.unmount()
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    dump = tmp_path / "dump"
    dump.mkdir()
    run(["debugfs", "-R", f"rdump / {dump}", mounted.path])
    run(["e2fsck", "-fn", mounted.path], check=False)
    mounted.unmount()
    assert server.stop() == 1
    held = bugs.fired()[0]
    findings = [json.loads(line) for line in report.read_text().splitlines()]
    live = findings[0]
    assert live["sector"] == held["first_sector"], (held, live)
    requests = len(bv.Recording(trace))
    assert requests > 500

    command = bug_command(pristine, "late-write@3")
    result = bv.replay(trace, pristine, test_command=command)
    assert isinstance(result, bv.ReplayResult)
    [replayed] = result.mismatches
    same_finding(replayed.to_dict(), live)
    assert result.ops == live["request"] + 1 and result.total == requests

    started = time.monotonic()
    shrunk = bv.shrink(trace, tmp_path / "min.bvt", pristine, test_command=command)
    assert shrunk.ops_before == requests
    assert shrunk.ops_after <= 4, shrunk  # the three writes the bug counts, and a read
    assert shrunk.finding.kind == "contents"
    assert shrunk.kind == "trace"
    assert time.monotonic() - started < 120
    again = bv.replay(tmp_path / "min.bvt", pristine, test_command=command)
    assert again.mismatches and again.mismatches[0].kind == "contents"
    assert again.total == shrunk.ops_after


def test_a_file_systems_trace_replays_to_the_same_images(tmp_path: Path, serve, nbdfuse) -> None:
    """A correct qcow2 under mke2fs from four connections: replayed in place on
    copies, the trace leaves the very images serve left."""
    raw, test = tmp_path / "raw.img", tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, SIZE)
    qemu_img("create", "-f", "qcow2", test, SIZE)
    raw0, test0 = tmp_path / "raw0.img", tmp_path / "test0.qcow2"
    shutil.copyfile(raw, raw0)
    shutil.copyfile(test, test0)
    trace = tmp_path / "fs.bvt"
    server = serve("--persistent", "--shared", "4", "--trace", trace, raw, test)
    mounted = nbdfuse(tmp_path / "mnt", server.uri)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", make_tree(tmp_path / "tree"), mounted.path])
    mounted.unmount()
    assert server.stop() == 0
    proc, out = replay_json(trace, f"blkverify:{raw0}:{test0}", "--in-place")
    assert proc.returncode == 0 and out["verified"] and out["ops"] == out["total"]
    assert "Images are identical" in qemu_img("compare", test, test0).stdout
    assert "Images are identical" in qemu_img("compare", raw, raw0).stdout
    qemu_img("check", test0)


# --------------------------------------------------------------------------------------
# a trace cut short, damaged traces
# --------------------------------------------------------------------------------------


def test_a_trace_is_on_disk_within_a_second_and_survives_sigkill(tmp_path: Path, serve) -> None:
    raw, test = tmp_path / "raw.img", tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, SIZE)
    qemu_img("create", "-f", "qcow2", test, SIZE)
    raw0, test0 = tmp_path / "raw0.img", tmp_path / "test0.qcow2"
    shutil.copyfile(raw, raw0)
    shutil.copyfile(test, test0)
    trace = tmp_path / "killed.bvt"
    server = serve("--persistent", "--trace", trace, raw, test)
    run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "read 0 64k", server.uri])
    time.sleep(1.5)
    # Flushed within a second: the requests are in the file while serve runs.
    early = bv.Recording(trace)
    assert len(early) == 3 and early.ending is not None
    fio_args = [
        "--name=kill", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite", "--bs=4k",
        "--iodepth=8", "--size=16M", "--time_based", "--runtime=60",
    ]  # fmt: skip
    fio = subprocess.Popen(
        ["fio", *fio_args],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while trace.stat().st_size < 2 * MiB:
            assert time.monotonic() < deadline, "fio's writes never reached the trace"
            time.sleep(0.1)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
    finally:
        if fio.poll() is None:
            os.kill(fio.pid, signal.SIGKILL)
        fio.wait(timeout=30)
    recording = bv.Recording(trace)
    assert len(recording) > 100
    assert "truncated after record" in recording.ending or "no end record" in recording.ending
    proc = run_cli("replay", trace, f"blkverify:{raw0}:{test0}")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("blkverify: warning: ") and str(trace) in proc.stderr
    assert f"replay: {len(recording)} of {len(recording)} requests" in proc.stdout
    assert "No mismatch." in proc.stdout


def damaged(trace: bytes, how: str) -> bytes:
    """``trace`` damaged one way."""
    data = bytearray(trace)
    header_end = 12 + 8 + int.from_bytes(data[12:16], "little")
    if how == "magic":
        data[6] ^= 0x20
    elif how == "checksum":
        data[len(data) // 2] ^= 0x5A
    elif how == "header":
        del data[6:]
    elif how == "length":
        data[header_end : header_end + 4] = (0xFFFFFFF0).to_bytes(4, "little")
    elif how == "version":
        data[8:12] = (7).to_bytes(4, "little")
    return bytes(data)


@pytest.mark.parametrize(
    ("how", "fact"),
    [
        ("magic", "not a blkverify trace (bad magic"),
        ("checksum", "checksum mismatch: the trace is damaged"),
        ("header", "truncated header: 6 bytes"),
        ("length", "trace record 2 (at offset"),
        ("version", "trace version 7 is not supported"),
    ],
)
def test_a_damaged_trace_is_a_one_line_error(tmp_path: Path, how: str, fact: str) -> None:
    raw, test = tmp_path / "raw.img", tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, 4 * MiB)
    qemu_img("create", "-f", "qcow2", test, 4 * MiB)
    trace = tmp_path / "good.bvt"
    with bv.serve(raw, test, trace=trace, persistent=True) as server:
        run(
            [
                "qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 1M 64k",
                "-c", "read 0 64k", server.uri,
            ]
        )  # fmt: skip
    bad = tmp_path / f"{how}.bvt"
    bad.write_bytes(damaged(trace.read_bytes(), how))
    for command in (("replay", bad, f"blkverify:{raw}:{test}"), ("shrink", bad, tmp_path / "o")):
        proc = run_cli(*command)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stdout == ""
        assert proc.stderr.startswith(f"blkverify: error: {bad}: "), proc.stderr
        assert fact in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr
    if how == "length":
        assert "is absurd" in run_cli("replay", bad, f"blkverify:{raw}:{test}").stderr


def test_replay_names_what_it_needs(tmp_path: Path) -> None:
    raw, test = tmp_path / "raw.img", tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, 4 * MiB)
    qemu_img("create", "-f", "qcow2", test, 4 * MiB)
    trace = tmp_path / "t.bvt"
    with bv.serve(raw, test, trace=trace, persistent=True) as server:
        run(["qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", server.uri])
    summary = server.summary
    assert summary is not None and summary.trace is not None
    assert summary.trace["requests"] == 2 and summary.trace["write_bytes"] == 64 * KiB
    # A trace names the images serve changed: the ones to replay on are named.
    proc = run_cli("replay", trace)
    assert proc.returncode == 2 and "as they were when serve started" in proc.stderr
    small = tmp_path / "small.raw"
    qemu_img("create", "-f", "raw", small, 1 * MiB)
    proc = run_cli("replay", trace, f"blkverify:{small}:{small}")
    assert proc.returncode == 2 and "recorded on a device of 4194304 bytes" in proc.stderr
    nbd = f"blkverify:{raw}:nbd+unix:///?socket={tmp_path / 'none.sock'}"
    proc = run_cli("shrink", trace, tmp_path / "o.bvt", nbd)
    assert proc.returncode == 2 and "an NBD export" in proc.stderr
    assert "--test-command" in proc.stderr
    proc = run_cli("replay", trace, raw, "--test-command", "exit 3")
    assert proc.returncode == 2 and "the test command exited (3)" in proc.stderr
    not_a_record = tmp_path / "x.txt"
    not_a_record.write_text("hello\n")
    proc = run_cli("replay", not_a_record, f"blkverify:{raw}:{test}")
    assert proc.returncode == 2
    assert "neither a blkverify exercise log" in proc.stderr and "serve trace" in proc.stderr


# --------------------------------------------------------------------------------------
# one engine: op logs through replay and shrink, traces through exercise --replay
# --------------------------------------------------------------------------------------


def test_an_op_log_replays_and_shrinks_through_the_same_commands(tmp_path: Path) -> None:
    from test_exercise import op_lines, shared_cluster_qcow2

    raw, img = shared_cluster_qcow2(tmp_path)
    pristine = (raw.read_bytes(), img.read_bytes())
    work_raw, work_img = tmp_path / "w.raw", tmp_path / "w.qcow2"
    work_raw.write_bytes(pristine[0])
    work_img.write_bytes(pristine[1])
    log = tmp_path / "fail.log"
    res = bv.exercise(
        f"blkverify:{work_raw}:{work_img}",
        ops=300,
        seed=2,
        mix="read=50,write=40,flush=10",
        size_mix="512=1,4k=2,16k=1",
        log=log,
    )
    assert not res.clean
    spec = f"blkverify:{raw}:{img}"
    proc, out = replay_json(log, spec)
    assert proc.returncode == 1 and out["kind"] == "log"
    assert out["mismatches"][0]["message"] == res.mismatches[0].message
    assert out["mismatches"][0]["request"] == res.mismatches[0].op_number
    assert out["mismatches"][0]["connection"] is None
    out_log = tmp_path / "min.log"
    proc = run_cli("shrink", log, out_log, spec)
    assert proc.returncode == 1, proc.stderr
    assert len(op_lines(out_log)) == 1
    assert (raw.read_bytes(), img.read_bytes()) == pristine
    # exercise --replay takes a trace too, and writes its SPEC in place.
    trace = tmp_path / "t.bvt"
    with bv.serve(work_raw, work_img, trace=trace, persistent=True, on_mismatch="eio") as server:
        run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4k", server.uri])
    again = bv.exercise(f"blkverify:{raw}:{img}", replay=trace)
    assert again.ops == 2
    assert (raw.read_bytes(), img.read_bytes()) != pristine


def test_a_trace_that_cannot_be_written_stops_serve(tmp_path: Path) -> None:
    """A full disk (here: a file-size limit on serve's process) stops serve with
    the trace's error and exit 2, rather than leave a trace with a hole."""
    import resource

    raw, test = tmp_path / "raw.img", tmp_path / "test.img"
    for p in (raw, test):
        qemu_img("create", "-f", "raw", p, 4 * MiB)
    trace = tmp_path / "full.bvt"

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 * MiB, 1 * MiB))

    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "blkverify_rs",
            "serve",
            "--persistent",
            "--trace",
            trace,
            raw,
            test,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limited,
    )
    try:
        assert server.stdout is not None
        uri = server.stdout.readline().decode().strip()
        # Incompressible writes inside the images' first 512 KiB (which the
        # limit allows), until the trace passes 1 MiB.
        for i in range(4):
            data = tmp_path / f"noise{i}"
            data.write_bytes(os.urandom(512 * KiB))
            run(["qemu-io", "-f", "raw", "-c", f"write -s {data} 0 512k", uri], check=False)
        _, stderr = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
    text = stderr.decode()
    assert server.returncode == 2, text
    assert "stopped by the trace could not be written" in text
    assert text.splitlines()[-1].startswith(f"blkverify: error: {trace}: write the trace: ")
    assert "File too large" in text
    # What reached the file replays, up to its last whole record.
    assert len(bv.Recording(trace)) >= 1


def test_requests_real_clients_never_send_are_traced_too(tmp_path: Path) -> None:
    """An empty write and a FUA write from a raw NBD client (what qemu-io does
    not send) are recorded, and the trace replays them."""
    from test_serve import nbd_connect, recv_exactly, request

    raw, test = tmp_path / "raw.img", tmp_path / "test.qcow2"
    qemu_img("create", "-f", "raw", raw, 4 * MiB)
    qemu_img("create", "-f", "qcow2", test, 4 * MiB)
    raw0, test0 = tmp_path / "raw0.img", tmp_path / "test0.qcow2"
    shutil.copyfile(raw, raw0)
    shutil.copyfile(test, test0)
    trace = tmp_path / "raw-client.bvt"
    with bv.serve(raw, test, trace=trace, persistent=True) as server:
        s = nbd_connect(server.uri)
        s.sendall(request(1, 4096, 0, cookie=1))  # an empty write
        s.sendall(request(1, 8192, 512, cookie=2, flags=1) + b"\x5a" * 512)  # FUA
        s.sendall(request(0, 8192, 512, cookie=3))
        for _ in range(3):
            recv_exactly(s, 16)
        recv_exactly(s, 512)
        s.close()
        time.sleep(0.2)
    recording = bv.Recording(trace)
    assert [op[1] for op in recording.ops()] == [
        "write 4096 0",
        "write 8192 512 fua",
        "read 8192 512",
    ]
    result = bv.replay(trace, f"blkverify:{raw0}:{test0}")
    assert result.clean and result.ops == 3 and result.verified


# --------------------------------------------------------------------------------------
# a traced connection to an NBD side: its requests reach that side in number order
# --------------------------------------------------------------------------------------


def nbdkit_log_writes(log: Path) -> list[tuple[int, int]]:
    """The writes nbdkit's log filter saw, in the order they came: (offset, count)."""
    writes = []
    for line in log.read_text().splitlines():
        # "... connection=1 Write id=3 offset=0x1000 count=0x1000 fua=0 ..." (the
        # request; its reply's line reads "...Write id=3 return=0")
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if " Write id=" in line:
            writes.append((int(fields["offset"], 16), int(fields["count"], 16)))
    return writes


def test_a_traced_connection_reaches_an_nbd_side_in_the_traces_order(tmp_path: Path, serve) -> None:
    """fio keeps 16 random writes in flight, in bursts; serve, tracing, runs a
    connection's requests one at a time in number order when a side is an NBD
    export, so the export (nbdkit, whose log filter records what arrives) sees
    them in the trace's order, and a replay at queue depth 1 repeats it. (nbdkit
    runs one thread per connection, ``-t 1``, so its log holds the arrival order.)"""
    size = 64 * MiB
    raw, disk = tmp_path / "raw.img", tmp_path / "disk.raw"
    for path in (raw, disk):
        with open(path, "wb") as f:
            f.truncate(size)
    log, sock, trace = tmp_path / "nbdkit.log", tmp_path / "nbdkit.sock", tmp_path / "t.bvt"
    errors = tmp_path / "nbdkit.err"
    with open(errors, "wb") as err:
        nbdkit = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-t", "1", "-U", sock, "--filter=log", "file",
             disk, f"logfile={log}"],
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert nbdkit.poll() is None and time.monotonic() < deadline, errors.read_text()
            time.sleep(0.05)
        server = serve("--persistent", "--trace", trace, raw, f"nbd+unix:///?socket={sock}")
        fio = run(
            ["fio", "--name=order", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
             "--bs=4k", "--iodepth=16", "--iodepth_batch_submit=16",
             "--iodepth_batch_complete_min=16", "--size=60M", "--number_ios=400",
             f"--directory={tmp_path}"],
        )  # fmt: skip
        assert fio.returncode == 0, fio.stderr
        server.stop()
    finally:
        nbdkit.terminate()
        nbdkit.wait(timeout=30)
    traced = [(offset, length) for _n, line, offset, length, _w, _c in bv.Recording(trace).ops()
              if line.split()[0] == "write"]  # fmt: skip
    seen = nbdkit_log_writes(log)
    assert len(traced) == 400, len(traced)
    assert sorted(seen) == sorted(traced)  # the same writes reached nbdkit...
    assert seen == traced  # ...in the trace's order
