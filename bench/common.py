"""Shared setup of the benchmarks: synthetic MNQ days, stores in temp folders, Flight servers.

Every bench script is runnable on its own (``.venv/bin/python bench/<name>.py [--quick]``)
and exposes ``main(quick: bool)`` for ``bench/run_all.py``.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from ibstream.core.times import US_PER_HOUR, to_us
from ibstream.flight_server import FlightServer
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ, synthetic_ticks

DAY_START = datetime(2025, 1, 10, tzinfo=UTC)
DAY_START_US = to_us(DAY_START)
DAY_BID_ASK = 1_500_000  # bid_ask ticks in one synthetic MNQ day (~17/s); trades are a tenth of that
QUICK_HOURS = 3  # --quick: the same tick density over fewer hours


def parse_args(description: str) -> argparse.Namespace:
    """``--help`` shows the script's docstring; ``--quick`` picks smaller sizes."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes (seconds instead of minutes)")
    return parser.parse_args()


def settings(root: Path, **overrides) -> Settings:
    """Store settings under ``root``: defaults (fsync="batch", zstd-15, 15 min segments) unless overridden."""
    return Settings(data_root=Path(root) / "data", flight_port=0, archive_delay=timedelta(0), **overrides)


def day_ticks(tick_type: str = "bid_ask", hours: float = 24, start_us: int = DAY_START_US, seed: int = 0) -> pa.Table:
    """Synthetic MNQ ticks filling ``hours`` from ``start_us`` at one day's density (1.5M bid_ask per 24 h).

    The synthetic market's bursty arrivals average to fewer ticks than its nominal rate, so the
    rate is calibrated: a first draw at rate_scale=1 gives the span, and the same seeded draw is
    rescaled so that the last tick lands just before the end of the window.
    """
    count = int(DAY_BID_ASK * hours / 24) // (1 if tick_type in ("bid_ask", "mid_point") else 10)
    probe = synthetic_ticks(MNQ, tick_type, start_us, count, seed=seed)
    span = probe.column("ts").cast(pa.int64())[-1].as_py() - start_us
    scale = span / (hours * US_PER_HOUR * 0.999)
    return synthetic_ticks(MNQ, tick_type, start_us, count, seed=seed, rate_scale=scale)


def append_batches(store: Store, table: pa.Table, batch_rows: int) -> int:
    tick_type = table.schema.metadata[b"ibstream.tick_type"].decode()
    for batch in table.combine_chunks().to_batches(max_chunksize=batch_rows):
        store.append(MNQ.contract_id, tick_type, batch)
    return table.num_rows


def archived_store(root: Path, tables: list[pa.Table], *, batch_rows: int = 10_000, **overrides) -> tuple[Store, list, float]:
    """A writable store holding ``tables`` (appended, then every closed hour archived).

    Returns the store, the published archive entries and the seconds ``Store.archive`` took.
    """
    store = Store(settings(root, **overrides))
    end_us = DAY_START_US
    for table in tables:
        append_batches(store, table, batch_rows)
        end_us = max(end_us, table.column("ts").cast(pa.int64())[-1].as_py())
    now = datetime.fromtimestamp(0, UTC) + timedelta(microseconds=end_us - end_us % US_PER_HOUR + US_PER_HOUR)
    started = time.perf_counter()
    entries = store.archive(now=now)
    return store, entries, time.perf_counter() - started


@contextmanager
def serving(server: flight.FlightServerBase) -> Iterator[str]:
    """Run a Flight server (bound to 127.0.0.1 port 0) on a thread; yields its location."""
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        yield f"grpc://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        thread.join()


def our_server(store: Store) -> FlightServer:
    return FlightServer(store, "grpc://127.0.0.1:0")


class BareServer(flight.FlightServerBase):
    """The loopback ceiling: serves one in-memory table for any ticket."""

    def __init__(self, table: pa.Table):
        super().__init__("grpc://127.0.0.1:0")
        self.table = table

    def get_flight_info(self, context, descriptor):
        """One endpoint over the table: what a Flight query's first call costs at the floor."""
        return flight.FlightInfo(self.table.schema, descriptor, [flight.FlightEndpoint(b"table", [])],
                                 self.table.num_rows, self.table.nbytes)

    def do_get(self, context, ticket):
        return flight.RecordBatchStream(self.table)


def timed(function, *args, **kwargs) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


MEASURE_HEADER = f"{'query':<60} {'reps':>4} {'rows':>10} {'p50 ms':>9} {'p90 ms':>9} {'max ms':>9}"


def measure(name: str, repeats: int, query, *, warm_up: bool = True) -> dict[str, float]:
    """Run ``query`` (returning a row count) ``repeats`` times; print and return its percentiles."""
    return alternately({name: query}, repeats, warm_up=warm_up)[name]


def alternately(queries: dict, repeats: int, *, warm_up: bool = True) -> dict[str, dict[str, float]]:
    """:func:`measure` for several queries, run in turn within each repeat (what this noisy host does to one
    it does to the others: their ratio is the figure to trust); printed in the order given."""
    if warm_up:
        for query in queries.values():
            query()
    samples: dict[str, list[float]] = {name: [] for name in queries}
    rows = dict.fromkeys(queries, 0)
    for _ in range(repeats):
        for name, query in queries.items():
            seconds, rows[name] = timed(query)
            samples[name].append(seconds)
    results = {name: percentiles(samples[name]) for name in queries}
    for name, stats in results.items():
        print(f"{name:<60} {repeats:>4} {rows[name]:>10,} {stats['p50']:>9.2f} {stats['p90']:>9.2f} {stats['max']:>9.2f}")
    return results


def percentiles(seconds: list[float]) -> dict[str, float]:
    """p50 / p90 / max in milliseconds."""
    ordered = sorted(seconds)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered) * 1e3, "p90": p90 * 1e3, "max": ordered[-1] * 1e3}


def header(title: str) -> None:
    print(f"\n=== {title} ===")


def target(text: str, met: bool) -> None:
    print(f"target: {text} -> {'MET' if met else 'MISSED'}")
