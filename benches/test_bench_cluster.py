"""A batch verified locally and through a Dask cluster of two workers on this
machine, side by side; and what one task costs the cluster.

- ``batch``: 16 pairs of BENCH_MIB MiB (fully allocated qcow2 against raw;
  4 distinct pairs, each listed 4 times), ``bv.verify_many`` here and with
  ``client=`` a client of a scheduler with two one-thread workers on this
  machine. ``extra_info["overhead"]`` on the cluster's entry is its median
  over the local one, minus 1.
- ``task cost``: 256 pairs of 64 KiB through the cluster, verified in
  groups (small pairs share a task: 8 tasks of 32 pairs on two one-thread
  workers), so ``extra_info["per_pair_ms"]`` is the median over 256 pairs;
  beside one plain Dask no-op task per pair, submitted and gathered: the
  floor a task per pair would pay (``overhead`` is ours over it).
  ``*_cpu_ms``: CPU time per pair of the scheduler, the workers and the
  client, from the processes' own counters.
- ``digest``: one BENCH_MIB MiB qcow2's digest, here and split between the two
  workers (``bv.digest(client=)``, the default split: a range per worker).
- ``cross-host``: one pair verified here (``verify_many``) and as a pair whose
  sides live on different workers (``raw_workers``/``test_workers``: each side
  hashed where it lives, block digests compared on the client).

    BLKVERIFY_BENCH_MIB=256 pytest benches/test_bench_cluster.py --benchmark-enable
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import blkverify_rs as bv
import make_images
import psutil
import pytest
from conftest import BENCH_MIB

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dask_cluster import Cluster  # shared with the tests

PAIRS = 16
TINY_PAIRS = 256 if "--benchmark-enable" in sys.argv else 16
# The floor: one no-op task per pair.
TASKS = TINY_PAIRS
_medians: dict[str, float] = {}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        for name in ("w1", "w2"):
            c.add_worker(name)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def batch_pairs(bench_dir: Path) -> list[tuple[Path, Path]]:
    distinct = []
    for i in range(4):
        d = bench_dir / f"batch{i}"
        d.mkdir(exist_ok=True)
        distinct.append(make_images.full_pair(d, BENCH_MIB))
    return distinct * (PAIRS // len(distinct))


@pytest.fixture(scope="module")
def tiny_pairs(bench_dir: Path) -> list[tuple[Path, Path]]:
    d = bench_dir / "tiny"
    d.mkdir(exist_ok=True)
    raw = d / "tiny.raw"
    raw.write_bytes(bytes(range(256)) * 256)
    return [(raw, raw)] * TINY_PAIRS


class CpuMeter:
    """CPU seconds (user + system) the scheduler, the workers and this
    process (the client) spent over the calls of ``run``."""

    def __init__(self, cluster: Cluster) -> None:
        self.procs = {n: psutil.Process(p.pid) for n, p in cluster.procs.items()}
        self.calls = 0
        self.spent = {"scheduler": 0.0, "workers": 0.0, "client": 0.0}

    def _now(self) -> dict[str, float]:
        def cpu(p: psutil.Process) -> float:
            t = p.cpu_times()
            return t.user + t.system

        workers = sum(cpu(p) for n, p in self.procs.items() if n != "scheduler")
        return {
            "scheduler": cpu(self.procs["scheduler"]),
            "workers": workers,
            "client": cpu(psutil.Process()),
        }

    def run(self, target, *args) -> None:
        before = self._now()
        target(*args)
        after = self._now()
        self.calls += 1
        for key in self.spent:
            self.spent[key] += after[key] - before[key]

    def per_item_ms(self, items: int) -> dict[str, float]:
        n = max(self.calls, 1) * items
        return {f"{key}_cpu_ms": round(v / n * 1000, 3) for key, v in self.spent.items()}


def verify_all(pairs: list[tuple[Path, Path]], client=None) -> None:
    results = bv.verify_many(pairs, client=client)
    assert all(isinstance(r, bv.Report) and r.identical for r in results), results


def measure(benchmark, group: str, where: str, target, *args) -> float | None:
    benchmark.group = group
    benchmark.extra_info["where"] = where
    benchmark.pedantic(target, args=args, rounds=3, iterations=1, warmup_rounds=1)
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: a smoke run
        return None
    median = stats.stats.median
    reference = _medians.setdefault(group, median)
    if reference != median:
        benchmark.extra_info["overhead"] = round(median / reference - 1, 3)
    return median


@pytest.mark.parametrize("where", ["local", "dask-2-workers"])
def test_batch(benchmark, where: str, batch_pairs, cluster: Cluster) -> None:
    client = cluster.client if where != "local" else None
    group = f"batch: {PAIRS} pairs of {BENCH_MIB} MiB"
    measure(benchmark, group, where, verify_all, batch_pairs, client)


def test_task_cost_plain_dask(benchmark, cluster: Cluster) -> None:
    """The floor: Dask's own cost for a no-op task, submitted and gathered."""

    def noop_tasks() -> None:
        futures = [cluster.client.submit(int, i, pure=False) for i in range(TASKS)]
        assert cluster.client.gather(futures) == list(range(TASKS))

    meter = CpuMeter(cluster)
    median = measure(benchmark, "task cost", "plain-dask-noop", meter.run, noop_tasks)
    if median is not None:
        benchmark.extra_info["per_task_ms"] = round(median / TASKS * 1000, 3)
        benchmark.extra_info.update(meter.per_item_ms(TASKS))


def test_task_cost(benchmark, tiny_pairs, cluster: Cluster) -> None:
    meter = CpuMeter(cluster)
    median = measure(
        benchmark, "task cost", "dask-2-workers", meter.run, verify_all, tiny_pairs, cluster.client
    )
    if median is not None:
        benchmark.extra_info.update(meter.per_item_ms(TINY_PAIRS))
        benchmark.extra_info["per_pair_ms"] = round(median / TINY_PAIRS * 1000, 3)


@pytest.mark.parametrize("where", ["local", "dask-2-workers"])
def test_digest(benchmark, where: str, batch_pairs, cluster: Cluster) -> None:
    client = cluster.client if where != "local" else None
    _, image = batch_pairs[0]
    expected = bv.digest(image).hexdigest

    def run() -> None:
        assert bv.digest(image, client=client).hexdigest == expected

    measure(benchmark, f"digest: {BENCH_MIB} MiB qcow2", where, run)


@pytest.mark.parametrize("where", ["local-verify", "dask-cross-host"])
def test_cross_host(benchmark, where: str, batch_pairs, cluster: Cluster) -> None:
    raw, test = batch_pairs[0]
    if where == "local-verify":
        pairs = [(raw, test)]
        client = None
    else:
        pins = {"raw_workers": ["w1"], "test_workers": ["w2"]}
        pairs = [{"raw": str(raw), "test": str(test), **pins}]
        client = cluster.client
    measure(benchmark, f"cross-host pair: {BENCH_MIB} MiB", where, verify_all, pairs, client)
