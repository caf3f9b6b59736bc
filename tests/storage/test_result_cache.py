"""The result cache: readers of one closed range arriving together compute it once (no stampede), and
a clear (the data under a result changed: backfill, retention, a new index) overtakes what is under way."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pyarrow as pa
import pytest

from ibstream.core.times import to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.cache import ResultCache
from ibstream.storage.synthetic import MNQ
from tests.helpers import append_in_batches, between, ticks, utc

READERS = 8


def arrive_together(cache: ResultCache, compute) -> tuple[list, list]:
    """READERS threads ask for one key; the first computation is held until every reader has asked."""
    release = threading.Event()
    results: list = []
    errors: list = []

    def held() -> pa.Table:
        release.wait()
        return compute()

    def read() -> None:
        try:
            results.append(cache.get_or_compute("key", held))
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=read) for _ in range(READERS)]
    for thread in threads:
        thread.start()
    while cache.hits + cache.misses < READERS:  # every reader has looked the key up
        time.sleep(0.001)
    release.set()
    for thread in threads:
        thread.join()
    return results, errors


@pytest.mark.parametrize("max_bytes", [1 << 20, 64], ids=["kept", "too-large-to-keep"])
def test_readers_arriving_together_share_one_computation(max_bytes):
    cache = ResultCache(max_bytes, ttl_seconds=60)
    calls = []
    table = pa.table({"x": list(range(100))})

    def compute() -> pa.Table:
        calls.append(1)
        return table

    results, errors = arrive_together(cache, compute)
    assert (len(calls), errors, cache.misses, cache.hits) == (1, [], 1, READERS - 1)
    assert all(result is table for result in results) and len(results) == READERS
    assert (cache.get("key") is table) == (max_bytes == 1 << 20)  # kept only if it fits a quarter of the cache


def test_when_the_shared_computation_fails_each_waiting_reader_computes_on_its_own():
    cache = ResultCache(1 << 20, ttl_seconds=60)
    calls = []
    table = pa.table({"x": [1, 2, 3]})

    def compute() -> pa.Table:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the archive file cannot be read")
        return table

    results, errors = arrive_together(cache, compute)
    assert [str(e) for e in errors] == ["the archive file cannot be read"]  # the first reader's own error
    assert len(results) == READERS - 1 and all(result.equals(table) for result in results)
    assert len(calls) == READERS  # each waiter computed its own


def test_a_result_computed_across_a_clear_is_served_but_not_kept():
    cache = ResultCache(1 << 20, ttl_seconds=60)
    table = pa.table({"x": [1, 2, 3]})

    def compute_while_backfill_clears() -> pa.Table:
        cache.clear()  # say, a backfill rewrote the hours this computation read before it
        return table

    assert cache.get_or_compute("key", compute_while_backfill_clears) is table  # its caller gets it
    assert (cache.get("key"), cache.generation) == (None, 1)  # but nobody after the clear does
    assert cache.get_or_compute("key", lambda: table) is table and cache.get("key") is table  # the next one is kept


def test_a_reader_after_a_clear_does_not_wait_for_a_computation_begun_before_it():
    cache = ResultCache(1 << 20, ttl_seconds=60)
    started, release = threading.Event(), threading.Event()
    old, new = pa.table({"x": [1]}), pa.table({"x": [1, 2]})
    first: list[pa.Table] = []

    def stale() -> pa.Table:
        started.set()
        release.wait()
        return old

    reader = threading.Thread(target=lambda: first.append(cache.get_or_compute("key", stale)))
    reader.start()
    started.wait()
    cache.clear()
    after: list[pa.Table] = []
    late = threading.Thread(target=lambda: after.append(cache.get_or_compute("key", lambda: new)))
    late.start()
    late.join(timeout=10)  # it does not wait for the old computation (still held)
    release.set()
    reader.join()
    late.join()
    assert after == [new] and first == [old]  # the old table reached its own reader only
    assert cache.get("key") is new


def test_a_closed_day_asked_by_many_readers_at_once_is_decoded_once(tmp_path):
    settings = Settings(data_root=tmp_path / "data", archive_delay=timedelta(0), fsync="none", flight_port=0)
    quotes = ticks(utc(2025, 1, 10, 12), 20_000, rate_scale=0.2)
    start, end = to_us(utc(2025, 1, 10, 12)), to_us(utc(2025, 1, 10, 14))  # the archived hours
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 11))
        assert store.is_closed(MNQ.contract_id, "bid_ask", end)
        barrier = threading.Barrier(READERS)
        tables: list[pa.Table] = []

        def read() -> None:
            barrier.wait()
            tables.append(store.ticks(MNQ.contract_id, "bid_ask", start, end))

        threads = [threading.Thread(target=read) for _ in range(READERS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert store.cache.misses == 1 and store.cache.hits == READERS - 1
        expected = between(quotes, utc(2025, 1, 10, 12), utc(2025, 1, 10, 14))
        assert len(tables) == READERS and all(table.equals(expected) for table in tables)


def test_archiving_new_hours_is_no_rewrite_and_a_backfill_is(tmp_path):
    """The index's rewrite counter (what a server beside the recorder clears its cache on) stays put while
    hours are archived one after another, and moves when a backfill rewrites closed hours."""
    from tests.storage.test_backfill import CID, FIRST, from_ib, outside, scenario, settings_at

    market, g0, g1 = scenario(utc(2025, 1, 10, 23, 20), utc(2025, 1, 10, 23, 40))
    with Store(settings_at(tmp_path / "data")) as store:
        for at, status, reason in ((to_us(FIRST), "recorded", "subscribed"), (g0, "gap", "disconnected"),
                                   (g1, "recorded", "subscribed")):  # as tests.storage.test_backfill.record
            store.index.coverage_transition(CID, "bid_ask", at, status, reason)
        append_in_batches(store, outside(market, g0, g1))
        for hour in range(1, 7):  # one closed hour after another, as the archiver runs
            store.archive(now=FIRST + timedelta(hours=hour))
        assert store.index.archived_until_of(CID, "bid_ask") == to_us(FIRST + timedelta(hours=6))
        assert store.index.rewrites() == 0
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        assert store.index.rewrites() > 0
