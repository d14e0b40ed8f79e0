"""``blkverify exercise``: the seeded workload against real drivers (QEMU's qcow2 served by
qemu-nbd, our qcow2 driver, nbdkit memory), each checked afterwards with ``qemu-img check``
and ``compare``; faults injected through nbdkit (a failing write, a server that silently
drops writes to one byte) must be reported at the exact op and sector, and the op log must
reproduce them on fresh images. Images are small (8 MiB) and runs short.
"""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import blkverify_rs as bv
import pytest
from conftest import MiB, convert_to_raw, l2_entry_offset, qemu_img, qemu_io, run, run_cli
from test_nbd import Nbdkit, QemuNbd

SIZE = 8 * MiB
# No 4 MiB requests on an 8 MiB disk: keeps each case well under a second.
SIZE_MIX = "512=10,4k=35,16k=15,64k=20,256k=12,1M=8"


def make_qcow2(d: Path, kind: str) -> Path:
    """A qcow2 of the given kind with some data already in it (made by qemu-img/qemu-io)."""
    img = d / f"{kind}.qcow2"
    writes = ["write -P 0x11 0 1M", "write -P 0x22 3M 256k", "write -P 0x33 7M 64k"]
    if kind == "c64k":
        qemu_img("create", "-f", "qcow2", img, SIZE)
    elif kind == "c4k":
        qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4k", img, SIZE)
    elif kind == "extl2":
        qemu_img("create", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", img, SIZE)
    elif kind == "compressed":
        src = d / "src.qcow2"
        qemu_img("create", "-f", "qcow2", src, SIZE)
        qemu_io(src, *writes)
        qemu_img("convert", "-c", "-O", "qcow2", src, img)
        return img
    elif kind == "backing":
        base = d / "base.qcow2"
        qemu_img("create", "-f", "qcow2", base, SIZE)
        qemu_io(base, *writes)
        qemu_img("create", "-f", "qcow2", "-b", base.name, "-F", "qcow2", img)
        qemu_io(img, "write -P 0x44 2M 128k")
        return img
    else:
        raise AssertionError(kind)
    qemu_io(img, *writes)
    return img


def reference(img: Path) -> Path:
    raw = img.with_suffix(".raw")
    convert_to_raw(img, raw)
    return raw


def check_and_compare(raw: Path, img: Path) -> None:
    check = run(["qemu-img", "check", img], check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, img)


def exercise_cli(*args) -> tuple[subprocess.CompletedProcess, dict]:
    proc = run_cli("exercise", "--json", *args)
    assert proc.returncode in (0, 1), proc.stderr
    return proc, json.loads(proc.stdout)


QCOW2_KINDS = ["c64k", "c4k", "extl2", "compressed", "backing"]


@pytest.mark.parametrize("kind", QCOW2_KINDS)
def test_qemu_qcow2_over_nbd_runs_clean(tmp_path: Path, kind: str) -> None:
    img = make_qcow2(tmp_path, kind)
    raw = reference(img)
    server = QemuNbd(img, "qcow2", tmp_path / "q.sock")
    try:
        queue_depth = 4 if kind in ("c64k", "backing") else 1
        proc, out = exercise_cli(
            f"blkverify:{raw}:{server.uri}",
            "--seed",
            "7",
            "--ops",
            "1500",
            "--size-mix",
            SIZE_MIX,
            "--queue-depth",
            queue_depth,
        )
    finally:
        server.stop()
    assert proc.returncode == 0, out["mismatches"]
    assert out["ops"] == 1500 and out["seed"] == 7 and out["mismatches"] == []
    assert out["verified"] and out["test_format"] == "nbd"
    assert out["bytes_written"] > 0 and out["bytes_read"] > 0
    assert out["ops_per_s"] > 0
    check_and_compare(raw, img)


@pytest.mark.parametrize("kind", QCOW2_KINDS)
def test_our_qcow2_driver_runs_clean(tmp_path: Path, kind: str) -> None:
    img = make_qcow2(tmp_path, kind)
    raw = reference(img)
    res = bv.exercise(f"blkverify:{raw}:{img}", ops=2000, seed=11, size_mix=SIZE_MIX, queue_depth=2)
    assert res.clean, res.mismatches
    assert res.verified and res.test_format == "qcow2" and res.ops == 2000
    check_and_compare(raw, img)


def test_nbdkit_memory_runs_clean(tmp_path: Path) -> None:
    raw = tmp_path / "zeros.raw"
    raw.write_bytes(bytes(SIZE))
    server = Nbdkit(tmp_path / "m.sock", "memory", str(SIZE))
    try:
        res = bv.exercise(
            f"blkverify:{raw}:{server.uri}", ops=1500, seed=3, size_mix=SIZE_MIX, queue_depth=4
        )
        assert res.clean, res.mismatches
        assert res.verified
        # and what the server holds afterwards is the reference, byte for byte
        assert bv.verify(raw, server.uri).identical
    finally:
        server.stop()


def raw_pair(d: Path, name: str) -> tuple[Path, Path]:
    raw = d / f"{name}.ref"
    test = d / f"{name}.img"
    qemu_img("create", "-f", "raw", raw, SIZE)
    qemu_io(raw, "write -P 0x5a 1M 2M", fmt="raw")
    shutil.copyfile(raw, test)
    return raw, test


def op_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line[:1].isdigit()]


def test_same_seed_same_ops_whatever_the_queue_depth(tmp_path: Path) -> None:
    logs = []
    for i, queue_depth in enumerate([1, 4, 1]):
        raw, test = raw_pair(tmp_path, f"p{i}")
        log = tmp_path / f"ops{i}.log"
        seed = 99 if i < 2 else 100
        res = bv.exercise(
            f"blkverify:{raw}:{test}", ops=800, seed=seed, queue_depth=queue_depth, log=log
        )
        assert res.clean
        logs.append(log)
    first, second, other = (op_lines(p) for p in logs)
    assert len(first) == 800 and first == second
    assert first != other
    assert (tmp_path / "p0.img").read_bytes() == (tmp_path / "p1.img").read_bytes()


def test_the_default_mix_is_read_heavy_with_every_kind(tmp_path: Path) -> None:
    raw, test = raw_pair(tmp_path, "m")
    log = tmp_path / "ops.log"
    res = bv.exercise(f"blkverify:{raw}:{test}", ops=2000, seed=1, log=log)
    assert res.mix == "read=60,write=25,zero=5,discard=5,flush=5"
    kinds = [line.split()[1] for line in op_lines(log)]
    counts = {k: kinds.count(k) for k in ("read", "write", "zero", "discard", "flush")}
    assert counts["read"] > counts["write"] > counts["zero"] > 0
    assert counts["discard"] > 0 and counts["flush"] > 0
    lengths = [int(line.split()[3]) for line in op_lines(log) if "flush" not in line]
    assert min(lengths) < 512 and max(lengths) >= 1 * MiB
    offsets = [int(line.split()[2]) for line in op_lines(log) if "flush" not in line]
    assert any(o % 512 for o in offsets) and any(o % 4096 == 0 for o in offsets)


# ---------------------------------------------------------------------------------------
# faults
# ---------------------------------------------------------------------------------------


def same_finding(a: dict, b: dict) -> bool:
    """Equal but for the error texts, which name the (per-run) server socket."""
    skip = ("test_error", "raw_error")
    return {k: v for k, v in a.items() if k not in skip} == {
        k: v for k, v in b.items() if k not in skip
    }


def first_write(log: Path) -> str:
    return next(line for line in op_lines(log) if line.split()[1] == "write")


def test_a_failing_write_is_named_and_the_log_reproduces_it(tmp_path: Path) -> None:
    results = []
    for attempt in ("run", "replay"):
        raw, test = raw_pair(tmp_path, attempt)
        server = Nbdkit(
            tmp_path / f"{attempt}.sock",
            "--filter=error",
            "file",
            str(test),
            "error-pwrite=EIO",
            "error-pwrite-rate=100%",
        )
        try:
            spec = f"blkverify:{raw}:{server.uri}"
            if attempt == "run":
                log = tmp_path / "fail.log"
                proc, out = exercise_cli(spec, "--seed", "5", "--ops", "300", "--log", log)
            else:
                proc, out = exercise_cli("--replay", log, spec)
        finally:
            server.stop()
        assert proc.returncode == 1
        results.append(out["mismatches"][0])
    found, replayed = results
    number, _, offset, length = first_write(log).split()
    assert found["op_number"] == int(number)
    assert found["op"] == f"write {offset} {length}"
    assert found["kind"] == "return_value"
    assert (found["test_ret"], found["raw_ret"]) == (-5, 0)
    sector, count = int(offset) // 512, -(-(int(offset) + int(length)) // 512) - int(offset) // 512
    assert found["message"] == (
        f"blkverify: write sector_num={sector} nb_sectors={count} return value mismatch -5 != 0"
    )
    assert same_finding(replayed, found)
    assert op_lines(log)[-1] == first_write(log)  # it stopped there


# A test-side failure is a finding wherever it strikes. Each fault with a mix under which
# it all but surely strikes within 2000 ops (the chance that it never does is below 1e-8):
# failing reads hit read ops, the read-back that checks a discard and the final verify
# (the default mix, as in issue 10's reproducer); writes, trims and flushes their own ops.
FAULTS = {
    "pread": ("error-pread-rate=0.02", None, {None, "read", "discard"}),
    "pwrite": ("error-pwrite-rate=0.02", "read=50,write=50", {"write"}),
    "trim": ("error-trim-rate=0.02", "read=50,discard=50", {"discard"}),
    "flush": (None, "write=1,flush=9", {None, "flush"}),
}


def faulty_server(sock: Path, image: Path, rate: str | None) -> Nbdkit:
    """A 32 MiB nbdkit export whose requests of one kind fail with EIO at random, about
    one in fifty: memory behind the error filter; for flushes, which nbdkit 1.32's error
    filter cannot fail, the eval plugin over ``image`` with a failing flush script.
    Neither offers block status (the noextents filter): every check reads, where a
    range the server calls zero would not be read at all."""
    if rate is not None:
        return Nbdkit(
            sock, "--filter=noextents", "--filter=error", "memory", "32M", rate, "error=EIO"
        )
    return Nbdkit(
        sock,
        "eval",
        f"get_size=stat -L -c %s {image}",
        "can_write=exit 0",
        "can_flush=exit 0",
        f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=dd of={image} seek=$4 oflag=seek_bytes conv=notrunc bs=64k iflag=fullblock "
        "status=none",
        "flush=if [ $(od -An -N1 -tu1 /dev/urandom) -lt 5 ]; then "
        "echo EIO flush failed >&2; exit 1; fi",
    )


def zero_image(path: Path) -> Path:
    with open(path, "wb") as f:
        f.truncate(32 * MiB)
    return path


@pytest.mark.parametrize("fault", FAULTS)
def test_a_failing_test_side_is_a_finding_for_every_seed(tmp_path: Path, fault: str) -> None:
    rate, mix, op_kinds = FAULTS[fault]
    for seed in range(1, 7):
        raw = zero_image(tmp_path / f"{seed}.raw")
        server = faulty_server(
            tmp_path / f"{seed}.sock", zero_image(tmp_path / f"{seed}.img"), rate
        )
        try:
            args = ["--ops", "2000", "--seed", str(seed), *(["--mix", mix] if mix else [])]
            proc = run_cli("exercise", "--json", f"blkverify:{raw}:{server.uri}", *args)
        finally:
            server.stop()
        assert proc.returncode == 1, (seed, proc.stderr)
        found = json.loads(proc.stdout)["mismatches"][0]
        assert found["kind"] == "return_value", found
        assert (found["test_ret"], found["raw_ret"]) == (-5, 0)
        assert "return value mismatch -5 != 0" in found["message"]
        assert (found["op"] or " ").split()[0] in op_kinds or found["op"] is None, found
        assert found["op"] is not None or found["phase"] in ("final flush", "final verify")


def test_a_failing_read_back_after_a_discard_is_that_discards_finding(tmp_path: Path) -> None:
    raw = zero_image(tmp_path / "d.raw")
    server = faulty_server(tmp_path / "d.sock", raw, "error-pread-rate=100%")
    try:
        proc = run_cli(
            "exercise", f"blkverify:{raw}:{server.uri}", "--mix", "discard=1", "--seed", "3"
        )
    finally:
        server.stop()
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[1].startswith("blkverify: discard sector_num="), proc.stdout
    assert lines[1].endswith(" return value mismatch -5 != 0")
    assert lines[2].startswith("  at op 0: discard ")
    assert "Input/output error" in lines[3]
    assert "blkverify exercise" in lines[-1]  # the command that reproduces it


def test_a_failing_read_in_the_final_verify_is_a_finding(tmp_path: Path) -> None:
    raw = zero_image(tmp_path / "v.raw")
    server = faulty_server(tmp_path / "v.sock", raw, "error-pread-rate=100%")
    try:
        proc = run_cli(
            "exercise", "--json", f"blkverify:{raw}:{server.uri}", "--mix", "write=1", "--ops", "20"
        )
    finally:
        server.stop()
    assert proc.returncode == 1, proc.stderr
    out = json.loads(proc.stdout)
    found = out["mismatches"][0]
    assert (found["phase"], found["op"], found["kind"]) == ("final verify", None, "return_value")
    assert found["message"].startswith("blkverify: final verify: read sector_num=0 nb_sectors=")
    assert found["message"].endswith(" return value mismatch -5 != 0")
    assert found["sector"] == 0 and "Input/output error" in found["test_error"]
    assert out["reproduce"].startswith("blkverify exercise")


def dropping_server(sock: Path, image: Path, victim: int) -> Nbdkit:
    """An nbdkit file-like export (the eval plugin) that silently drops every write
    covering byte ``victim``: the lost write a guest would never notice."""
    return Nbdkit(
        sock,
        "eval",
        f"get_size=stat -L -c %s {image}",
        "can_write=exit 0",
        f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none",
        f"pwrite=if [ $4 -le {victim} ] && [ $(($4 + $3)) -gt {victim} ]; then cat >/dev/null; "
        f"else dd of={image} seek=$4 oflag=seek_bytes conv=notrunc bs=64k iflag=fullblock "
        "status=none; fi",
    )


def expected_finding(log: Path, victim: int) -> tuple[int | None, int]:
    """Model the dropping server: bytes of a dropped write differ until a kept write
    covers them. Returns (the first read op that sees a bad byte, its first bad byte);
    op None means only the final verify can see it."""
    bad = bytearray(SIZE)
    for line in op_lines(log):
        number, kind, *rest = line.split()
        if kind == "flush":
            continue
        offset, length = int(rest[0]), int(rest[1])
        if kind == "write":
            dropped = offset <= victim < offset + length
            bad[offset : offset + length] = (b"\1" if dropped else b"\0") * length
        elif kind == "read":
            at = bad.find(b"\1", offset, offset + length)
            if at >= 0:
                return int(number), at
    return None, bad.find(b"\1")


def test_a_silently_dropped_write_is_caught_at_the_exact_op_and_sector(tmp_path: Path) -> None:
    victim = 1 * MiB + 3 * 4096 + 100
    mix = "read=60,write=40"
    findings = []
    args = ("--seed", "1", "--ops", "400", "--mix", mix, "--size-mix", SIZE_MIX)
    log = tmp_path / "drop.log"
    for attempt in ("run", "human", "replay"):
        raw, test = raw_pair(tmp_path, attempt)
        server = dropping_server(tmp_path / f"{attempt}.sock", test, victim)
        try:
            spec = f"blkverify:{raw}:{server.uri}"
            if attempt == "run":
                proc, out = exercise_cli(spec, *args, "--log", log)
            elif attempt == "human":
                human = run_cli("exercise", spec, *args)  # the same run, as a person sees it
                human_spec = spec
                continue
            else:
                proc, out = exercise_cli("--replay", log, spec)
        finally:
            server.stop()
        assert proc.returncode == 1, out
        findings.append(out["mismatches"][0])
    found, replayed = findings
    op, first_bad = expected_finding(tmp_path / "drop.log", victim)
    assert found["op_number"] == op
    assert found["first_byte"] == first_bad and found["sector"] == first_bad // 512
    assert found["kind"] == "contents"
    # the hexdump shows both sides and marks the difference; the lost write is named
    assert any(" test " in line for line in found["hexdump"])
    assert any("^^" in line for line in found["hexdump"])
    assert found["last_change"] is not None and " write " in found["last_change"]
    assert same_finding(replayed, found)
    # the human report names the op, shows the bytes, and the command reproduces it
    assert human.returncode == 1
    assert f"at op {op}: " in human.stdout
    assert "Reproduce" in human.stdout
    command = shlex.split(human.stdout.splitlines()[-1])
    assert command[:3] == ["blkverify", "exercise", human_spec]
    assert command[command.index("--seed") + 1] == "1"
    assert int(command[command.index("--ops") + 1]) == op + 1


def shared_cluster_qcow2(d: Path) -> tuple[Path, Path]:
    """A qcow2 whose L2 maps guest clusters 0 and 1 to the same host cluster (refcount 1):
    reads agree with the reference until a write to one shows up in the other."""
    img = d / "shared.qcow2"
    qemu_img("create", "-f", "qcow2", img, SIZE)
    qemu_io(img, "write -P 0x61 0 64k", "write -P 0x62 64k 64k")
    with open(img, "r+b") as f:
        f.seek(l2_entry_offset(img, 0))
        entry = f.read(8)
        f.seek(l2_entry_offset(img, 65536))
        f.write(entry)
    return reference(img), img


def test_shrink_finds_the_one_write_that_corrupts(tmp_path: Path) -> None:
    raw, img = shared_cluster_qcow2(tmp_path)
    pristine = (raw.read_bytes(), img.read_bytes())
    work_raw, work_img = tmp_path / "w.raw", tmp_path / "w.qcow2"
    work_raw.write_bytes(pristine[0])
    work_img.write_bytes(pristine[1])
    log = tmp_path / "fail.log"
    # small requests: the finding comes from one of the few writes into the shared clusters
    res = bv.exercise(
        f"blkverify:{work_raw}:{work_img}",
        ops=300,
        seed=2,
        mix="read=50,write=40,flush=10",
        size_mix="512=1,4k=2,16k=1",
        log=log,
    )
    assert not res.clean
    before = len(op_lines(log))
    out = tmp_path / "min.log"
    proc = run_cli("exercise", "--replay", log, "--shrink", out, f"blkverify:{raw}:{img}")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.startswith(f"shrunk {before} ops to 1 in ")
    (kept,) = op_lines(out)
    _, kind, offset, _ = kept.split()
    assert kind == "write" and int(offset) < 128 * 1024  # a write into the shared clusters
    # ... whose bytes turn up 64 KiB away, in the other guest cluster
    assert "misplaced by +0x10000 bytes" in proc.stdout or "misplaced by -0x10000" in proc.stdout
    # the originals were only read, and no copies are left behind
    assert (raw.read_bytes(), img.read_bytes()) == pristine
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    # the minimal log fails on its own; without its one op the images agree
    work_raw.write_bytes(pristine[0])
    work_img.write_bytes(pristine[1])
    again = bv.exercise(f"blkverify:{work_raw}:{work_img}", replay=out)
    assert again.mismatches and again.mismatches[0].kind == "contents"
    assert bv.verify(raw, img).identical


def test_shrink_refuses_nbd_and_logs_that_do_not_fail(tmp_path: Path) -> None:
    raw, test = raw_pair(tmp_path, "s")
    log = tmp_path / "ok.log"
    assert bv.exercise(f"blkverify:{raw}:{test}", ops=50, seed=1, log=log).clean
    proc = run_cli("exercise", "--replay", log, "--shrink", tmp_path / "o.log")
    assert proc.returncode == 2 and "finds nothing, so there is nothing to shrink" in proc.stderr
    nbd = f"blkverify:{raw}:nbd+unix:///?socket={tmp_path / 'x.sock'}"
    proc = run_cli("exercise", "--replay", log, "--shrink", tmp_path / "o.log", nbd)
    assert proc.returncode == 2 and "an NBD export" in proc.stderr
    proc = run_cli("exercise", "--shrink", tmp_path / "o.log", f"blkverify:{raw}:{test}")
    assert proc.returncode == 2 and "--shrink needs --replay" in proc.stderr


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------


def test_size_mix_takes_qemus_size_syntax(tmp_path: Path) -> None:
    raw, test = raw_pair(tmp_path, "s")
    res = bv.exercise(f"blkverify:{raw}:{test}", ops=50, seed=2, size_mix="0x200=1,1.5k=2")
    assert res.clean and res.size_mix == "512=1,1536=2"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    raw, test = raw_pair(tmp_path, "b")
    spec = f"blkverify:{raw}:{test}"
    bad_log = tmp_path / "bad.log"
    bad_log.write_text("# blkverify exercise log v1\nseed 1\n0 read 0 512\n1 wirte 0 1\n")
    cases = [
        ((spec, "--mix", "reed=1"), "unknown kind 'reed'"),
        ((spec, "--size-mix", "4k"), "'4k' is not SIZE=WEIGHT"),
        ((str(test),), "exercise needs a mirrored device"),
        ((spec, "--ops", "5", "--duration", "1"), "not both"),
        (("--replay", bad_log, spec), f"{bad_log}:4: unknown op 'wirte'"),
        ((f"blkverify:{raw}:{tmp_path / 'missing.img'}",), "missing.img"),
        (("--replay", tmp_path / "nothing.log"), "nothing.log"),
    ]
    before = test.read_bytes()
    for args, words in cases:
        proc = run_cli("exercise", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("blkverify: error:") and words in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert test.read_bytes() == before


def test_json_has_the_issue_fields(tmp_path: Path) -> None:
    raw, test = raw_pair(tmp_path, "j")
    proc, out = exercise_cli(f"blkverify:{raw}:{test}", "--ops", "200", "--seed", "4")
    assert proc.returncode == 0
    for key in ("ops", "seed", "elapsed_s", "ops_per_s", "bytes_read", "bytes_written"):
        assert isinstance(out[key], int | float), key
    assert out["mismatches"] == [] and out["ops"] == 200 and out["seed"] == 4


def _sigint_at_default() -> None:
    # A shell that starts jobs in the background (nohup, a job runner) hands
    # them SIGINT ignored, and Python then installs no KeyboardInterrupt handler.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_a_long_run(tmp_path: Path) -> None:
    raw, test = raw_pair(tmp_path, "c")
    spec = f"blkverify:{raw}:{test}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "blkverify_rs", "exercise", spec, "--duration", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_sigint_at_default,
    )
    try:
        time.sleep(1.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_io_on_a_blkverify_spec_with_an_nbd_test_side(tmp_path: Path) -> None:
    """The raw path ends at the first colon, so the test side may be a URI with colons."""
    raw, test = raw_pair(tmp_path, "u")
    server = QemuNbd(test, "raw", tmp_path / "u.sock")
    try:
        spec = f"blkverify:{raw}:{server.uri}"
        with bv.open(spec) as dev:
            assert dev.test == server.uri and dev.test_format == "nbd"
        proc = run_cli("io", "-c", "read -P 0x5a 1M 4k", "-c", "write -P 7 100 1000", spec)
        assert proc.returncode == 0, proc.stderr
        assert "read 4096/4096 bytes at offset 1048576" in proc.stdout
        assert "wrote 1000/1000 bytes at offset 100" in proc.stdout
    finally:
        server.stop()
    assert raw.read_bytes() == test.read_bytes()
