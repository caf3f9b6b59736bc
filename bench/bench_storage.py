"""Bytes per tick on disk: our hourly Parquet archive against JSON lines and other Parquet settings.

One synthetic MNQ day of bid_ask and last ticks is appended to a store and archived per hour by
the store's own Archiver (Store.archive). The same hour tables are then re-written with each
variant; every figure counts one file per hour, as the archive stores them. Each variant is also
measured on the IB-Stream fixture (real IB-shaped ticks, imported by the store's own importer),
as an encoding is adopted only if it wins there too; `read s` reads the whole bench day back
(pq.read_table of its hourly bid_ask files, best of 3). The empirical entropy of the data is the
floor the bytes per tick are compared with.
Targets: <= 12 bytes per bid_ask tick; issue 19: <= 4.5 on the bench day.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import QUICK_HOURS, archived_store, day_ticks, header, parse_args, target  # noqa: E402
from common import settings as store_settings  # noqa: E402

from ibstream.storage import Store  # noqa: E402
from ibstream.storage.archive import parquet_options  # noqa: E402
from ibstream.storage.ib_stream_import import import_ib_stream  # noqa: E402

FIXTURE = Path("/work/shared/fixtures/ib-stream-v3")  # as tests/storage/test_ib_stream_import.py
TICK_TYPES = ("bid_ask", "last")


def json_lines(table: pa.Table) -> pl.DataFrame:
    """IB-Stream v2-style records: ts in microseconds, ib_time in seconds, sizes as numbers."""
    frame = pl.from_arrow(table)
    return frame.with_columns(
        pl.col("ts").dt.epoch("us"),
        (pl.col("ib_time").dt.epoch("s")),
        pl.col(pl.Decimal).cast(pl.Int64),
    )


def variants(settings, table: pa.Table) -> dict[str, dict | None]:
    """Writer options per variant for one hour's ``table`` (ours depends on its prices); None marks the JSON
    lines baseline."""
    schema = table.schema
    ours = parquet_options(settings, schema, table)
    prices = [f.name for f in schema if pa.types.is_floating(f.type)]

    def encoded(encoding: str, names: list[str]) -> dict:
        return dict(ours, use_dictionary=[n for n in ours["use_dictionary"] if n not in names],
                    column_encoding=ours["column_encoding"] | {n: encoding for n in names})

    return {
        "JSON lines": None,
        "pyarrow default (snappy)": {},
        "zstd-9, default encodings": {"compression": "zstd", "compression_level": 9},
        "zstd-15, default encodings": {"compression": "zstd", "compression_level": 15},
        "before issue 19 (all stats, zstd-9)": dict(parquet_options(settings, schema), write_statistics=True,
                                                    compression_level=9),
        "ours = parquet_options": ours,
        "ours, zstd-9": dict(ours, compression_level=9),
        "ours, zstd-19": dict(ours, compression_level=19),
        "ours, statistics on every column": dict(ours, write_statistics=True),
        "ours, PLAIN clocks (no DELTA)": {k: v for k, v in ours.items() if k != "column_encoding"},
        "ours, dictionary prices on every grid": parquet_options(settings, schema),
        "ours, BYTE_STREAM_SPLIT on every grid": encoded("BYTE_STREAM_SPLIT", prices),
        "ours, PLAIN prices (no dictionary)": encoded("PLAIN", prices),
        "ours + BYTE_STREAM_SPLIT ib_time": encoded("BYTE_STREAM_SPLIT", ["ib_time"]),
        "ours, decimals as FIXED_LEN_BYTE_ARRAY": dict(ours, store_decimal_as_integer=False),
        "ours, no compression": dict(ours, compression=None, compression_level=None),
    }


def write_hours(hours: list[pa.Table], settings, variant: str, folder: Path) -> tuple[int, float, list[Path]]:
    """Total bytes and write seconds of one file per hour, and the files."""
    folder.mkdir(parents=True)
    per_hour = [variants(settings, table)[variant] for table in hours]
    paths = [folder / f"{i:02d}.{'jsonl' if options is None else 'parquet'}" for i, options in enumerate(per_hour)]
    started = time.perf_counter()
    for table, path, options in zip(hours, paths, per_hour):
        if options is None:
            json_lines(table).write_ndjson(path)
        else:
            pq.write_table(table, path, **options)
    written = time.perf_counter() - started
    return sum(p.stat().st_size for p in paths), written, paths


def read_seconds(paths: list[Path], repeats: int = 3) -> float:
    """Best of ``repeats`` reads of every file."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            pl.read_ndjson(path) if path.suffix == ".jsonl" else pq.read_table(path)
        best = min(best, time.perf_counter() - started)
    return best


def fixture_hours(folder: Path) -> dict[str, list[pa.Table]]:
    """The fixture's hourly tables per tick type, as our importer archives them (empty without the fixture)."""
    if not FIXTURE.is_dir():
        return {t: [] for t in TICK_TYPES}
    with Store(store_settings(folder)) as store:
        import_ib_stream(store, FIXTURE)
        root = store.settings.archive_root
    return {t: [pq.read_table(p) for p in sorted((root / f"tick_type={t}").rglob("*.parquet"))] for t in TICK_TYPES}


# -- entropy -----------------------------------------------------------------------------------

DELTA_BIN_BITS = 8  # ts deltas are binned by 256 µs (see column_bits)


def entropy_bits(values: np.ndarray) -> float:
    """Empirical (order-0) entropy of ``values``, bits per value."""
    _, counts = np.unique(values, return_counts=True)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log2(p)).sum()))


def column_bits(table: pa.Table) -> dict[str, float]:
    """Bits per tick of each column, given what the columns before it tell (a simple model, so an estimate of
    the floor, not a proof): ``ts`` by its delta, ``ib_time`` by its offset from ``ts``'s second, the first price
    by its change from the tick before, a second price by its difference from the first, every other column by
    its values. ts deltas spread over ~10^6 values, too many to count from a day's ticks: they are counted in
    256 µs bins, within which the density is flat (mean gap ~58,000 µs), so a delta costs 8 bits more than its bin."""
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    bits = {"ts": entropy_bits(np.diff(ts) >> DELTA_BIN_BITS) + DELTA_BIN_BITS,
            "ib_time": entropy_bits(ts - ts % 1_000_000 - table.column("ib_time").cast(pa.int64()).to_numpy())}
    prices = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    first = table.column(prices[0]).to_numpy() if prices else None
    for f in table.schema:
        if f.name in bits:
            continue
        if f.name == prices[0]:
            bits[f.name] = entropy_bits(np.diff(first))
        elif f.name in prices:
            bits[f.name] = entropy_bits(table.column(f.name).to_numpy() - first)
        else:
            bits[f.name] = entropy_bits(table.column(f.name).cast(pa.string()).to_numpy(zero_copy_only=False))
    return bits


def hourly_bits(tables: list[pa.Table]) -> dict[str, float]:
    """:func:`column_bits` of each hourly file (one stream's hour), averaged over their ticks."""
    rows = sum(t.num_rows for t in tables)
    per_file = [column_bits(t) for t in tables]
    return {name: sum(b[name] * t.num_rows for b, t in zip(per_file, tables)) / rows for name in per_file[0]}


# -- the bench ---------------------------------------------------------------------------------

def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    day = {t: day_ticks(t, hours=hours) for t in TICK_TYPES}
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        store, entries, archive_seconds = archived_store(Path(tmp), list(day.values()))
        settings = store.settings
        store.close()
        hourly = {t: [pq.read_table(settings.archive_root / e.file_path) for e in entries if e.tick_type == t]
                  for t in day}
        fixture = fixture_hours(Path(tmp) / "fixture")
        counts = {t: sum(h.num_rows for h in hourly[t]) for t in day}
        fixture_counts = {t: sum(h.num_rows for h in fixture[t]) for t in day}
        ours_bytes = {t: sum(e.file_size_bytes for e in entries if e.tick_type == t) for t in day}
        header(f"storage: {counts['bid_ask']:,} bid_ask + {counts['last']:,} last ticks, "
               f"{len(hourly['bid_ask'])} hourly files each; fixture (IB-Stream v3): {fixture_counts['bid_ask']:,} "
               f"bid_ask + {fixture_counts['last']:,} last ticks, {len(fixture['bid_ask'])} hourly files each")
        print("JSON line example:", json_lines(hourly["bid_ask"][0].slice(0, 1)).write_ndjson().strip())
        print(f"{'':<40} {'bench day B/tick':>19} {'fixture B/tick':>17}")
        print(f"{'variant':<40} {'bid_ask':>9} {'last':>9} {'bid_ask':>8} {'last':>8} {'write s':>8} {'read s':>7} "
              f"{'vs JSON':>8}")
        print(f"{'Store.archive, actual files (*)':<40} {ours_bytes['bid_ask'] / counts['bid_ask']:>9.2f} "
              f"{ours_bytes['last'] / counts['last']:>9.2f} {'':>17} {archive_seconds:>8.2f}")
        results, json_bytes = {}, None
        for i, name in enumerate(variants(settings, hourly["bid_ask"][0])):
            per_type = {t: write_hours(hourly[t], settings, name, Path(tmp) / f"v{i}" / t) for t in day}
            on_fixture = {t: write_hours(fixture[t], settings, name, Path(tmp) / f"f{i}" / t)[0] for t in day}
            bytes_per_tick = {t: per_type[t][0] / counts[t] for t in day}
            fixture_per_tick = {t: on_fixture[t] / max(1, fixture_counts[t]) for t in day}
            json_bytes = json_bytes or bytes_per_tick["bid_ask"]
            results[name] = bytes_per_tick | {f"fixture {t}": fixture_per_tick[t] for t in day}
            print(f"{name:<40} {bytes_per_tick['bid_ask']:>9.2f} {bytes_per_tick['last']:>9.2f} "
                  f"{fixture_per_tick['bid_ask']:>8.2f} {fixture_per_tick['last']:>8.2f} "
                  f"{sum(p[1] for p in per_type.values()):>8.2f} {read_seconds(per_type['bid_ask'][2]):>7.3f} "
                  f"{json_bytes / bytes_per_tick['bid_ask']:>7.1f}x")
    arrow = day["bid_ask"].nbytes / day["bid_ask"].num_rows
    print("(*) write s = the whole Store.archive run: read segments, write Parquet, fsync, index, day statistics")
    print(f"in-memory Arrow: {arrow:.0f} B/tick bid_ask; write s = both tick types of the bench day; "
          "read s = reading the bench day's bid_ask files back")
    ours = ours_bytes["bid_ask"] / counts["bid_ask"]
    print("empirical entropy per hourly file (see column_bits; biased low on the fixture's small hours), bytes per "
          "tick, against ours = parquet_options:")
    for name, tables, bytes_of in (("bench day", hourly, results["ours = parquet_options"]),
                                   ("fixture", fixture, {t: results["ours = parquet_options"][f"fixture {t}"]
                                                         for t in day})):
        for t in day:
            if not tables[t]:
                continue
            bits = hourly_bits(tables[t])
            floor = sum(bits.values()) / 8
            print(f"  {name} {t:<8} {floor:5.2f} B/tick; ours {bytes_of[t]:.2f} = {bytes_of[t] / floor:.2f}x  ("
                  + ", ".join(f"{k} {v / 8:.2f}" for k, v in bits.items()) + ")")
    target(f"<= 12 bytes per bid_ask tick (ours: {ours:.2f})", ours <= 12)
    target(f"issue 19: <= 4.5 bytes per bid_ask tick, bench day (ours: {ours:.2f})", ours <= 4.5)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
