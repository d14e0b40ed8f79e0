"""Verifying on a Dask cluster (``batch --scheduler``, ``verify_many(client=)``)
and by range (``verify --start/--length``, ``--split``), with real processes: a
``dask scheduler`` and two named ``dask worker`` processes of one thread each
on 127.0.0.1, started once for the module and stopped by PID. Every cluster
result is compared with a local run of the same pairs; images are made with
qemu-img/qemu-io."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blkverify_rs as bv
import pytest
from blkverify_rs import cluster as cluster_module
from conftest import convert_to_raw, qemu_img, qemu_io, run_cli
from dask_cluster import Cluster, free_port

MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Workers w1 and w2, each running in a directory of its own (w1/, w2/)
    so that a relative path names a file only one of them can see."""
    root = tmp_path_factory.mktemp("cluster")
    c = Cluster(root)
    try:
        for name in ("w1", "w2"):
            (root / name).mkdir()
            c.add_worker(name, cwd=root / name)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Small pairs: identical, one differing sector, several runs, a size
    difference, the raw image of good.qcow2, and a qcow2 that is not one."""
    d = tmp_path_factory.mktemp("pairs")
    good = d / "good.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", good, str(4 * MiB))
    qemu_io(good, "write -P 0x5a 0 1M", "write -P 0x33 2M 64k")
    convert_to_raw(good, d / "good.raw")
    bad = d / "bad.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", bad, str(4 * MiB))
    qemu_io(bad, "write -P 0x5a 0 1M", "write -P 0x34 1M 512", "write -P 0x33 2M 64k")
    runs = d / "runs.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", runs, str(4 * MiB))
    qemu_io(runs, "write -P 0x5a 0 1M", "write -P 1 4k 1k", "write -P 2 3M 4k")
    longer = d / "longer.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", longer, str(5 * MiB))
    qemu_io(longer, "write -P 0x5a 0 1M", "write -P 0x33 2M 64k")
    (d / "junk.qcow2").write_bytes(b"QFI\xfb" + bytes(508))
    return {
        "dir": d,
        "good": good,
        "raw": d / "good.raw",
        "bad": bad,
        "runs": runs,
        "longer": longer,
    }


def without_elapsed(out: str) -> list[dict]:
    records = [json.loads(line) for line in out.splitlines()]
    for r in records:
        r.pop("elapsed_s", None)
    return records


def write_manifest(images: dict[str, Path], name: str, lines: list[str | dict]) -> Path:
    path = images["dir"] / name
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def batch(*args) -> subprocess.CompletedProcess:
    return run_cli("batch", "--no-progress", *args)


def test_batch_on_the_cluster_reports_what_a_local_batch_does(images, cluster):
    manifest = write_manifest(
        images,
        "mixed.txt",
        [
            "good.raw good.qcow2",
            "good.raw bad.qcow2",
            {"raw": "good.raw", "test": "runs.qcow2", "all": True},
            "good.raw longer.qcow2",
            {"raw": "good.raw", "test": "longer.qcow2", "strict": True},
            {"raw": "good.raw", "test": "good.qcow2", "workers": ["w1"]},
            {"raw": "good.raw", "test": "bad.qcow2", "workers": ["w2", "nosuch"]},
            "good.raw missing.qcow2",  # no worker can open it: that pair's error
            "good.qcow2 good.raw",  # a reference in any format
            "good.raw junk.qcow2",  # a qcow2 header that is not one: that pair's error
        ],
    )
    local = batch("--json", manifest)
    remote = batch("--json", "--scheduler", cluster.address, manifest)
    assert local.returncode == remote.returncode == 2, remote.stderr
    assert without_elapsed(remote.stdout) == without_elapsed(local.stdout)
    assert remote.stderr == local.stderr
    records = without_elapsed(remote.stdout)
    identical = [True, False, False, True, False, True, False, None, True, None]
    assert [r.get("identical") for r in records] == identical
    assert [len(r["mismatches"]) for r in records[1:3]] == [1, 3]
    assert "No such file" in records[7]["error"] and "junk.qcow2" in records[9]["error"]
    # The summary table too, but for the MiB/s column.
    local_table = batch(manifest).stdout
    remote_table = batch("--scheduler", cluster.address, manifest).stdout
    strip = lambda table: [line.rsplit(None, 1)[0] for line in table.splitlines()]  # noqa: E731
    assert strip(remote_table) == strip(local_table)


def test_the_progress_line_is_the_local_one(images, cluster):
    manifest = write_manifest(images, "progress.txt", ["good.raw good.qcow2", "good.raw bad.qcow2"])
    local = run_cli("batch", "--progress", manifest)
    remote = run_cli("batch", "--progress", "--scheduler", cluster.address, manifest)
    assert local.returncode == remote.returncode == 1
    final = re.compile(r"pairs 2/2  8\.0 MiB / 8\.0 MiB 100\.0% +[0-9.]+ MiB/s  ETA +[0-9.]+s")
    for proc in (local, remote):
        assert proc.stderr.endswith("\n")
        last = re.split(r"[\r\n]", proc.stderr.rstrip("\n"))[-1]
        assert final.fullmatch(last), proc.stderr


def test_a_pinned_pair_runs_only_where_its_files_are(cluster):
    """Each worker runs in a directory of its own: a relative path names a
    file that only the worker pinned to it can open."""
    for name in ("w1", "w2"):
        wd = cluster.root / name
        qemu_img("create", "-q", "-f", "qcow2", wd / f"only-{name}.qcow2", str(MiB))
        qemu_io(wd / f"only-{name}.qcow2", f"write -P {len(name)} 0 64k")
        convert_to_raw(wd / f"only-{name}.qcow2", wd / f"only-{name}.raw")
    address = cluster.worker_names()["w2"]
    pairs = [
        {"raw": f"only-{name}.raw", "test": f"only-{name}.qcow2", "workers": [pin]}
        for name, pin in [("w1", "w1"), ("w2", address), ("w1", "w1"), ("w2", "w2")] * 4
    ]
    results = bv.verify_many(pairs, client=cluster.client)
    assert all(isinstance(r, bv.Report) and r.identical for r in results), results
    # Unpinned, half the pairs land on a worker that cannot see their files.
    unpinned = [{k: v for k, v in p.items() if k != "workers"} for p in pairs]
    failed = [
        r for r in bv.verify_many(unpinned, client=cluster.client) if isinstance(r, Exception)
    ]
    assert failed and all(isinstance(r, FileNotFoundError) for r in failed)


def test_pinned_to_workers_that_are_not_there(images, cluster):
    results = bv.verify_many(
        [
            {
                "raw": images["raw"],
                "test": images["good"],
                "workers": ["nosuch", "tcp://10.9.9.9:1"],
            },
            (images["raw"], images["bad"]),
        ],
        client=cluster.client,
    )
    assert isinstance(results[0], bv.Error)
    assert "none of the workers this pair is pinned to (nosuch, tcp://10.9.9.9:1)" in str(
        results[0]
    )
    assert isinstance(results[1], bv.Report) and not results[1].identical


def test_api_reports_equal_local_reports(images, cluster):
    pairs = [(images["raw"], images[k]) for k in ("good", "bad", "runs", "longer")]
    local = bv.verify_many(pairs, all=True)
    remote = bv.verify_many(pairs, all=True, client=cluster.client)
    assert [r.to_dict() | {"elapsed_s": 0} for r in remote] == [
        r.to_dict() | {"elapsed_s": 0} for r in local
    ]
    with pytest.raises(ValueError, match="'workers' must be a list"):
        bv.verify_many([{"raw": "a", "test": "b", "workers": "w1"}], client=cluster.client)


def test_a_long_batch_holds_a_window_of_pairs_on_the_client(cluster, tmp_path):
    """3,000 small pairs through the cluster (a generator, read once): the
    client reads them a window at a time, holds futures for that window's
    tasks only (small pairs share a task), none once it is done, and the
    results come in order (each line's test path is spelled its own way)."""
    tiny = tmp_path / "tiny.raw"
    tiny.write_bytes(bytes(range(256)) * 256)
    for digit in range(10):
        (tmp_path / f"d{digit}").mkdir()
    count = 3_000
    tests = [
        str(tmp_path / "".join(f"d{c}/../" for c in f"{n:04d}") / "tiny.raw") for n in range(count)
    ]
    pulled = 0
    held: list[int] = []

    def ours() -> int:
        return sum(1 for key in list(cluster.client.futures) if str(key).startswith("blkverify-"))

    def source() -> Iterator[tuple[str, str]]:
        nonlocal pulled
        for test in tests:
            pulled += 1
            held.append(ours())
            yield (str(tiny), test)

    seen = 0
    for report, test in zip(
        bv.iter_verify_many(source(), client=cluster.client), tests, strict=True
    ):
        assert isinstance(report, bv.Report) and report.identical, report
        assert report.test == test
        seen += 1
        assert pulled - seen <= cluster_module.WINDOW
    assert seen == count
    assert max(held) <= 2 * cluster_module.WINDOW // cluster_module.GROUP_PAIRS, max(held)
    # Released (the client lets a key go on its event loop, soon after).
    deadline = time.monotonic() + 10
    while ours():
        assert time.monotonic() < deadline, ours()
        time.sleep(0.05)


@pytest.fixture(scope="module")
def slow_uri(images: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """good.raw served by nbdkit with a delay on every read, so that a task
    reading it is still running when its worker is killed."""
    sock = tmp_path_factory.mktemp("slow") / "slow.sock"
    nbdkit = subprocess.Popen(
        ["nbdkit", "-f", "-U", sock, "--filter=delay", "file", images["raw"], "rdelay=300ms"]
    )
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert nbdkit.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        nbdkit.terminate()
        nbdkit.wait()


def kill_when_running(cluster: Cluster, name: str, running: Callable[[], bool]) -> None:
    """SIGKILL worker ``name`` once it runs (or holds) a task of ours that
    verifies or hashes (a group of pairs, or a range)."""
    address = cluster.worker_names()[name]
    deadline = time.monotonic() + 60
    ours = re.compile(r"blkverify-.*-(group|range\d+)-")
    while not any(ours.search(str(key)) for key in cluster.client.processing().get(address, ())):
        assert running(), "the batch ended before the worker got a task"
        assert time.monotonic() < deadline, f"{name} never got a task"
        time.sleep(0.02)
    cluster.procs[name].kill()
    cluster.stop(name)


def test_a_worker_killed_mid_batch(images, cluster, slow_uri):
    """A third worker is killed by PID while it runs a task: the batch still
    reports every pair exactly once, as a local run does."""
    manifest = write_manifest(
        images,
        "slow.txt",
        [f"good.raw {slow_uri}" if i % 2 else "good.raw bad.qcow2" for i in range(12)],
    )
    cluster.add_worker("w3")
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "blkverify_rs", "batch", "--json", "--no-progress"),
            *("--threads", "1", "--scheduler", cluster.address, str(manifest)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        kill_when_running(cluster, "w3", lambda: proc.poll() is None)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    local = batch("--json", "--threads", "1", manifest)
    assert proc.returncode == local.returncode == 1, err
    assert without_elapsed(out) == without_elapsed(local.stdout)
    assert len(out.splitlines()) == 12
    assert err == ""


def run_in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.setdefault("value", work()))
    thread.start()
    return thread, out


@pytest.mark.parametrize("comes_back", [False, True])
def test_a_pinned_worker_that_dies_mid_run(images, cluster, slow_uri, comes_back):
    """Pairs pinned to a worker that is killed while it runs them are errors
    once it has been gone for the timeout; the other pairs are not. A worker
    that comes back under the same name (at another address) runs them."""
    name = "w5" if comes_back else "w4"
    pinned = {"raw": images["raw"], "test": slow_uri, "workers": [name]}
    pairs = [pinned, pinned, (images["raw"], images["good"]), (images["raw"], images["bad"])]
    cluster.add_worker(name)
    timeout = 60 if comes_back else 2
    thread, out = run_in_thread(
        lambda: bv.verify_many(pairs, client=cluster.client, scheduler_timeout=timeout)
    )
    try:
        kill_when_running(cluster, name, thread.is_alive)
        if comes_back:
            cluster.add_worker(name)
    finally:
        thread.join(timeout=120)
        if comes_back:
            cluster.stop(name)
    assert not thread.is_alive()
    results = out["value"]
    assert [type(r) for r in results[2:]] == [bv.Report, bv.Report]
    assert results[2].identical and not results[3].identical
    if comes_back:
        assert all(isinstance(r, bv.Report) and r.identical for r in results[:2]), results
    else:
        for r in results[:2]:
            assert isinstance(r, bv.Error)
            fact = f"none of the workers this pair is pinned to ({name}) is in the cluster"
            assert str(r) == f"{slow_uri}: {fact}"


@pytest.fixture(scope="module")
def split_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """160 MiB, mostly holes: at --split 64M three ranges, with mismatches
    on both sides of both edges and a run across the first."""
    d = tmp_path_factory.mktemp("split")
    raw = d / "big.raw"
    qemu_img("create", "-q", "-f", "raw", raw, str(160 * MiB))
    writes = [
        "write -P 0x11 0 1M",
        "write -P 0x22 63M 2M",
        "write -P 0x33 127M 2M",
        "write -P 0x44 159M 1M",
    ]
    qemu_io(raw, *writes, fmt="raw")
    test = d / "big.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, test)
    edge1, edge2 = 64 * MiB, 128 * MiB
    qemu_io(
        test,
        "write -P 0x99 4096 512",  # inside the first range
        f"write -P 0x99 {edge1 - 1024} 2048",  # a run across the first edge
        f"write -P 0x99 {edge2 - 512} 512",  # the last sector before the second edge
        f"write -P 0x98 {edge2} 512",  # and the first after it
        f"write -P 0x99 {edge2 + 4096} 512",
        f"write -P 0x99 {160 * MiB - 512} 512",  # the last sector of the disk
    )
    return {"raw": raw, "test": test}


@pytest.mark.parametrize("all_", [True, False])
def test_split_ranges_merge_into_the_unsplit_report(split_pair, cluster, all_):
    manifest = split_pair["raw"].parent / "split.txt"
    manifest.write_text(f"{split_pair['raw']} {split_pair['test']}\n")
    flags = ["--all"] if all_ else []
    local = batch("--json", *flags, manifest)
    whole = batch("--json", *flags, "--scheduler", cluster.address, manifest)
    split = batch("--json", *flags, "--scheduler", cluster.address, "--split", "64M", manifest)
    assert local.returncode == whole.returncode == split.returncode == 1, split.stderr
    assert (
        without_elapsed(split.stdout)
        == without_elapsed(local.stdout)
        == without_elapsed(whole.stdout)
    )
    (report,) = without_elapsed(split.stdout)
    runs = [(m["offset"], m["length"]) for m in report["mismatches"]]
    edge1, edge2 = 64 * MiB, 128 * MiB
    if all_:
        assert runs == [
            (4096, 512),
            (edge1 - 1024, 2048),
            (edge2 - 512, 1024),
            (edge2 + 4096, 512),
            (160 * MiB - 512, 512),
        ]
        assert all("mapping" in m for m in report["mismatches"])
    else:
        assert runs == [(4096, 512)]


def test_split_first_run_crossing_an_edge(split_pair, cluster, tmp_path):
    """Without --all the first run is whole, though a range edge cuts it."""
    test = tmp_path / "edge.qcow2"
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", split_pair["raw"], test)
    qemu_io(test, f"write -P 0x99 {64 * MiB - 1024} 2048")
    pairs = [(split_pair["raw"], test)]
    local = bv.verify_many(pairs)
    split = bv.verify_many(pairs, client=cluster.client, split="64M")
    assert split[0].mismatches == local[0].mismatches
    assert [(m.offset, m.length) for m in split[0].mismatches] == [(64 * MiB - 1024, 2048)]


def test_split_must_be_a_multiple_of_64k(images, cluster):
    manifest = write_manifest(images, "one.txt", ["good.raw good.qcow2"])
    proc = batch("--scheduler", cluster.address, "--split", "1000", manifest)
    assert proc.returncode == 2
    assert proc.stderr == (
        "blkverify: error: the split size (1000 bytes) must be a positive multiple of 64 KiB\n"
    )
    proc = batch("--split", "64M", manifest)
    assert proc.returncode == 2 and "--split needs --scheduler" in proc.stderr
    proc = batch("--scheduler", cluster.address, "--split", "lots", manifest)
    assert proc.returncode == 2 and proc.stderr.startswith(
        "blkverify: error: --split: invalid size"
    )


def test_an_unreachable_scheduler_is_one_error_within_the_timeout(images):
    manifest = write_manifest(images, "one.txt", ["good.raw good.qcow2"])
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = batch("--scheduler", address, "--scheduler-timeout", "2", manifest)
    assert proc.returncode == 2
    assert re.fullmatch(
        rf"blkverify: error: {address}: cannot reach the Dask scheduler \(waited 2 s: .*\)\n",
        proc.stderr,
    ), proc.stderr
    assert proc.stdout == ""
    from blkverify_rs import cluster as dask_cluster

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="cannot reach the Dask scheduler"):
        dask_cluster.connect(address, timeout=1.5)
    assert time.monotonic() - started < 1.5 + 2


def test_a_scheduler_without_workers_is_one_error_within_the_timeout(images, tmp_path):
    empty = Cluster(tmp_path)
    try:
        manifest = write_manifest(images, "one.txt", ["good.raw good.qcow2"])
        started = time.monotonic()
        proc = batch("--scheduler", empty.address, "--scheduler-timeout", "2", manifest)
        assert proc.returncode == 2
        assert proc.stderr == (
            f"blkverify: error: {empty.address}: the Dask scheduler has no workers (waited 2 s)\n"
        )
        assert time.monotonic() - started < 60
    finally:
        empty.close()


def test_ctrl_c_cancels_the_batch_on_the_cluster(images, cluster, slow_uri):
    manifest = write_manifest(images, "interrupted.txt", [f"good.raw {slow_uri}"] * 12)
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "blkverify_rs", "batch", "--no-progress"),
            *("--scheduler", cluster.address, str(manifest)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ours = re.compile(r"blkverify-.*-(group|range\d+)-")
        while not any(
            ours.search(str(k)) for keys in cluster.client.processing().values() for k in keys
        ):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert err == "blkverify: interrupted\n" and out == ""
    # Its tasks were cancelled, not left to run.
    deadline = time.monotonic() + 30
    while any(cluster.client.processing().values()):
        assert time.monotonic() < deadline, cluster.client.processing()
        time.sleep(0.1)


def test_without_dask_scheduler_says_how_to_install_it(images, tmp_path):
    """A `distributed` that cannot be imported, as on a machine without the extra."""
    shadow = tmp_path / "shadow" / "distributed"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named distributed')\n")
    manifest = write_manifest(images, "one.txt", ["good.raw good.qcow2"])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "blkverify_rs",
            "batch",
            "--scheduler",
            "tcp://127.0.0.1:1",
            manifest,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(shadow.parent)},
        timeout=120,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr
        == 'blkverify: error: --scheduler needs Dask: pip install "blkverify-rs[dask]"\n'
    )


# -- verify --start/--length ------------------------------------------------------------------


def test_verify_a_range(images):
    raw, bad = images["raw"], images["bad"]
    # bad.qcow2 differs at sector 2048 (1 MiB) only.
    before = run_cli("verify", "--json", "--length", "1M", raw, bad)
    assert before.returncode == 0, before.stderr
    report = json.loads(before.stdout)
    assert report["range"] == {"start": 0, "length": MiB}
    assert report["bytes_compared"] == MiB and report["virtual_size"] == 4 * MiB
    hit = run_cli("verify", "--json", "--start", "0x100000", "--length", "512", raw, bad)
    assert hit.returncode == 1
    assert [m["sector"] for m in json.loads(hit.stdout)["mismatches"]] == [2048]
    after = run_cli("verify", "--start", "1.5M", raw, bad)
    assert after.returncode == 0
    assert (
        after.stdout
        == f"Images are identical from offset 0x180000 for {int(2.5 * MiB)} bytes (of {4 * MiB}).\n"
    )
    rep = bv.verify(raw, bad, start="1M", length=4096)
    assert rep.range == (MiB, 4096) and [m.sector for m in rep.mismatches] == [2048]
    assert bv.verify(raw, bad).range is None


@pytest.mark.parametrize(
    "args, fact",
    [
        (["--start", "100"], "the range's start (0x64) is not a multiple of 512 bytes"),
        (["--length", "1000"], "the range's length (1000) is not a multiple of 512 bytes"),
        (["--start", "4M", "--length", "512"], "ends past the end of the disk (4194304 bytes)"),
        (["--start", "1x"], "--start: invalid size '1x'"),
    ],
)
def test_verify_range_errors(images, args, fact):
    proc = run_cli("verify", *args, images["raw"], images["good"])
    assert proc.returncode == 2
    assert proc.stderr.startswith("blkverify: error: ") and fact in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1


# -- Part 3: hashing where the images live -------------------------------------


@pytest.fixture(scope="module")
def odd_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qcow2 whose size is not a multiple of 64 KiB: data, a zero cluster
    range, holes, and data in its short last block."""
    img = tmp_path_factory.mktemp("odd") / "odd.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", img, str(9 * MiB + 4608))
    qemu_io(
        img,
        "write -P 0x61 0 1M",
        "write -z 2M 1M",
        "write -P 0x62 5M 64k",
        f"write -P 0x63 {9 * MiB} 4608",
    )
    return img


@pytest.mark.parametrize("algorithm", ["sha256", "blake3"])
def test_digest_across_workers_equals_the_local_digest(odd_image, cluster, tmp_path, algorithm):
    local_blocks, remote_blocks = tmp_path / "local.digests", tmp_path / "remote.digests"
    flags = ["digest", "--no-progress", "-d", algorithm]
    local = run_cli(*flags, "--json", "--blocks", local_blocks, odd_image)
    remote = run_cli(
        *flags, "--json", "--scheduler", cluster.address, "--split", "1M",
        "--blocks", remote_blocks, odd_image,
    )  # fmt: skip
    assert local.returncode == remote.returncode == 0, remote.stderr
    assert without_elapsed(remote.stdout) == without_elapsed(local.stdout)
    assert remote_blocks.read_bytes() == local_blocks.read_bytes()
    # The text line, with the split the cluster picks by itself, and the API.
    text = run_cli(*flags, "--scheduler", cluster.address, odd_image)
    assert text.stdout == run_cli(*flags, odd_image).stdout
    api = bv.digest(odd_image, algorithm=algorithm, client=cluster.client, split="64k")
    assert api.hexdigest == bv.digest(odd_image, algorithm=algorithm).hexdigest
    assert api.hexdigest == json.loads(local.stdout)["digest"]


def test_digest_on_the_cluster_errors_as_locally(images, cluster):
    missing = images["dir"] / "missing.qcow2"
    local = run_cli("digest", "--no-progress", images["good"], missing)
    remote = run_cli(
        "digest", "--no-progress", "--scheduler", cluster.address, images["good"], missing
    )
    assert local.returncode == remote.returncode == 2
    assert (remote.stdout, remote.stderr) == (local.stdout, local.stderr)
    assert "No such file" in remote.stderr
    proc = run_cli("digest", "--split", "1M", images["good"])
    assert proc.returncode == 2 and "--split needs --scheduler" in proc.stderr
    start = time.monotonic()
    address = f"tcp://127.0.0.1:{free_port()}"
    proc = run_cli("digest", "--scheduler", address, "--scheduler-timeout", "1", images["good"])
    assert proc.returncode == 2 and time.monotonic() - start < 20
    assert proc.stderr.startswith(f"blkverify: error: {address}: cannot reach the Dask scheduler")


@pytest.fixture(scope="module")
def cross_pair(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A raw image only w1 sees (w1/xh.raw, run from its directory) and its
    qcow2 copies only w2 sees: xh-good.qcow2, and xh.qcow2 with a byte
    flipped in block 30 and in the short last block (144). Also the raw
    image's block digests file, for the local verify to compare with."""
    w1, w2 = cluster.root / "w1", cluster.root / "w2"
    raw = w1 / "xh.raw"
    qemu_img("create", "-q", "-f", "raw", raw, str(9 * MiB + 4608))
    qemu_io(raw, "write -P 0x61 0 3M", f"write -P 0x63 {9 * MiB} 4608", fmt="raw")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, w2 / "xh-good.qcow2")
    qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", raw, w2 / "xh.qcow2")
    qemu_io(w2 / "xh.qcow2", "write -P 0x60 2000000 1", f"write -P 0 {9 * MiB + 4000} 1")
    digests = tmp_path_factory.mktemp("xh") / "xh.digests"
    bv.digest(raw, blocks=digests)
    return {"raw": raw, "test": w2 / "xh.qcow2", "good": w2 / "xh-good.qcow2", "digests": digests}


def test_a_cross_host_pair_with_a_flipped_byte_is_found_at_its_block(cross_pair, cluster):
    """Relative paths: each side opens only on the worker it is pinned to,
    so each was hashed where it lives."""
    pins = {"raw_workers": ["w1"], "test_workers": ["w2"]}
    pairs = [
        {"raw": "xh.raw", "test": "xh.qcow2", "all": True, **pins},
        {"raw": "xh.raw", "test": "xh.qcow2", **pins},
        {"raw": "xh.raw", "test": "xh-good.qcow2", **pins},
        {"raw": "xh.raw", "test": "xh.qcow2", "raw_workers": ["nosuch"], "test_workers": ["w2"]},
    ]
    every, first, good, unpinned = bv.verify_many(pairs, client=cluster.client, split="1M")
    local = bv.verify(cross_pair["digests"], cross_pair["test"], all=True)
    assert [(m.block, m.blocks) for m in every.mismatches] == [(30, 1), (144, 1)]
    assert not every.identical and good.identical and not good.mismatches
    assert [(m.block, m.blocks) for m in first.mismatches] == [(30, 1)]
    assert every.mismatches[1].length == 4608
    # As verify against the block digests file reports it, mappings and all
    # (but for the paths it names).
    as_local = every.to_dict() | {"raw": local.raw, "test": local.test, "raw_format": "digests"}
    for m in as_local["mismatches"]:
        m["mapping"]["file"] = local.test
    assert as_local | {"elapsed_s": 0} == local.to_dict() | {"elapsed_s": 0}
    assert isinstance(unpinned, bv.Error)
    assert str(unpinned) == (
        "xh.raw: none of the workers its raw side is pinned to (nosuch) is in the cluster"
    )
    # Without a cluster the pins mean nothing: the pair is verified byte by byte.
    (here,) = bv.verify_many([pairs[0] | {"raw": cross_pair["raw"], "test": cross_pair["test"]}])
    assert [(m.offset, m.length) for m in here.mismatches] == [
        (2000000 - 2000000 % 512, 512),
        (9 * MiB + 3584, 512),
    ]


def test_a_cross_host_batch_prints_what_verify_against_digests_prints(cross_pair, cluster):
    line = {
        "raw": str(cross_pair["raw"]),
        "test": str(cross_pair["test"]),
        "raw_workers": ["w1"],
        "test_workers": ["w2"],
    }
    manifest = cluster.root / "cross.txt"
    manifest.write_text(json.dumps(line) + "\n")
    remote = batch("--json", "--all", "--scheduler", cluster.address, "--split", "2M", manifest)
    local = run_cli(
        "verify", "--no-progress", "--json", "--all", cross_pair["digests"], line["test"]
    )
    assert remote.returncode == local.returncode == 1, remote.stderr
    (got,) = without_elapsed(remote.stdout)
    (want,) = without_elapsed(local.stdout)
    assert got | {"raw": want["raw"], "raw_format": "digests"} == want
    # The summary table: that of a local batch of the digests file and the
    # image, but for the reference's name and the MiB/s column.
    text = batch("--all", "--scheduler", cluster.address, manifest)
    local_manifest = cluster.root / "cross-local.txt"
    local_manifest.write_text(f"{cross_pair['digests']} {line['test']}\n")
    local_text = batch("--all", local_manifest)
    assert text.returncode == local_text.returncode == 1

    def strip(table: str, raw: str) -> list[str]:
        rows = [row.replace(raw, "RAW").split() for row in table.splitlines()]
        return [" ".join(row[:-1]) for row in rows if not row[0].startswith("-")]

    assert strip(text.stdout, line["raw"]) == strip(local_text.stdout, str(cross_pair["digests"]))
    assert "block 30" in text.stdout
    # Pins for the sides, and for the pair, are one or the other.
    manifest.write_text(json.dumps(line | {"workers": ["w1"]}) + "\n")
    proc = batch("--scheduler", cluster.address, manifest)
    assert proc.returncode == 2 and "'workers' pins the whole pair" in proc.stderr


def test_verify_a_range_against_block_digests(cross_pair):
    """Against a block digests file a range is whole blocks (or ends where
    the disk does), and finds the blocks a whole run finds there."""
    digests, test = cross_pair["digests"], cross_pair["test"]
    whole = bv.verify(digests, test, all=True)
    tail = bv.verify(digests, test, all=True, start="1M")
    assert tail.mismatches == whole.mismatches
    assert tail.range == (MiB, 8 * MiB + 4608)
    head = bv.verify(digests, test, all=True, start=0, length="1M")
    assert head.identical and head.range == (0, MiB)
    proc = run_cli("verify", "--start", "512", digests, test)
    assert proc.returncode == 2
    assert proc.stderr.endswith("the range's start (0x200) is not a multiple of 65536 bytes\n")


def test_a_cross_host_side_runs_again_on_its_worker_come_back(images, cluster, slow_uri):
    """The worker hashing a pair's test side is killed mid-range and comes
    back under its name: the side is hashed again there, and the report is
    whole (the pair is the raw image and its own bytes over NBD)."""
    pair = {"raw": images["raw"], "test": slow_uri, "raw_workers": ["w1"], "test_workers": ["w6"]}
    cluster.add_worker("w6")
    thread, out = run_in_thread(
        lambda: bv.verify_many([pair], client=cluster.client, scheduler_timeout=60)
    )
    try:
        kill_when_running(cluster, "w6", thread.is_alive)
        cluster.add_worker("w6")
    finally:
        thread.join(timeout=120)
        cluster.stop("w6")
    assert not thread.is_alive()
    (report,) = out["value"]
    assert isinstance(report, bv.Report), report
    assert report.identical and report.block_size == 65536 and report.test == slow_uri
