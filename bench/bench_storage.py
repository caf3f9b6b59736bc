"""Bytes per tick on disk: our hourly Parquet archive against JSON lines and other Parquet settings.

One synthetic MNQ day of bid_ask and last ticks is appended to a store and archived per hour by
the store's own Archiver (Store.archive). The same hour tables are then re-written with each
variant; every figure counts one file per hour, as the archive stores them.
Target: <= 12 bytes per bid_ask tick.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import QUICK_HOURS, archived_store, day_ticks, header, parse_args, target  # noqa: E402

from ibstream.storage.archive import parquet_options  # noqa: E402


def json_lines(table: pa.Table) -> pl.DataFrame:
    """IB-Stream v2-style records: ts in microseconds, ib_time in seconds, sizes as numbers."""
    frame = pl.from_arrow(table)
    return frame.with_columns(
        pl.col("ts").dt.epoch("us"),
        (pl.col("ib_time").dt.epoch("s")),
        pl.col(pl.Decimal).cast(pl.Int64),
    )


def variants(ours: dict, schema: pa.Schema) -> dict[str, dict | None]:
    """Writer options per variant; None marks the JSON lines baseline."""
    prices = [f.name for f in schema if pa.types.is_floating(f.type)]
    plain_clocks = {k: v for k, v in ours.items() if k != "column_encoding"}
    bss = dict(ours, use_dictionary=[n for n in ours["use_dictionary"] if n not in prices],
               column_encoding=ours["column_encoding"] | {n: "BYTE_STREAM_SPLIT" for n in prices})
    return {
        "JSON lines": None,
        "pyarrow default (snappy)": {},
        "zstd-3, default encodings": {"compression": "zstd", "compression_level": 3},
        "zstd-9, default encodings": {"compression": "zstd", "compression_level": 9},
        "zstd-19, default encodings": {"compression": "zstd", "compression_level": 19},
        "ours, zstd-3": dict(ours, compression_level=3),
        "ours = parquet_options (zstd-9)": ours,
        "ours, zstd-19": dict(ours, compression_level=19),
        "ours, PLAIN clocks (no DELTA)": plain_clocks,
        "ours + BYTE_STREAM_SPLIT prices": bss,
        "ours, decimals as FIXED_LEN_BYTE_ARRAY": dict(ours, store_decimal_as_integer=False),
        "ours, no compression": dict(ours, compression=None, compression_level=None),
    }


def write_hours(hours: list[pa.Table], options: dict | None, folder: Path) -> tuple[int, float, float]:
    """Total bytes, write seconds and read-back seconds of one file per hour."""
    folder.mkdir(parents=True)
    paths = [folder / f"{i:02d}.{'jsonl' if options is None else 'parquet'}" for i in range(len(hours))]
    started = time.perf_counter()
    for table, path in zip(hours, paths):
        if options is None:
            json_lines(table).write_ndjson(path)
        else:
            pq.write_table(table, path, **options)
    written = time.perf_counter() - started
    started = time.perf_counter()
    for path in paths:
        pl.read_ndjson(path) if options is None else pq.read_table(path)
    read = time.perf_counter() - started
    return sum(p.stat().st_size for p in paths), written, read


def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    day = {t: day_ticks(t, hours=hours) for t in ("bid_ask", "last")}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        store, entries, archive_seconds = archived_store(Path(tmp), list(day.values()))
        settings = store.settings
        store.close()
        hourly = {t: [pq.read_table(settings.archive_root / e.file_path) for e in entries if e.tick_type == t]
                  for t in day}
        counts = {t: sum(h.num_rows for h in hourly[t]) for t in day}
        ours_bytes = {t: sum(e.file_size_bytes for e in entries if e.tick_type == t) for t in day}
        header(f"storage: {counts['bid_ask']:,} bid_ask + {counts['last']:,} last ticks, "
               f"{len(hourly['bid_ask'])} hourly files each")
        print("JSON line example:", json_lines(hourly["bid_ask"][0].slice(0, 1)).write_ndjson().strip())
        print(f"{'variant':<40} {'B/tick bid_ask':>15} {'B/tick last':>12} {'write s':>8} {'read s':>7} {'vs JSON':>8}")
        print(f"{'Store.archive, actual files (*)':<40} {ours_bytes['bid_ask'] / counts['bid_ask']:>15.2f} "
              f"{ours_bytes['last'] / counts['last']:>12.2f} {archive_seconds:>8.2f}")
        options = {t: variants(parquet_options(settings, day[t].schema), day[t].schema) for t in day}
        results, json_bytes = {}, None
        for i, name in enumerate(options["bid_ask"]):
            per_type = {t: write_hours(hourly[t], options[t][name], Path(tmp) / f"v{i}" / t) for t in day}
            bytes_per_tick = {t: per_type[t][0] / counts[t] for t in day}
            json_bytes = json_bytes or bytes_per_tick["bid_ask"]
            results[name] = bytes_per_tick
            print(f"{name:<40} {bytes_per_tick['bid_ask']:>15.2f} {bytes_per_tick['last']:>12.2f} "
                  f"{sum(p[1] for p in per_type.values()):>8.2f} {per_type['bid_ask'][2]:>7.2f} "
                  f"{json_bytes / bytes_per_tick['bid_ask']:>7.1f}x")
    arrow = day["bid_ask"].nbytes / day["bid_ask"].num_rows
    print("(*) write s = the whole Store.archive run: read segments, write Parquet, fsync, index, day statistics")
    print(f"in-memory Arrow: {arrow:.0f} B/tick bid_ask; write s = both tick types; read s = reading the bid_ask files back")
    ours = ours_bytes["bid_ask"] / counts["bid_ask"]
    target(f"<= 12 bytes per bid_ask tick (ours: {ours:.2f})", ours <= 12)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
