"""Bars and sessions over Flight: a month of 1-minute bars, a full MNQ session of ticks, cache hits.

Setup: 30 archived days of synthetic MNQ quotes (1.5M bid_ask a day, 45M ticks, 720 hourly
Parquet files with their 1-minute pre-aggregates), built once and kept in
bench/results/bars-store-<days>d/ (delete it to rebuild), with the MNQ contract details the
recorder stores (CME Globex hours). Every figure is wall time of a Client call (get_flight_info
+ do_get + read_all + to polars) from a client in the same process.

* cold: a fresh read-only Store and server (empty caches, new SQLite connections; the OS page
  cache is warm, since we cannot drop it here), after the server's start-up warming of the
  contract's exchange calendar (timed on its own);
* warm: the same query again with the result cache off (IBSTREAM_CACHE_MAX_BYTES=0): what any
  new range costs;
* hit: the result cache on, the range asked before.

Baseline, same process: the same month of 1-minute bars computed the plain way from the raw
ticks (polars scan_parquet over the archive + group_by_dynamic).
Targets: month of 1m bars < 300 ms warm and < 2 s cold; a full MNQ session at tick resolution
(cache off) <= 1.15x the bare server moving the same ticks; a cache hit < 5 ms and <= 1.1x a bare pyarrow.flight server answering the same query
(get_flight_info + do_get of the same table from memory; its do_get alone is printed too).
"""

from __future__ import annotations

import shutil
import sys
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
from common import (  # noqa: E402
    DAY_START,
    DAY_START_US,
    MEASURE_HEADER,
    BareServer,
    alternately,
    append_batches,
    day_ticks,
    header,
    measure,
    our_server,
    parse_args,
    serving,
    settings,
    target,
    timed,
)

from ibstream.clients import Client  # noqa: E402
from ibstream.core.times import US_PER_HOUR  # noqa: E402
from ibstream.simulator.market import SIM_MNQ  # noqa: E402
from ibstream.storage import Store  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def build(days: int) -> Path:
    """The bench store (built once): ``days`` archived days of MNQ bid_ask from DAY_START."""
    root = RESULTS / f"bars-store-{days}d"
    if (root / "complete").exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    with Store(settings(root, fsync="none")) as store:
        store.index.upsert_contract(SIM_MNQ.details((DAY_START + timedelta(days=days)).date()))
        for day in range(days):
            start_us = DAY_START_US + day * 24 * US_PER_HOUR
            append_batches(store, day_ticks("bid_ask", start_us=start_us, seed=day), 10_000)
            store.archive(now=DAY_START + timedelta(days=day + 1, minutes=1))
            print(f"  built day {day + 1}/{days} ({time.perf_counter() - started:.0f} s)", end="\r", flush=True)
    (root / "complete").touch()
    print(f"  built {days} days in {time.perf_counter() - started:.0f} s" + " " * 20)
    return root


def served(root: Path, **overrides):
    store = Store(settings(root, **overrides), read_only=True)
    return store, serving(our_server(store))


def main(quick: bool = False) -> dict:
    days = 3 if quick else 30
    repeats = 3 if quick else 5
    root = build(days)
    start, end = DAY_START, DAY_START + timedelta(days=days)
    month = lambda client: len(client.bars(MNQ.contract_id, "bid_ask", "1m", start, end))  # noqa: E731
    session_day = (DAY_START + timedelta(weeks=(days - 2) // 7)).date()  # a Friday: a whole Globex day
    session = lambda client: len(client.session_ticks(  # noqa: E731
        MNQ.contract_id, session_day, kind="extended", tick_types="bid_ask"))
    header(f"bars: {days} archived days of MNQ bid_ask ({days * 1.5:.0f}M ticks, {days * 24} hourly files)")
    print(MEASURE_HEADER)
    results = {}

    store, running = served(root, cache_max_bytes=0)
    with running as location, Client(location) as client:
        seconds, _ = timed(store.warm_sessions)  # what the server does on a thread at start
        print(f"{'loading the CMES calendar (once per process, at server start)':<76} {seconds * 1e3:>9.2f}")
        results["cold"] = measure(f"{days} days of 1m bars, cold (fresh store and server)", 1, lambda: month(client),
                                  warm_up=False)
        results["warm"] = measure(f"{days} days of 1m bars, warm (result cache off)", repeats, lambda: month(client))
        measure("  same, in-process Store.bars (no Flight)", repeats,
                lambda: store.bars(MNQ.contract_id, "bid_ask", DAY_START_US, DAY_START_US + days * 24 * US_PER_HOUR,
                                   "1m").num_rows)
        results["session"] = measure(f"session {session_day} extended (17:00-16:00 CT) ticks, cache off",
                                     repeats, lambda: session(client))
    store.close()

    store, running = served(root)
    with running as location, Client(location) as client:
        month(client)  # computed once, then a cache hit
        same_bars = client.tables(MNQ.contract_id, "bid_ask", start, end, resolution="1m")["bid_ask"]
        same_session = client.session_ticks(MNQ.contract_id, session_day, kind="extended", tick_types="bid_ask")
        with serving(BareServer(same_bars)) as bare_location:
            bare = flight.connect(bare_location)
            descriptor = flight.FlightDescriptor.for_command(b"bars")
            hits = alternately({
                f"{days} days of 1m bars, result cache hit": lambda: month(client),
                "  floor: bare pyarrow.flight do_get of the same bars": lambda: len(
                    pl.from_arrow(bare.do_get(flight.Ticket(b"bars")).read_all(), rechunk=False)),
                "  floor: bare get_flight_info + do_get (a whole Flight query)": lambda: len(pl.from_arrow(
                    bare.do_get(bare.get_flight_info(descriptor).endpoints[0].ticket).read_all(), rechunk=False)),
            }, repeats * 4)
            results["hit"], results["bare"], results["bare_query"] = hits.values()
        with serving(BareServer(same_session.to_arrow())) as bare_location:
            bare = flight.connect(bare_location)
            sessions = alternately({
                "session ticks, result cache hit": lambda: session(client),
                "  floor: bare pyarrow.flight do_get of the same session ticks": lambda: len(
                    pl.from_arrow(bare.do_get(flight.Ticket(b"s")).read_all(), rechunk=False)),
            }, repeats)
            results["session_hit"], results["bare_session"] = sessions.values()
        print(f"  cache: {store.cache.current_bytes / 2**20:.1f} MiB held, {store.cache.hits} hits, "
              f"{store.cache.misses} misses; each floor above ran in turn with the line before it")
    store.close()

    def raw_month() -> int:
        ticks = pl.scan_parquet(root / "data/archive/tick_type=bid_ask/", hive_partitioning=True)
        mid = (pl.col("bid_price") + pl.col("ask_price")) / 2
        bars = ticks.select("ts", "bid_price", "ask_price").sort("ts").group_by_dynamic("ts", every="1m").agg(
            mid.first().alias("open"), mid.max().alias("high"), mid.min().alias("low"), mid.last().alias("close"),
            pl.col("bid_price").last(), pl.col("ask_price").last(),
            (pl.col("ask_price") - pl.col("bid_price")).mean().alias("spread"), pl.len())
        return bars.collect().height

    results["raw"] = measure("baseline: raw ticks -> polars group_by_dynamic (in-process)", 2, raw_month,
                             warm_up=False)
    print(f"ratio warm / raw baseline: {results['warm']['p50'] / results['raw']['p50']:.3f} "
          f"({results['raw']['p50'] / results['warm']['p50']:.0f}x faster)")
    target(f"month of 1m bars < 300 ms warm ({results['warm']['p50']:.0f} ms) and < 2 s cold "
           f"({results['cold']['p50']:.0f} ms)", results["warm"]["p50"] < 300 and results["cold"]["p50"] < 2000)
    session_ratio = results["session"]["p50"] / results["bare_session"]["p50"]
    target(f"full MNQ session at tick resolution, cache off, <= 1.15x the bare server moving the same ticks "
           f"(issue 19's full-day goal; {results['session']['p50']:.0f} vs {results['bare_session']['p50']:.0f} ms: "
           f"{session_ratio:.2f}x)", session_ratio <= 1.15)
    target(f"cache hit < 5 ms ({results['hit']['p50']:.2f} ms; the bare server's floor for the same "
           f"{same_bars.nbytes / 2**20:.1f} MiB: {results['bare']['p50']:.2f} ms)", results["hit"]["p50"] < 5)
    hit, floor = results["hit"]["p50"], results["bare_query"]["p50"]
    target(f"cache hit <= 1.1x the bare server's Flight query ({hit:.2f} vs {floor:.2f} ms: {hit / floor:.2f}x; "
           f"{hit / results['bare']['p50']:.2f}x its do_get alone)", hit <= 1.1 * floor)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
