"""The archive's Parquet encoding (storage.archive.parquet_options): every value back bit for bit, statistics
where queries prune, and a changed compression level applying to the files written from then on only."""

from __future__ import annotations

import hashlib
from datetime import timedelta
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ibstream.core.times import to_us
from ibstream.storage import Store
from ibstream.storage.archive import parquet_options
from ibstream.storage.config import StorageSettings
from ibstream.storage.schemas import SIZE, schema_for
from ibstream.storage.synthetic import AAPL, MNQ, synthetic_ticks
from tests.helpers import EVERYTHING, append_in_batches, between, ticks, utc

# float64 edge cases a price column may hold: IB's -1 ("no price"), signed zeros, NaN with a payload,
# infinities, a subnormal, the extremes, and grid values with a long binary expansion
EDGE_PRICES = [-1.0, 0.0, -0.0, float("nan"), np.frombuffer(b"\x01\x00\x00\x00\x00\x00\xf8\x7f", "<f8")[0],
               float("inf"), float("-inf"), 5e-324, 1.7976931348623157e308, -1.7976931348623157e308, 230.01, 0.1]
# the same on the 1/256 grid (BYTE_STREAM_SPLIT): IB's -1, signed zeros, the grid's step, the largest finite grid values
GRID_EDGE_PRICES = [-1.0, 0.0, -0.0, 1 / 256, 2.0**-8 * 3, 2.0**52 + 0.5, -(2.0**52) - 0.25, 1.7976931348623157e308 / 256,
                    21_000.25]


def bits(column: pa.ChunkedArray) -> bytes:
    return np.asarray(column.combine_chunks().to_numpy(zero_copy_only=False)).view(np.uint64).tobytes()


@pytest.mark.parametrize("edges", [EDGE_PRICES, GRID_EDGE_PRICES], ids=["dictionary", "byte_stream_split"])
@pytest.mark.parametrize("tick_type", ["bid_ask", "last", "all_last", "mid_point"])
def test_every_value_comes_back_bit_identical(tmp_path, tick_type, edges):
    table = ticks(utc(2025, 1, 10, 14), 5_000, tick_type)
    prices = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    for name in prices:
        values = table.column(name).to_numpy().copy()
        values[:len(edges)] = edges
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(values))
    for name in [f.name for f in table.schema if pa.types.is_decimal(f.type)]:
        sizes = table.column(name).to_pylist()
        sizes[:3] = [Decimal("0.00000001"), Decimal("1234567890.12345678"), Decimal("0")]
        table = table.set_column(table.schema.get_field_index(name), name, pa.array(sizes, SIZE))
    table = table.cast(schema_for(tick_type))
    options = parquet_options(StorageSettings(data_root=tmp_path), table.schema, table)
    path = tmp_path / "data.parquet"
    pq.write_table(table, path, **options)
    assert price_encodings(path) == {name: "BYTE_STREAM_SPLIT" if edges is GRID_EDGE_PRICES else "RLE_DICTIONARY"
                                     for name in prices}
    back = pq.read_table(path)
    assert back.schema.equals(table.schema)
    for name in table.schema.names:
        if name in prices:
            assert bits(back.column(name)) == bits(table.column(name)), name  # NaN payloads and -0.0 included
        else:
            assert back.column(name).equals(table.column(name)), name


def price_encodings(path) -> dict[str, str]:
    """The data encoding of each price column of the file's first row group."""
    group = pq.read_metadata(path).row_group(0)
    columns = [group.column(c) for c in range(group.num_columns)]
    return {c.path_in_schema: next(e for e in c.encodings if e in ("BYTE_STREAM_SPLIT", "RLE_DICTIONARY"))
            for c in columns if c.physical_type == "DOUBLE"}


def test_archived_and_compacted_prices_take_the_encoding_of_their_grid(tmp_path):
    """MNQ's 0.25 grid is stored BYTE_STREAM_SPLIT, AAPL's 0.01 grid dictionary-encoded; a day file takes its
    first hour's choice, and every tick reads back as appended."""
    settings = StorageSettings(data_root=tmp_path, archive_delay=timedelta(0))
    mnq = ticks(utc(2025, 1, 10, 14), 4_000, rate_scale=0.04)
    aapl = synthetic_ticks(AAPL, "bid_ask", to_us(utc(2025, 1, 10, 14)), 4_000, rate_scale=0.08)
    with Store(settings) as store:
        append_in_batches(store, mnq)
        append_in_batches(store, aapl, contract_id=AAPL.contract_id)
        entries = store.archive(now=utc(2025, 1, 11))
        for contract_id, encoding in ((MNQ.contract_id, "BYTE_STREAM_SPLIT"), (AAPL.contract_id, "RLE_DICTIONARY")):
            hours = [e for e in entries if e.contract_id == contract_id]
            assert len(hours) > 1
            for entry in hours:
                assert set(price_encodings(settings.archive_root / entry.file_path).values()) == {encoding}
        store.compact(now=utc(2025, 1, 12))
        for contract_id, encoding in ((MNQ.contract_id, "BYTE_STREAM_SPLIT"), (AAPL.contract_id, "RLE_DICTIONARY")):
            (day_file,) = {e.file_path for e in store.index.archives_all() if e.contract_id == contract_id}
            assert set(price_encodings(settings.archive_root / day_file).values()) == {encoding}
        assert store.read(MNQ.contract_id, "bid_ask", *EVERYTHING).equals(mnq)
        assert store.read(AAPL.contract_id, "bid_ask", *EVERYTHING).equals(aapl)


def test_the_clocks_carry_statistics_and_ts_prunes_by_them(store):
    quotes = ticks(utc(2025, 1, 10, 13, 30), 20_000, rate_scale=0.5)
    append_in_batches(store, quotes)
    store.archive(now=utc(2025, 1, 11))
    files = sorted(store.settings.archive_root.rglob("*.parquet"))
    assert len(files) > 1
    for path in files:
        metadata = pq.read_metadata(path)
        names = metadata.schema.to_arrow_schema().names
        for g in range(metadata.num_row_groups):
            with_min_max = {names[c] for c in range(metadata.num_columns)
                            if (s := metadata.row_group(g).column(c).statistics) is not None and s.has_min_max}
            assert with_min_max == {"ts", "ib_time"}
    assert store.read(MNQ.contract_id, "bid_ask", utc(2025, 1, 10, 14), utc(2025, 1, 10, 15)).equals(
        between(quotes, utc(2025, 1, 10, 14), utc(2025, 1, 10, 15)))


def test_a_changed_compression_level_applies_to_new_files_only(tmp_path):
    def settings(**extra) -> StorageSettings:
        return StorageSettings(data_root=tmp_path / "data", archive_delay=timedelta(0), **extra)

    first, second = ticks(utc(2025, 1, 10, 14), 30_000, rate_scale=8), ticks(utc(2025, 1, 10, 15), 30_000, rate_scale=8)
    with Store(settings(parquet_compression_level=3)) as store:
        append_in_batches(store, first, 5_000)
        (old_entry,) = store.archive(now=utc(2025, 1, 10, 15, 30))
    old_path = settings().archive_root / old_entry.file_path
    old_digest = hashlib.sha256(old_path.read_bytes()).digest()
    with Store(settings()) as store:  # the default level
        append_in_batches(store, second, 5_000)
        (new_entry,) = store.archive(now=utc(2025, 1, 10, 16, 30))
        assert hashlib.sha256(old_path.read_bytes()).digest() == old_digest  # the old hour keeps its encoding
        new_path = store.settings.archive_root / new_entry.file_path
        at_old_level = tmp_path / "at_level_3.parquet"
        pq.write_table(pq.read_table(new_path), at_old_level, **parquet_options(settings(parquet_compression_level=3),
                                                                                second.schema, second))
        assert new_path.stat().st_size < at_old_level.stat().st_size  # the new hour at the new level
        assert store.read(MNQ.contract_id, "bid_ask", *EVERYTHING).equals(pa.concat_tables([first, second]))
        assert store.scrub(10) == []  # both files check against the index
