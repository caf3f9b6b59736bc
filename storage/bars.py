"""Bars: ticks downsampled to OHLC bars, through decomposable *partial* bars.

Every bar is computed in two steps. Ticks become **partial bars** (open, high, low, close,
sums and counts at some resolution); partial bars **roll up** into coarser partial bars
(the first non-null open, max high, min low, last non-null close, sums of sums); a last step
**finishes** them into the served columns (``vwap = notional / volume``, ``mean_spread =
spread_sum / two_sided``). Because every partial is decomposable, bars rolled up from the
archive's per-hour 1-minute pre-aggregates equal bars computed from the raw ticks: OHLC,
counts and (decimal) volumes exactly; ``vwap`` and ``mean_spread`` up to float summation order.

Served bar columns (``ts`` is the bar's start, UTC; bars are left-closed ``[ts, ts + res)``):

=============  ===============================================================================
trades         ``last``/``all_last``: open, high, low, close (trade prices), volume (exact
               decimal sum of sizes), vwap, trade_count
quotes         ``bid_ask``: open, high, low, close of the mid price ``(bid + ask) / 2`` over
               two-sided quotes (bid > 0 and ask > 0); the closing bid, ask, bid_size, ask_size
               (last quote of the bar); mean_spread (mean of ``ask - bid`` over the bar's
               two-sided quotes: a per-quote mean, not time-weighted); quote_count (all quotes)
mid_point      open, high, low, close of ``mid_point``; tick_count
=============  ===============================================================================

Daily (``1d``) bars add ``session_date`` (the trading date) after ``ts``, which is the
session's open.
"""

from __future__ import annotations

import functools

import polars as pl
import pyarrow as pa

from ibstream.core.resolutions import (  # noqa: F401 (re-exported: the bar vocabulary)
    BAR_RESOLUTIONS,
    DAILY,
    MAX_WINDOW_US,
    PREAGGREGATE_US,
    RESOLUTIONS,
    TICK,
    US_PER_MINUTE,
    parse_resolution,
    parse_window,
    partial_step_us,
)
from ibstream.core.ticks import TickFamily
from ibstream.storage.schemas import PRICE, SIZE, TIMESTAMP, TickType

VOLUME = pa.decimal128(38, 8)


# -- schemas -----------------------------------------------------------------------------------

def _ohlc(null_ok: bool = False) -> list[pa.Field]:
    return [pa.field(name, PRICE, nullable=null_ok) for name in ("open", "high", "low", "close")]


_PARTIAL = {
    TickFamily.TRADES: _ohlc() + [pa.field("volume", VOLUME), pa.field("notional", PRICE), pa.field("trade_count", pa.int64())],
    TickFamily.QUOTES: _ohlc(True) + [
        pa.field("bid", PRICE), pa.field("ask", PRICE), pa.field("bid_size", SIZE), pa.field("ask_size", SIZE),
        pa.field("spread_sum", PRICE), pa.field("two_sided", pa.int64()), pa.field("quote_count", pa.int64())],
    TickFamily.MID: _ohlc() + [pa.field("tick_count", pa.int64())],
}
_INTERNAL = {"notional", "spread_sum", "two_sided"}


def partial_schema(tick_type: TickType) -> pa.Schema:
    """Columns of partial bars (as polars produces them: every field nullable)."""
    return pa.schema([pa.field("ts", TIMESTAMP), *(f.with_nullable(True) for f in _PARTIAL[tick_type.family])])


@functools.cache  # asked for by every bar query's planning and reading; schemas are immutable
def bar_schema(tick_type: TickType, resolution: str) -> pa.Schema:
    """The served schema of bars of ``tick_type`` at ``resolution``."""
    fields = [f for f in _PARTIAL[tick_type.family] if f.name not in _INTERNAL]
    family = tick_type.family
    if family is TickFamily.TRADES:
        fields.insert(5, pa.field("vwap", PRICE))
    elif family is TickFamily.QUOTES:
        fields.insert(8, pa.field("mean_spread", PRICE))
    head = [pa.field("ts", TIMESTAMP, nullable=False)]
    if resolution == DAILY:
        head.append(pa.field("session_date", pa.date32(), nullable=False))
    metadata = {"ibstream.tick_type": tick_type.value, "ibstream.resolution": resolution}
    return pa.schema(head + [f.with_nullable(True) for f in fields], metadata=metadata)


# -- ticks -> partial bars ---------------------------------------------------------------------

def _tick_aggregations(tick_type: TickType) -> list[pl.Expr]:
    family, price = tick_type.family, tick_price(tick_type)
    if family is TickFamily.TRADES:
        return [*_ohlc_of(price), pl.col("size").sum().cast(pl.Decimal(38, 8)).alias("volume"),
                (price * pl.col("size").cast(pl.Float64)).sum().alias("notional"),
                pl.len().cast(pl.Int64).alias("trade_count")]
    if family is TickFamily.MID:
        return [*_ohlc_of(price), pl.len().cast(pl.Int64).alias("tick_count")]
    bid, ask = pl.col("bid_price"), pl.col("ask_price")
    two_sided = (bid > 0) & (ask > 0)
    return [*_ohlc_of(price), bid.last().alias("bid"), ask.last().alias("ask"),
            pl.col("bid_size").last(), pl.col("ask_size").last(),
            pl.when(two_sided).then(ask - bid).sum().alias("spread_sum"),
            two_sided.sum().cast(pl.Int64).alias("two_sided"), pl.len().cast(pl.Int64).alias("quote_count")]


def tick_price(tick_type: TickType) -> pl.Expr:
    """The price of each tick: a trade's price, a mid-point's, or a quote's mid ``(bid + ask) / 2``,
    null when the quote is one-sided (a price <= 0: IB's empty side)."""
    if tick_type.family is TickFamily.TRADES:
        return pl.col("price")
    if tick_type.family is TickFamily.MID:
        return pl.col("mid_point")
    bid, ask = pl.col("bid_price"), pl.col("ask_price")
    return pl.when((bid > 0) & (ask > 0)).then((bid + ask) / 2)


def _ohlc_of(price: pl.Expr) -> list[pl.Expr]:
    return [price.drop_nulls().first().alias("open"), price.max().alias("high"), price.min().alias("low"),
            price.drop_nulls().last().alias("close")]


def _floor(step_us: int) -> pl.Expr:
    micros = pl.col("ts").cast(pl.Int64)
    return (micros - micros % step_us).cast(pl.Datetime("us", "UTC")).alias("ts")


def partial_bars(ticks: pa.Table | pl.DataFrame, tick_type: TickType, step_us: int) -> pl.DataFrame:
    """Partial bars of ``step_us`` (UTC epoch-aligned) over ts-ordered ticks of one stream."""
    frame = ticks if isinstance(ticks, pl.DataFrame) else pl.DataFrame(ticks)
    if frame.height == 0:
        return pl.DataFrame(partial_schema(tick_type).empty_table())
    return frame.group_by(_floor(step_us), maintain_order=True).agg(_tick_aggregations(tick_type))


def partial_table(ticks: pa.Table, tick_type: TickType, step_us: int) -> pa.Table:
    """:func:`partial_bars` as an Arrow table of exactly :func:`partial_schema` (how pieces are
    kept and concatenated)."""
    return conform(partial_bars(ticks, tick_type, step_us).to_arrow(), partial_schema(tick_type))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return table if table.schema.equals(schema) else table.cast(schema)


# -- partial bars -> coarser partial bars -------------------------------------------------------

def _rollup_aggregations(tick_type: TickType) -> list[pl.Expr]:
    first_last = {"bid", "ask", "bid_size", "ask_size"}
    exprs = [pl.col("open").drop_nulls().first(), pl.col("high").max(), pl.col("low").min(),
             pl.col("close").drop_nulls().last()]
    for field in _PARTIAL[tick_type.family][4:]:
        exprs.append(pl.col(field.name).last() if field.name in first_last else pl.col(field.name).sum())
    return exprs


def rollup(partials: pl.DataFrame, tick_type: TickType, step_us: int) -> pl.DataFrame:
    """Merge ts-ordered partial bars into bars of ``step_us`` (also merges equal starts)."""
    if partials.height == 0:
        return partials
    return partials.group_by(_floor(step_us), maintain_order=True).agg(_rollup_aggregations(tick_type))


def rollup_sessions(partials: pl.DataFrame, tick_type: TickType, sessions: list) -> pl.DataFrame:
    """Merge partial bars into one bar per session (``storage.sessions.Session``), labelled by the
    session's open, with its ``session_date``; partials outside every session are dropped."""
    opens = pl.Series("open_us", [s.open_us for s in sessions], pl.Int64)
    closes = pl.Series("close_us", [s.close_us for s in sessions], pl.Int64)
    micros = partials.get_column("ts").cast(pl.Int64)
    slot = opens.search_sorted(micros, side="right").cast(pl.Int64) - 1  # -1: before the first open
    inside = (slot >= 0) & (micros < closes.gather(slot.clip(0, None)).fill_null(0))
    frame = partials.with_columns(slot.alias("_slot")).filter(inside)
    bars = frame.group_by("_slot", maintain_order=True).agg(_rollup_aggregations(tick_type))
    labels = pl.DataFrame({
        "_slot": pl.Series(range(len(sessions)), dtype=pl.Int64),
        "ts": opens.cast(pl.Datetime("us", "UTC")),
        "session_date": pl.Series([s.trading_date for s in sessions], dtype=pl.Date),
    })
    return labels.join(bars, on="_slot", how="inner", maintain_order="left").drop("_slot")


# -- partial bars -> served bars ---------------------------------------------------------------

def finish(partials: pl.DataFrame, tick_type: TickType, resolution: str) -> pa.Table:
    """Served bars (see the module docstring) from rolled-up partial bars."""
    schema = bar_schema(tick_type, resolution)
    family = tick_type.family
    if family is TickFamily.TRADES:
        volume = pl.col("volume").cast(pl.Float64)
        partials = partials.with_columns(pl.when(volume > 0).then(pl.col("notional") / volume).alias("vwap"))
    elif family is TickFamily.QUOTES:
        partials = partials.with_columns(
            pl.when(pl.col("two_sided") > 0).then(pl.col("spread_sum") / pl.col("two_sided")).alias("mean_spread"))
    table = partials.select(schema.names).to_arrow()
    return table.cast(schema) if table.num_rows else schema.empty_table()


def fill_grid(bars: pa.Table, grid: pa.Table) -> pa.Table:
    """``bars`` with a row for every bar start in ``grid`` (its ``ts`` and, for daily bars,
    ``session_date``): empty bars have zero counts and volume and null prices."""
    schema = bars.schema
    counts = [f.name for f in schema if f.name.endswith("_count") or f.name == "volume"]
    keys = [name for name in ("ts", "session_date") if name in schema.names]
    full = pl.DataFrame(grid.select(keys)).join(pl.DataFrame(bars), on=keys, how="left", maintain_order="left")
    full = full.with_columns(pl.col(name).fill_null(0) for name in counts)
    return full.to_arrow().cast(schema)
