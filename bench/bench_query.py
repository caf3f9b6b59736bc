"""Query latency over Flight: a 1-minute tail query (open segment) and a full-day query (archive).

Setup: one synthetic MNQ day of bid_ask ticks appended and archived (24 hourly Parquet files),
then the next hour appended live through Store.append in small batches, as the recorder's group
commits do, so it stays in the buffer (closed 15 min segments and the open one's batches).
Latency is wall time of clients.Client.tables (get_flight_info + do_get + read_all) from a client
in the same process. Target: tail p50 < 10 ms.
"""

from __future__ import annotations

import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
from common import (  # noqa: E402
    DAY_START,
    DAY_START_US,
    MEASURE_HEADER,
    QUICK_HOURS,
    append_batches,
    archived_store,
    day_ticks,
    header,
    measure,
    our_server,
    parse_args,
    serving,
    target,
)

from ibstream.clients import Client  # noqa: E402
from ibstream.core.times import US_PER_HOUR, from_us  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402

LIVE_BATCH = 50  # ticks per live append (a few seconds of quotes)


def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    day = day_ticks("bid_ask", hours=hours)
    live = day_ticks("bid_ask", hours=1, start_us=DAY_START_US + hours * US_PER_HOUR, seed=1)
    tail_repeats, day_repeats = (20, 3) if quick else (50, 5)
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        store, entries, _ = archived_store(Path(tmp), [day])
        append_batches(store, live, LIVE_BATCH)
        last = from_us(live.column("ts").cast(pa.int64())[-1].as_py())
        tail = (last - timedelta(minutes=1), last + timedelta(microseconds=1))
        day_range = (DAY_START, DAY_START + timedelta(hours=hours))
        middle = DAY_START + timedelta(hours=hours / 2, minutes=7)
        archived_minute = (middle, middle + timedelta(minutes=1))
        snapshot = store.writer.snapshot(store.writer.streams()[0])
        header(f"query: {day.num_rows:,} archived ticks in {len(entries)} hourly files; live hour of "
               f"{live.num_rows:,} ticks in {len(snapshot.closed)} closed segments + {len(snapshot.open_batches)} "
               f"open batches of {LIVE_BATCH}")
        print(MEASURE_HEADER)
        results = {}
        with serving(our_server(store)) as location, Client(location) as client:
            def over_flight(window):
                return lambda: client.tables(MNQ.contract_id, "bid_ask", *window)["bid_ask"].num_rows

            def in_process(window):
                return lambda: store.read(MNQ.contract_id, "bid_ask", *window).num_rows

            results["tail"] = measure("tail 1 min (open segment), Flight", tail_repeats, over_flight(tail))
            measure("  same, in-process Store.read", tail_repeats, in_process(tail))
            measure("  same, Client.ticks (to polars)", tail_repeats,
                    lambda: len(client.ticks(MNQ.contract_id, "bid_ask", *tail)))
            measure("1 min inside an archived hour, Flight", tail_repeats, over_flight(archived_minute))
            measure("  same, in-process Store.read", tail_repeats, in_process(archived_minute))
            results["day"] = measure(f"full day ({hours} h archived), Flight", day_repeats, over_flight(day_range))
            measure("  same, in-process Store.read", day_repeats, in_process(day_range))
        store.close()
    target(f"tail p50 < 10 ms (ours: {results['tail']['p50']:.2f} ms)", results["tail"]["p50"] < 10)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
