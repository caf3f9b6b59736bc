"""What bars mean, written the plain way (polars group_by_dynamic over raw ticks): the reference
model the bar tests compare the server's bars with."""

from __future__ import annotations

import polars as pl
from polars.testing import assert_frame_equal

APPROXIMATE = {"vwap", "mean_spread"}  # float sums: equal up to summation order


def reference_bars(raw: pl.DataFrame, tick_type: str, resolution: str) -> pl.DataFrame:
    """What bars mean, written the plain way: polars group_by_dynamic over the raw ticks."""
    if tick_type in ("last", "all_last"):
        size = pl.col("size").cast(pl.Float64)
        aggs = [pl.col("price").first().alias("open"), pl.col("price").max().alias("high"),
                pl.col("price").min().alias("low"), pl.col("price").last().alias("close"),
                pl.col("size").sum().alias("volume"),
                ((pl.col("price") * size).sum() / size.sum()).alias("vwap"),
                pl.len().cast(pl.Int64).alias("trade_count")]
    elif tick_type == "bid_ask":
        two_sided = (pl.col("bid_price") > 0) & (pl.col("ask_price") > 0)
        mid = pl.when(two_sided).then((pl.col("bid_price") + pl.col("ask_price")) / 2)
        spread = pl.when(two_sided).then(pl.col("ask_price") - pl.col("bid_price"))
        aggs = [mid.drop_nulls().first().alias("open"), mid.max().alias("high"), mid.min().alias("low"),
                mid.drop_nulls().last().alias("close"), pl.col("bid_price").last().alias("bid"),
                pl.col("ask_price").last().alias("ask"), pl.col("bid_size").last(), pl.col("ask_size").last(),
                spread.mean().alias("mean_spread"), pl.len().cast(pl.Int64).alias("quote_count")]
    else:
        aggs = [pl.col("mid_point").first().alias("open"), pl.col("mid_point").max().alias("high"),
                pl.col("mid_point").min().alias("low"), pl.col("mid_point").last().alias("close"),
                pl.len().cast(pl.Int64).alias("tick_count")]
    return raw.group_by_dynamic("ts", every=resolution).agg(aggs)  # polars: "1m" is a minute


def assert_bars_equal(served: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert served.columns == expected.columns
    exact = [c for c in served.columns if c not in APPROXIMATE]
    assert_frame_equal(served.select(exact), expected.select(exact), check_dtypes=False, check_exact=True)
    approximate = [c for c in served.columns if c in APPROXIMATE]
    if approximate:
        assert_frame_equal(served.select(approximate), expected.select(approximate), check_exact=False, rel_tol=1e-9)
