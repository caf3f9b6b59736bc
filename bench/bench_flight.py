"""Flight throughput of a full-day do_get: our FlightServer against a bare in-memory Flight server.

Our server plans the ticket and streams the archived hourly Parquet files (result cache off; a
second server on the same store with the cache on is measured too); the bare server is a
FlightServerBase whose do_get returns flight.RecordBatchStream(table) for a table already in
memory (the same batches ours sends): the loopback ceiling. Both run on 127.0.0.1 in this
process and are measured alternately. Target: ours within 1.5x of bare.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow.flight as flight  # noqa: E402
from common import (  # noqa: E402
    DAY_START,
    QUICK_HOURS,
    BareServer,
    archived_store,
    day_ticks,
    header,
    our_server,
    parse_args,
    serving,
    target,
    timed,
)

from ibstream.flight_server.commands import command  # noqa: E402
from ibstream.storage import Store  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402


def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    rounds = 3 if quick else 9
    with tempfile.TemporaryDirectory(prefix="bench-flight-") as tmp:
        store, _, _ = archived_store(Path(tmp), [day_ticks("bid_ask", hours=hours)], cache_max_bytes=0)
        cached = Store(store.settings.model_copy(update={"cache_max_bytes": 1 << 30}), read_only=True)
        with serving(our_server(store)) as ours_at, serving(our_server(cached)) as cached_at:
            ours = flight.connect(ours_at)
            descriptor = flight.FlightDescriptor.for_command(
                command(MNQ.contract_id, "bid_ask", DAY_START, DAY_START + timedelta(hours=hours)))
            ticket = ours.get_flight_info(descriptor).endpoints[0].ticket
            table = ours.do_get(ticket).read_all()
            with serving(BareServer(table)) as bare_at:
                bare = flight.connect(bare_at)
                clients = {"ours": ours, "bare": bare, "cached": flight.connect(cached_at)}
                seconds = {name: [] for name in clients}
                for _ in range(rounds):
                    for name, client in clients.items():
                        seconds[name].append(timed(lambda c=client: c.do_get(ticket).read_all())[0])
                bare.close()
            ours.close()
        in_process = min(timed(store.read, MNQ.contract_id, "bid_ask", DAY_START, DAY_START + timedelta(hours=hours))[0]
                         for _ in range(3))
        store.close()
        cached.close()
    mb, rows = table.nbytes / 1e6, table.num_rows
    header(f"flight: do_get of {rows:,} bid_ask ticks ({mb:.0f} MB Arrow, {table.column('ts').num_chunks} batches), "
           f"{rounds} alternating rounds")
    print(f"{'server':<6} {'':<7} {'seconds':>8} {'MB/s':>8} {'ticks/s':>13}")
    for name in ("ours", "cached", "bare"):
        for label, value in (("best", min(seconds[name])), ("median", statistics.median(seconds[name]))):
            print(f"{name:<6} {label:<7} {value:>8.3f} {mb / value:>8.0f} {rows / value:>13,.0f}")
    ratio_best = min(seconds["ours"]) / min(seconds["bare"])
    ratio_median = statistics.median(seconds["ours"]) / statistics.median(seconds["bare"])
    print(f"time ratio ours/bare: best {ratio_best:.2f}x, median {ratio_median:.2f}x (ours: result cache off, "
          "decoding Parquet; 'cached': the same range again with the result cache on)")
    print(f"time ratio cached/bare: median {statistics.median(seconds['cached']) / statistics.median(seconds['bare']):.2f}x")
    print(f"in-process Store.read of the same range (no Flight, best of 3): {in_process:.3f} s, {mb / in_process:.0f} MB/s")
    target(f"ours within 1.5x of bare (median ratio {ratio_median:.2f}x)", ratio_median <= 1.5)
    return {"ratio_best": ratio_best, "ratio_median": ratio_median}


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
