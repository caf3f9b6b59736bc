"""HTTP gateway throughput: a full day of bid_ask as an Arrow IPC stream over HTTP against the same day
over Flight, and JSON rows per second.

One store (archived hourly Parquet, result cache off), one FlightServer and the HttpGateway over its
queries, both on 127.0.0.1 in this process, measured alternately in the same run: Flight
``do_get(...).read_all()`` against ``GET /v2/historical/{id}?format=arrow`` read with httpx and
``pyarrow.ipc.open_stream``; then the same range as NDJSON and as a JSON array (rows parsed by the
client), and as CSV. Target: HTTP Arrow within 2x of Flight.
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
from common import (  # noqa: E402
    DAY_START,
    QUICK_HOURS,
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
from ibstream.http_gateway import HttpGateway  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402


def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    rounds = 3 if quick else 7
    end = DAY_START + timedelta(hours=hours)
    params = {"tick_types": "bid_ask", "start_time": DAY_START.isoformat().replace("+00:00", "Z"),
              "end_time": end.isoformat().replace("+00:00", "Z")}
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        store, _, _ = archived_store(Path(tmp), [day_ticks("bid_ask", hours=hours)], cache_max_bytes=0)
        server = our_server(store)
        with serving(server) as location, HttpGateway(server.queries, store.settings) as http, \
                httpx.Client(base_url=http.url, timeout=600) as web:
            client = flight.connect(location)
            descriptor = flight.FlightDescriptor.for_command(command(MNQ.contract_id, "bid_ask", DAY_START, end))

            def over_flight() -> pa.Table:
                info = client.get_flight_info(descriptor)
                return client.do_get(info.endpoints[0].ticket).read_all()

            def over_http() -> pa.Table:
                with web.stream("GET", f"/v2/historical/{MNQ.contract_id}", params=params | {"format": "arrow"}) as r:
                    sink = io.BytesIO()
                    for chunk in r.iter_bytes():
                        sink.write(chunk)
                return pa.ipc.open_stream(sink.getvalue()).read_all()

            reference = over_flight()
            assert over_http().equals(reference)
            seconds: dict[str, list[float]] = {"flight": [], "http arrow": []}
            for _ in range(rounds):
                seconds["flight"].append(timed(over_flight)[0])
                seconds["http arrow"].append(timed(over_http)[0])

            def lines(fmt: str) -> int:
                count = 0
                with web.stream("GET", f"/v2/historical/{MNQ.contract_id}", params=params | {"format": fmt}) as r:
                    for line in r.iter_lines():
                        if fmt == "ndjson":
                            json.loads(line)
                        count += 1
                return count

            ndjson_s, ndjson_rows = timed(lines, "ndjson")
            array_s, array = timed(lambda: web.get(f"/v2/historical/{MNQ.contract_id}", params=params).json())
            csv_s, csv_lines = timed(lines, "csv")
            client.close()
        store.close()
    rows, mb = reference.num_rows, reference.nbytes / 1e6
    assert ndjson_rows == rows and len(array) == rows and csv_lines == rows + 1
    header(f"http: {rows:,} bid_ask ticks ({mb:.0f} MB Arrow) over HTTP and Flight, {rounds} alternating rounds")
    print(f"{'transport':<11} {'':<7} {'seconds':>8} {'MB/s':>8} {'ticks/s':>13}")
    for name, values in seconds.items():
        for label, value in (("best", min(values)), ("median", statistics.median(values))):
            print(f"{name:<11} {label:<7} {value:>8.3f} {mb / value:>8.0f} {rows / value:>13,.0f}")
    ratio = statistics.median(seconds["http arrow"]) / statistics.median(seconds["flight"])
    print(f"time ratio http arrow / flight: median {ratio:.2f}x, best "
          f"{min(seconds['http arrow']) / min(seconds['flight']):.2f}x")
    for name, value in (("ndjson (each line parsed)", ndjson_s), ("json array (response.json())", array_s),
                        ("csv (lines read)", csv_s)):
        print(f"{name:<30} {value:>8.3f} s {rows / value:>13,.0f} rows/s")
    target(f"http arrow within 2x of flight (median ratio {ratio:.2f}x)", ratio <= 2.0)
    return {"ratio": ratio, "ndjson_rows_per_second": rows / ndjson_s, "json_rows_per_second": rows / array_s}


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
