"""Shared helpers: a bid_ask table written with ibstream's parquet_options (copied from storage/archive.py)."""
import decimal, os, sys
import pyarrow as pa, pyarrow.parquet as pq

TIMESTAMP = pa.timestamp("us", tz="UTC"); SIZE = pa.decimal128(18, 8)
def _f(n, t): return pa.field(n, t, nullable=False)
BID_ASK = pa.schema([_f("ts", TIMESTAMP), _f("ib_time", TIMESTAMP), _f("bid_price", pa.float64()),
    _f("ask_price", pa.float64()), _f("bid_size", SIZE), _f("ask_size", SIZE),
    _f("bid_past_low", pa.bool_()), _f("ask_past_high", pa.bool_())], metadata={"ibstream.tick_type": "bid_ask"})

def parquet_options(schema, codec="zstd", level=3):
    clocks = ["ts", "ib_time"]
    return dict(compression=codec, compression_level=level,
        use_dictionary=[n for n in schema.names if n not in clocks],
        column_encoding={n: "DELTA_BINARY_PACKED" for n in clocks},
        store_decimal_as_integer=True, write_statistics=True, row_group_size=1 << 20,
        sorting_columns=[pq.SortingColumn(schema.get_field_index("ts"))], write_page_checksum=True)

HOUR_US = 3600 * 10**6
def hour_table(hour_start_us, n=10_000):
    import numpy as np
    ts = hour_start_us + np.sort(np.random.default_rng(hour_start_us % 997).integers(0, HOUR_US, n))
    bid = 100 + np.round(np.random.default_rng(1).normal(0, 0.1, n), 2)
    sz = [decimal.Decimal(int(x)) for x in np.random.default_rng(2).integers(1, 500, n)]
    return pa.table({"ts": pa.array(ts, TIMESTAMP), "ib_time": pa.array(ts // 10**6 * 10**6, TIMESTAMP),
        "bid_price": bid, "ask_price": bid + 0.01, "bid_size": pa.array(sz, SIZE), "ask_size": pa.array(sz, SIZE),
        "bid_past_low": np.zeros(n, bool), "ask_past_high": np.zeros(n, bool)}, schema=BID_ASK)

def write_hour(where, table, filesystem=None, row_groups=None):
    opts = parquet_options(table.schema); rgs = opts.pop("row_group_size")
    with pq.ParquetWriter(where, table.schema, filesystem=filesystem, **opts) as w:
        if row_groups:   # a "day file": one run of row groups per hour
            for t in row_groups: w.write_table(t, row_group_size=rgs)
        else:
            w.write_table(table, row_group_size=rgs)

H0 = 1736517600 * 10**6   # 2025-01-10T14:00Z
