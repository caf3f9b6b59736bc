"""Cache warming: the first query after a server (re)start, in a fresh process, with the store's
warm-up of recent ticks (``warm_recent``, the default 2 h) against without it (``warm_recent=0``:
trading sessions only, as before). The query is the last 90 minutes of one stream: one archived
hour and the buffered segments after it. The OS page cache is not dropped between runs (that needs
root and a quiet machine): what warming saves here is the process's own work: footers parsed,
segments decoded, first-call costs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from common import DAY_START_US, day_ticks, parse_args, settings

from ibstream.core.times import US_PER_HOUR, from_us
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ

CHILD = textwrap.dedent("""
    import json, sys, threading, time
    from datetime import timedelta
    from pathlib import Path
    sys.path.insert(0, {bench!r})
    from common import settings
    from ibstream.clients import Client
    from ibstream.core.times import from_us
    from ibstream.flight_server import FlightServer
    from ibstream.storage import Store

    config = settings(Path({root!r}), warm_recent=timedelta(seconds={warm}))
    store = Store(config, read_only=True)
    server = FlightServer(store, "grpc://127.0.0.1:0", settings=config)
    threading.Thread(target=server.serve, daemon=True).start()
    store.warmed.wait()
    client = Client(f"grpc://127.0.0.1:{{server.port}}")
    started = time.perf_counter()
    rows = client.tables({cid}, "bid_ask", from_us({start}), from_us({end}))["bid_ask"].num_rows
    first = time.perf_counter() - started
    started = time.perf_counter()
    client.tables({cid}, "bid_ask", from_us({start}), from_us({end}))
    second = time.perf_counter() - started
    print(json.dumps({{"first": first, "second": second, "rows": rows}}))
    client.close(); server.shutdown()
""")


def first_query(root: Path, warm_seconds: int, start: int, end: int) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), root=str(root), warm=warm_seconds, cid=MNQ.contract_id,
                        start=start, end=end)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(quick: bool = False) -> None:
    hours = 3 if quick else 6
    runs = 3 if quick else 5
    ticks = day_ticks("bid_ask", hours=hours)
    end = DAY_START_US + hours * US_PER_HOUR
    print(f"\n== warming: first query after a restart ({ticks.num_rows:,} bid_ask ticks over {hours} h, the last "
          "2 h buffered) ==")
    with tempfile.TemporaryDirectory() as tmp:
        config = settings(tmp, fsync="none")
        with Store(config) as store:
            for at in range(0, ticks.num_rows, 20):  # the recorder's small group commits
                store.append(MNQ.contract_id, "bid_ask", ticks.slice(at, 20))
            store.archive(now=from_us(end - 2 * US_PER_HOUR))
        start = end - 90 * 60 * 1_000_000
        results: dict[str, list[dict]] = {"without": [], "with": []}
        for _ in range(runs):  # interleaved, each in a fresh process
            results["without"].append(first_query(Path(tmp), 0, start, end))
            results["with"].append(first_query(Path(tmp), 7200, start, end))
    median = {name: statistics.median(r["first"] for r in rs) * 1e3 for name, rs in results.items()}
    again = statistics.median(r["second"] for r in results["with"]) * 1e3
    rows = results["with"][0]["rows"]
    print(f"first query ({rows:,} ticks): {median['without']:.1f} ms without warming, {median['with']:.1f} ms with "
          f"({median['without'] / median['with']:.2f}x); the same query again: {again:.1f} ms (median of {runs} "
          "fresh processes)")


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
