"""What recording an exposure costs: on a request's path, and in the store behind it.

1. **Request path.** What the ingress runs per generation request for the experiment loop — take a place in
   the buffer (``reserve``), fill the timings, ``settle`` the outcome — timed per request while the buffer's
   background task flushes to a real store in a thread (as the Recorder does), so the flush's share of the
   event loop is in the numbers. Goal: <= 1 ms p50 added to a request.
2. **Store.** Batches committed by :meth:`ExperimentStore.record_exposures` (SQLite in WAL mode with full
   fsync, and PostgreSQL 15 when its binaries are installed): latency per batch and exposures per second.

    python -m bench.exposures [--requests 5000] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from bench.common import Table, append_report, command_line, machine, p50, percentile, render_section
from deskgen.experiments.buffer import ExposureBuffer
from deskgen.experiments.records import Experiment, Exposure
from deskgen.experiments.store import ExperimentStore

EXPERIMENT = Experiment(split={"dalle_ott": 0.7, "ott_3d": 0.3}, salt="bench",
                        mixes={"dalle_ott": {"dalle": 0.7, "ott": 0.5}, "ott_3d": {"ott": 0.7, "3d": 0.5}})  # fmt: skip


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def exposure(i: int) -> Exposure:
    return Exposure(image_id=uuid.uuid4().hex, experiment_id=EXPERIMENT.id, user_id=f"user-{i % 500}", arm="dalle_ott",
                    mix_id="dalle:0.7+ott:0.5", mix_source="ab", outcome="ok", status=200, seed=i,
                    timings={"classify_s": 0.01, "caption_s": 0.1, "generate_s": 1.8, "total_s": 1.95})  # fmt: skip


@contextmanager
def stores() -> Iterator[list[tuple[str, str]]]:
    """(label, URL) of each store to measure: SQLite in a temp dir, PostgreSQL when it is installed."""
    from deskgen.tools.postgres import postgres_available, running_postgres

    with tempfile.TemporaryDirectory() as tmp:
        urls = [("SQLite (WAL, synchronous=FULL)", f"sqlite:///{Path(tmp) / 'experiments.db'}")]
        with running_postgres() if postgres_available() else nullcontext() as pg:
            if pg is not None:
                urls.append(("PostgreSQL 15 (fsync on, 127.0.0.1)", pg))
            yield urls


def request_path(url: str, requests: int) -> tuple[list[float], int, float]:
    """Per-request seconds of reserve + timings + settle, with the flush running; (times, written, wall)."""
    store = ExperimentStore.open(url)

    async def sink(experiments: list[Experiment], batch: list[Exposure]) -> None:
        def write() -> None:
            for e in experiments:
                store.ensure_experiment(e)
            store.record_exposures(batch)

        await asyncio.to_thread(write)

    async def run() -> tuple[list[float], int, float]:
        buffer = ExposureBuffer(sink, capacity=100_000, flush_interval_s=0.05)
        times = []
        start = time.perf_counter()
        for i in range(requests):
            t = time.perf_counter()
            r = buffer.reserve(EXPERIMENT, image_id=uuid.uuid4().hex, user_id=f"user-{i % 500}", arm="dalle_ott",
                               mix_id="dalle:0.7+ott:0.5", mix_source="ab", style=None)  # fmt: skip
            r.timings.update(classify_s=0.01, caption_s=0.1, generate_s=1.8, total_s=1.95)
            r.settle("ok", 200, seed=i)
            times.append(time.perf_counter() - t)
            await asyncio.sleep(0.0005)  # the rest of a request: the loop runs the flush meanwhile
        await buffer.close(timeout_s=60)
        return times, buffer.stats.written, time.perf_counter() - start

    result = asyncio.run(run())
    store.engine.dispose()
    return result


def store_batches(url: str, sizes: tuple[int, ...], repeats: int) -> list[tuple[int, list[float]]]:
    store = ExperimentStore.open(url)
    store.ensure_experiment(EXPERIMENT)
    out = []
    for size in sizes:
        times = []
        for r in range(repeats):
            batch = [exposure(r * size + i) for i in range(size)]
            t = time.perf_counter()
            store.record_exposures(batch)
            times.append(time.perf_counter() - t)
        out.append((size, times))
    store.engine.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-write", action="store_true", help="print, do not append to BENCHMARKS.md")
    args = parser.parse_args()
    started = time.perf_counter()
    path = Table(f"Request path: reserve + settle per request, N={args.requests}, buffer flushing every 50 ms",
                 ["store behind the buffer", "p50 µs", "p99 µs", "max µs", "written", "goal p50 <= 1000 µs"])  # fmt: skip
    batches = Table(f"Store: one committed batch of exposures, N={args.repeats} per size",
                    ["store", "batch", "p50 ms", "p99 ms", "exposures/s at p50"])  # fmt: skip
    with stores() as urls:
        for label, url in urls:
            times, written, _ = request_path(url, args.requests)
            path.add(label, us(p50(times)), us(percentile(times, 99)), us(max(times)), written,
                     "met" if p50(times) <= 1e-3 else "MISSED")  # fmt: skip
            for size, t in store_batches(url, (1, 10, 100, 500), args.repeats):
                batches.add(label, size, f"{p50(t) * 1e3:.2f}", f"{percentile(t, 99) * 1e3:.2f}", f"{size / p50(t):,.0f}")
    path.notes.append("the whole cost a generation request pays for its exposure: no I/O on its path; the write "
                      "happens in the flush task (a Ray call to the Recorder in the app, a thread here)")  # fmt: skip
    section = render_section("Exposure recording", [path, batches], command=command_line(),
                             wall_s=time.perf_counter() - started, host=machine())  # fmt: skip
    print(section)
    if not args.no_write:
        append_report(section)


if __name__ == "__main__":
    main()
