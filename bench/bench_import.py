"""Import: the rate at which `ibstream import` moves an IB-Stream v3 root into a new store.

The root is generated here in IB-Stream's own layout and encodings (v3 JSON lines and
length-prefixed protobuf, one file per stream and hour of IB time, both copies of every tick):
synthetic MNQ quotes and trades over 6 hours (--quick: 2), about 240k ticks (80k). The import
reads both copies, cross-checks them record by record, converts sizes to exact decimals and
publishes one archive file per stream and hour (zstd-15, fsync, one index transaction each).
A second run over the same root (everything imported before) is timed too.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pyarrow as pa
from common import DAY_START_US, header, parse_args, settings

from ibstream.core.times import US_PER_HOUR
from ibstream.storage import Store
from ibstream.storage.ib_stream_import import import_ib_stream, write_ib_stream_v3
from ibstream.storage.synthetic import MNQ, synthetic_ticks

PER_HOUR = {"bid_ask": 36_000, "last": 4_000}  # ticks per hour (10/s quotes, ~1/s trades)


def ib_stream_records(hours: int):
    """IB-Stream v3 records (the JSON copy's keys) of synthetic MNQ quotes and trades."""
    for tick_type, per_hour in PER_HOUR.items():
        probe = synthetic_ticks(MNQ, tick_type, DAY_START_US, hours * per_hour, seed=3)
        span = probe.column("ts").cast(pa.int64())[-1].as_py() - DAY_START_US
        table = synthetic_ticks(MNQ, tick_type, DAY_START_US, hours * per_hour, seed=3,
                                rate_scale=span / (hours * US_PER_HOUR * 0.999))
        for row in table.to_pylist():
            st = int(row["ts"].timestamp() * 1_000_000)
            record = {"ts": int(row["ib_time"].timestamp()) * 1_000_000, "st": st, "cid": MNQ.contract_id,
                      "tt": tick_type, "rid": 9000}
            if tick_type == "bid_ask":
                record |= {"bp": row["bid_price"], "bs": float(row["bid_size"]), "ap": row["ask_price"],
                           "as": float(row["ask_size"]), "bpl": row["bid_past_low"] or None,
                           "aph": row["ask_past_high"] or None}
            else:
                record |= {"p": row["price"], "s": float(row["size"]), "upt": row["unreported"] or None}
            yield record


def main(quick: bool = False) -> dict:
    hours = 2 if quick else 6
    header(f"import an IB-Stream v3 root (JSON + protobuf, cross-checked) into a new store, {hours} h of MNQ")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "ib-stream"
        started = time.perf_counter()
        ticks = write_ib_stream_v3(root, ib_stream_records(hours))
        made = time.perf_counter() - started
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        print(f"IB-Stream root: {ticks:,} ticks, {size / 2**20:.1f} MB in both copies ({size / ticks:.0f} B/tick), "
              f"generated in {made:.1f} s")
        with Store(settings(Path(tmp))) as store:
            started = time.perf_counter()
            report = import_ib_stream(store, root)
            first = time.perf_counter() - started
            started = time.perf_counter()
            again = import_ib_stream(store, root)
            second = time.perf_counter() - started
        archive = sum(p.stat().st_size for p in (Path(tmp) / "data" / "archive").rglob("*.parquet"))
    rate = report.imported / first
    print(f"import: {report.imported:,} ticks in {report.hours} stream-hours in {first:.2f} s: {rate:,.0f} ticks/s "
          f"({report.compared:,} records cross-checked, {report.disagreements} disagreements); "
          f"archive {archive / report.imported:.1f} B/tick")
    print(f"second run (every hour imported before): {again.imported} ticks imported in {second:.2f} s "
          f"({again.files_skipped} of {again.files_skipped + again.json_files + again.protobuf_files} files not read "
          "again)")
    return {"ticks": report.imported, "seconds": first, "ticks_per_second": rate, "second_run_seconds": second}


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
