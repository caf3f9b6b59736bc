"""A small load test: parallel historical, tail and live readers while ticks are being recorded
(bench/bench_load.py is the full-size one, with readers in their own processes)."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pyarrow as pa

from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import Served, between, ticks, utc

T0 = utc(2025, 1, 10, 12)


def test_parallel_readers_while_recording_see_every_tick_once(tmp_path):
    quotes = ticks(T0, 40_000, "bid_ask", seed=11, rate_scale=0.2)  # about 3.5 hours
    history, later = quotes.slice(0, 20_000), quotes.slice(20_000)
    assert history.column("ts")[-1].as_py() > T0 + timedelta(hours=1)
    settings = Settings(data_root=tmp_path / "data", rotation_interval=timedelta(minutes=5),
                        archive_delay=timedelta(0), flight_port=0, fsync="none")
    with Store(settings) as store:
        store.append(MNQ.contract_id, "bid_ask", history)
        store.archive(now=utc(2025, 1, 10, 13, 1))  # the first hour archived, the rest buffered
        served = Served(store)
        errors: list[str] = []
        reads: list[pa.Table] = []
        writing = threading.Event()
        writing.set()

        def historical(window) -> None:
            while writing.is_set():
                try:
                    reads.append(served.client.tables(MNQ.contract_id, "bid_ask", *window)["bid_ask"])
                except Exception as exc:  # noqa: BLE001 - the test counts every failure
                    errors.append(repr(exc))

        first_hour = (T0, T0 + timedelta(hours=1))
        readers = [threading.Thread(target=historical, args=(first_hour,)) for _ in range(3)]
        live = [served.client.history_and_live(MNQ.contract_id, "bid_ask", T0) for _ in range(3)]
        try:
            for thread in readers:
                thread.start()
            for offset in range(0, later.num_rows, 400):
                store.append(MNQ.contract_id, "bid_ask", later.slice(offset, 400))
                time.sleep(0.001)
            deadline = time.monotonic() + 30
            while any(frame.height < quotes.num_rows for frame in live) and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            writing.clear()
            for thread in readers:
                thread.join()
            for frame in live:
                frame.stop()
            served.close()
    assert errors == []
    expected_hour = between(history, *first_hour).num_rows
    assert reads and all(table.num_rows == expected_hour for table in reads)  # the first hour is all history
    for frame in live:
        assert frame.error is None
        assert frame.frame.get_column("ts").to_list() == quotes.column("ts").to_pylist()
