"""Compaction: archive files and the time to read a month of one stream's ticks, before and after
merging closed days into day files; and the ingest rate while a compaction runs, against the
rate measured alone in the same run.

A month here is 30 UTC days of MNQ bid_ask at a lighter density than the other benches (so that
720 hourly files are archived in a few seconds); --quick: 6 days.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from datetime import timedelta

import pyarrow as pa
from common import DAY_START_US, parse_args, settings

from ibstream.core.times import US_PER_HOUR, from_us
from ibstream.storage import Store
from ibstream.storage.archive import archive_files
from ibstream.storage.store import niced
from ibstream.storage.synthetic import MNQ, synthetic_ticks

US_PER_DAY = 24 * US_PER_HOUR
OTHER = 265598  # ingest during compaction goes to another contract's later hours


def month(days: int, per_hour: int) -> pa.Table:
    probe = synthetic_ticks(MNQ, "bid_ask", DAY_START_US, days * 24 * per_hour, seed=1)
    span = probe.column("ts").cast(pa.int64())[-1].as_py() - DAY_START_US
    return synthetic_ticks(MNQ, "bid_ask", DAY_START_US, days * 24 * per_hour, seed=1,
                           rate_scale=span / (days * US_PER_DAY * 0.999))


def read_seconds(store: Store, start_us: int, end_us: int, repeat: int = 3) -> tuple[float, int]:
    times, rows = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        rows = store.read(MNQ.contract_id, "bid_ask", from_us(start_us), from_us(end_us)).num_rows
        times.append(time.perf_counter() - started)
    return statistics.median(times), rows


def ingest_rate(store: Store, seconds: float, start_us: int, busy: threading.Event | None = None) -> float:
    """Ticks/s acknowledged by 100-row fsynced appends for ``seconds`` (or while ``busy`` is set)."""
    batch = synthetic_ticks(MNQ, "bid_ask", start_us, 200_000, seed=2, rate_scale=50)
    at, started = 0, time.perf_counter()
    while (time.perf_counter() - started < seconds) if busy is None else busy.is_set():
        store.append(OTHER, "bid_ask", batch.slice(at, 100))
        at += 100
        if at + 100 > batch.num_rows:
            break
    return at / (time.perf_counter() - started)


def main(quick: bool = False) -> None:
    days = 6 if quick else 30
    ticks = month(days, 2_000)
    end_us = DAY_START_US + days * US_PER_DAY
    print(f"\n== compaction: {days} days of bid_ask, {ticks.num_rows:,} ticks ==")
    with tempfile.TemporaryDirectory() as tmp:
        config = settings(tmp, fsync="none", cache_max_bytes=0, retention_grace=timedelta(0))
        with Store(config) as store:
            for at in range(0, ticks.num_rows, 50_000):
                store.append(MNQ.contract_id, "bid_ask", ticks.slice(at, 50_000))
            store.archive(now=from_us(end_us + US_PER_HOUR))
        durable = settings(tmp, cache_max_bytes=0, retention_grace=timedelta(0))  # fsync per batch, as recording
        with Store(durable) as store:
            files_before = len(archive_files(config.archive_root))
            month_before, rows = read_seconds(store, DAY_START_US, end_us)
            hour_before, _ = read_seconds(store, DAY_START_US + 36 * US_PER_HOUR, DAY_START_US + 37 * US_PER_HOUR, 5)
            alone = ingest_rate(store, 3.0, end_us + US_PER_DAY)
            busy = threading.Event()
            busy.set()
            outcome: list = []

            def compaction() -> None:  # on a background thread at a lower priority, as the recorder's job runs
                started = time.perf_counter()
                outcome.extend([store.compact(from_us(end_us + 2 * US_PER_HOUR)), time.perf_counter() - started])
                busy.clear()

            job = threading.Thread(target=niced(compaction))
            job.start()
            during = ingest_rate(store, 0, end_us + 2 * US_PER_DAY, busy)
            job.join()
            report, took = outcome
            store.compact(from_us(end_us + 3 * US_PER_HOUR))  # the replaced files go
            files_after = len(archive_files(config.archive_root))
            month_after, rows_after = read_seconds(store, DAY_START_US, end_us)
            hour_after, _ = read_seconds(store, DAY_START_US + 36 * US_PER_HOUR, DAY_START_US + 37 * US_PER_HOUR, 5)
        assert rows_after == rows == ticks.num_rows, (rows, rows_after)
        print(f"archive files: {files_before} hourly -> {files_after} day files ({files_before / files_after:.0f}x "
              f"fewer); compaction of {report.files_written} days took {took:.1f} s")
        print(f"read the month ({rows:,} ticks, cache off): {month_before * 1e3:.0f} ms before, "
              f"{month_after * 1e3:.0f} ms after ({month_before / month_after:.2f}x)")
        print(f"read one hour of it: {hour_before * 1e3:.1f} ms before, {hour_after * 1e3:.1f} ms after "
              f"({hour_before / hour_after:.2f}x; row groups per hour keep pruning)")
        print(f"ingest (100-tick fsynced appends): {alone:,.0f} ticks/s alone, {during:,.0f} ticks/s during the "
              f"compaction ({during / alone:.2f}x)")


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
