"""Bar queries over every layer: archived hours' 1-minute pre-aggregates plus raw ticks.

For a stream and ``[start, end)`` at a bar resolution, partial bars (see :mod:`storage.bars`)
come from two kinds of piece, in time order:

* an archived hour lying wholly inside the range, at a step of one minute: its pre-aggregated
  1-minute partial bars from the index (``hour_bars``), computed once when the hour was
  archived (or on first use for hours archived before pre-aggregates existed);
* everything else (the range's cut edges, unarchived hours, the buffer and the in-memory
  tail, and every hour for sub-minute resolutions): the raw ticks through the query planner,
  aggregated chunk by chunk so memory stays bounded.

The pieces are rolled up into bars of the resolution, or into one bar per trading session
for ``1d``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ibstream.core.times import US_PER_HOUR
from ibstream.storage.archive import read_archive_file
from ibstream.storage.bars import (
    BAR_RESOLUTIONS,
    DAILY,
    PREAGGREGATE_US,
    bar_schema,
    conform,
    fill_grid,
    finish,
    partial_schema,
    partial_step_us,
    partial_table,
    rollup,
    rollup_sessions,
)
from ibstream.storage.index import ArchiveEntry
from ibstream.storage.schemas import TIMESTAMP
from ibstream.storage.segments import StreamKey, from_ipc_bytes, ipc_bytes

if TYPE_CHECKING:
    from ibstream.storage.sessions import Session
    from ibstream.storage.store import Store

log = logging.getLogger(__name__)

CHUNK_ROWS = 1 << 20  # raw ticks aggregated at a time
MAX_BATCH_BYTES = 2 * 1024 * 1024  # batches of bars handed out: well under gRPC's default 4 MiB message limit


def read_bars(store: "Store", key: StreamKey, start_us: int, end_us: int, resolution: str, *,
              fill: bool = False, sessions: list["Session"] | None = None) -> pa.Table:
    """Bars of one stream over ``[start_us, end_us)`` in batches of at most ``batch_rows`` rows and
    about 2 MiB (so a cached result is sent as it is); ``sessions`` (required for ``1d``) are the
    trading sessions whose bars are wanted, oldest first."""
    return _chunked(_read_bars(store, key, start_us, end_us, resolution, fill=fill, sessions=sessions),
                   store.settings.batch_rows)


def _chunked(table: pa.Table, batch_rows: int) -> pa.Table:
    """``table`` in batches of at most ``batch_rows`` rows and about :data:`MAX_BATCH_BYTES`."""
    if table.num_rows == 0:
        return table
    rows = max(1, min(batch_rows, int(MAX_BATCH_BYTES * table.num_rows / max(table.nbytes, 1))))
    return pa.Table.from_batches(table.to_batches(max_chunksize=rows), schema=table.schema)


def _read_bars(store: "Store", key: StreamKey, start_us: int, end_us: int, resolution: str, *,
               fill: bool, sessions: list["Session"] | None) -> pa.Table:
    step = partial_step_us(resolution)
    if resolution == DAILY:
        if not sessions:  # a weekend or holiday range: no daily bar
            return bar_schema(key.tick_type, resolution).empty_table()
        start_us, end_us = max(start_us, sessions[0].open_us), min(end_us, sessions[-1].close_us)
    partials = _partials(store, key, start_us, end_us, step) if start_us < end_us else _empty(key)
    if resolution == DAILY:
        partials = rollup_sessions(partials, key.tick_type, sessions or [])
    elif BAR_RESOLUTIONS[resolution] != step:
        partials = rollup(partials, key.tick_type, BAR_RESOLUTIONS[resolution])
    bars = finish(partials, key.tick_type, resolution)
    if fill:
        bars = fill_grid(bars, _grid(start_us, end_us, resolution, sessions))
    return bars


def _grid(start_us: int, end_us: int, resolution: str, sessions: list["Session"] | None) -> pa.Table:
    """Every bar start of the range (or every session, for daily bars)."""
    if resolution == DAILY:
        days = sessions or []
        return pa.table({"ts": pa.array([s.open_us for s in days], pa.int64()).cast(TIMESTAMP),
                         "session_date": pa.array([s.trading_date for s in days], pa.date32())})
    step = BAR_RESOLUTIONS[resolution]
    return pa.table({"ts": pa.array(np.arange(start_us - start_us % step, end_us, step)).cast(TIMESTAMP)})


def _empty(key: StreamKey) -> pl.DataFrame:
    return pl.DataFrame(partial_schema(key.tick_type).empty_table())


def _partials(store: "Store", key: StreamKey, start_us: int, end_us: int, step: int) -> pl.DataFrame:
    """Partial bars of ``step`` over the range, from pre-aggregates where possible (and where the
    raw ticks expired: then the range must cut expired hours on whole minutes)."""
    expired = {h.hour_start_us for h in store.index.expired(key.contract_id, key.tick_type.value, start_us, end_us)}
    if expired and step != PREAGGREGATE_US:
        store.refuse_expired(key, start_us, end_us)  # sub-minute bars need the raw ticks
    whole = _preaggregated_hours(store, key, start_us, end_us, expired) if step == PREAGGREGATE_US else {}
    for hour in expired - set(whole):  # an expired hour the range cuts: its minutes in the range
        lo, hi = max(start_us, hour), min(end_us, hour + US_PER_HOUR)
        if lo % PREAGGREGATE_US or hi % PREAGGREGATE_US:
            store.refuse_expired(key, lo, hi)
        minutes = from_ipc_bytes(_hour_bars_of(store, key, hour))
        ts = minutes.column("ts").cast(pa.int64())
        whole[hour] = minutes.filter(pc.and_(pc.greater_equal(ts, lo), pc.less(ts, hi)))
    pieces: list[pa.Table] = []
    cursor = start_us
    for hour in sorted(whole):
        if cursor < hour:
            pieces.extend(_raw_partials(store, key, cursor, hour, step))
        pieces.append(whole[hour])
        cursor = hour + US_PER_HOUR
    if cursor < end_us:
        pieces.extend(_raw_partials(store, key, cursor, end_us, step))
    if not pieces:
        return _empty(key)
    schema = partial_schema(key.tick_type)
    frame = pl.DataFrame(pa.concat_tables([conform(piece, schema) for piece in pieces]).combine_chunks())
    return rollup(frame, key.tick_type, step)  # merges bars split between two pieces or chunks


def _hour_bars_of(store: "Store", key: StreamKey, hour: int) -> bytes:
    blob = store.hour_bars(key.contract_id, key.tick_type.value, hour, hour + 1).get(hour)
    if blob is None:  # never: retention computes them before it expires an hour
        store.refuse_expired(key, hour, hour + US_PER_HOUR)
    assert blob is not None
    return blob


def _raw_partials(store: "Store", key: StreamKey, start_us: int, end_us: int, step: int) -> Iterator[pa.Table]:
    batches, rows = [], 0
    for batch in store.plan(key.contract_id, key.tick_type, start_us, end_us).batches():
        batches.append(batch)
        rows += batch.num_rows
        if rows >= CHUNK_ROWS:
            yield partial_table(pa.Table.from_batches(batches), key.tick_type, step)
            batches, rows = [], 0
    if batches:
        yield partial_table(pa.Table.from_batches(batches), key.tick_type, step)


def _preaggregated_hours(store: "Store", key: StreamKey, start_us: int, end_us: int,
                         expired: set[int]) -> dict[int, pa.Table]:
    """1-minute partial bars of each archived (or expired) hour wholly inside the range, by hour start."""
    tick_type = key.tick_type.value
    entries = [e for e in store.index.archives(key.contract_id, tick_type, start_us, end_us)
               if e.hour_start_us >= start_us and e.hour_start_us + US_PER_HOUR <= end_us]
    gone = sorted(h for h in expired if h >= start_us and h + US_PER_HOUR <= end_us)
    if not entries and not gone:
        return {}
    first = min([e.hour_start_us for e in entries] + gone)
    last = max([e.hour_start_us for e in entries] + gone)
    stored = store.hour_bars(key.contract_id, tick_type, first, last + 1)
    hours = {}
    for entry in entries:
        blob = stored.get(entry.hour_start_us)
        if blob is None:
            blob = _backfill(store, key, entry)
        hours[entry.hour_start_us] = from_ipc_bytes(blob)
    for hour in gone:
        hours[hour] = from_ipc_bytes(stored.get(hour) or _hour_bars_of(store, key, hour))
    return hours


def _backfill(store: "Store", key: StreamKey, entry: ArchiveEntry) -> bytes:
    """Pre-aggregates of an hour archived before they existed; kept if this store may write."""
    hour = entry.hour_start_us
    ticks = read_archive_file(store.planner.path_of(entry.file_path), entry.file_path, entry.row_groups)
    blob = ipc_bytes(partial_table(ticks, key.tick_type, PREAGGREGATE_US))
    if not store.read_only:
        store.index.put_hour_bars(key.contract_id, key.tick_type.value, hour, blob)
        log.info("computed the 1-minute pre-aggregates of %s hour %d (archived before they existed)", key, hour)
    return blob
