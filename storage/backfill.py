"""Backfill: the ticks a recorder lost in a coverage gap, fetched from IB afterwards, go into the archive.

A gap (coverage status ``gap``: a disconnect, a crash, a nightly reset, a storage outage) is filled
with what ``reqHistoricalTicks`` returns for it (another job fetches them and calls
:func:`backfill`). IB's historical ticks carry whole seconds only, so:

* **Edge matching.** Live ticks recorded before the gap with the IB second S of the gap's start are
  a prefix of IB's sequence for S: the longest prefix of the historical rows of second S that
  equals (every column but ``ts``) the live rows of second S, in order, is dropped. Live ticks after
  the gap with the IB second E of the gap's end are a suffix of IB's sequence for E: the longest
  suffix of the historical rows of second E equal to the live rows of second E is dropped. Nothing
  else is deduplicated (a market can print two identical ticks in one second).
* **The gap's seconds.** IB starts a tick-by-tick subscription when it processes the request, a
  little after the recorder sent it (where the gap ends): ticks in between are sent to no one. So
  the seconds asked for run from the gap start's to the later of the gap end's (``end - 1 µs``)
  and the IB second of the first live tick after the gap (:func:`seconds_of_gap`): the first tick,
  within 60 s, of the ``recorded`` row that starts at the gap's end (none when that row is a
  market-data fallback or ends before a tick). That second is E of the edge rule, and the ticks of
  the seconds before it are added too.
* **Receive time.** A backfilled tick's ``ts`` is its IB second clamped into the gap,
  ``min(max(ib_time, gap_start), gap_end - 1)``, in IB's order: the stream stays non-decreasing in
  ``ts``, live ticks keep their receive times, every backfilled tick lies in [gap_start, gap_end)
  and no live one does. Provenance follows from coverage (:func:`provenance`).
* **Where they go.** Into the archive hours they fall in: an archived hour (an hourly file or its
  row groups in a compacted day file) is rewritten as a new hourly file, ``hour=HH/data-{made_us}.parquet``,
  holding its rows with the new ones in ``ts`` order; an hour without a file gets one. Then one index
  transaction swaps the hours' rows, their 1-minute bars, their days' statistics, and turns the
  gap's coverage row into ``backfilled``, ``partly_backfilled`` or ``unfillable`` (its reason kept,
  ``backfilled_ticks``, ``backfill_note`` and ``backfilled_at_us`` set). Replaced files go to
  ``superseded/`` (deleted ``retention_grace`` later by compaction's sweep).

The steps, and what answers queries after a kill at each (failpoints ``backfill.*``):

1. write each hour's file ``.tmp``, fsync (``backfill.after_write_tmp``)   -> the old files, the gap (tmp removed on start)
2. rename it into place, fsync the folder (``backfill.after_rename``)      -> the old files, the gap (on start the new
                                                                              file, whose gap the index still holds
                                                                              without its stamp, is quarantined)
3. one index transaction (``backfill.after_index``)                        -> the new files, the new status
4. move the replaced files to ``superseded/`` (``backfill.after_move``)     -> the same (on start, listed files still
                                                                              in the archive are moved)

**Readiness** (:func:`candidates`): a closed ``gap`` or ``partly_backfilled`` row can be backfilled
once every hour it touches is archived, or holds no tick at all and has ended both ``archive_delay``
before now and before the hour of the stream's oldest buffer segment (so nothing of it can still
arrive or wait in a segment), and none has expired. An hour that still lives in IPC segments is never
written: the backfill waits until it is archived.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from ibstream.core.errors import DamagedDataError, InvalidRequestError, StorageError, StorageUnavailableError, shown
from ibstream.core.times import (
    FOREVER_US,
    US_PER_HOUR,
    US_PER_SECOND,
    as_micros,
    duration_us,
    hour_floor,
    iso,
    now_us,
    second_floor,
)
from ibstream.storage.archive import (
    BACKFILL_SOURCE,
    FileFacts,
    archive_relpath,
    coverage_facts,
    move_to_superseded,
    read_entry,
)
from ibstream.storage.bars import PREAGGREGATE_US, partial_table
from ibstream.storage.failpoints import failpoint
from ibstream.storage.index import BACKFILL_STATUSES, BACKFILLABLE, ArchiveEntry, CoverageInterval
from ibstream.storage.schemas import SOURCE_FIELD, SOURCES, TickType, schema_for
from ibstream.storage.segments import StreamKey, ipc_bytes, list_segments, segment_start_us, stream_dir

if TYPE_CHECKING:
    from ibstream.storage.store import Store

log = logging.getLogger(__name__)

US_PER_DAY = 24 * US_PER_HOUR
EDGE_WINDOW_US = 60 * US_PER_SECOND  # live ticks this close to a gap edge are looked at for its IB second
FALLBACK_REASON = "market_data_fallback"  # a 'recorded' span whose ticks came from reqMktData, not tick by tick


@dataclass(frozen=True)
class BackfillResult:
    """What a backfill did: ``added`` ticks put into the gap, ``duplicates`` historical ticks dropped at its
    edges (the live ticks already held them), ``files_rewritten`` archived hours replaced by a new file,
    ``hours`` every hour (µs) given a file (rewritten or new), ``replaced`` ticks of an earlier partial
    backfill of the gap that these took the place of."""

    added: int
    duplicates: int
    files_rewritten: int
    hours: list[int] = field(default_factory=list)
    replaced: int = 0


def _key(contract_id: int, tick_type: str) -> StreamKey:
    try:
        return StreamKey(int(contract_id), TickType.parse(str(tick_type)))
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def _ts(table: pa.Table, column: str = "ts") -> np.ndarray:
    return as_micros(table.column(column))


def _span(start_us: int, end_us: int | None) -> str:
    return f"[{iso(start_us)}, {'open' if end_us is None else iso(end_us)})"


# -- readiness -----------------------------------------------------------------------------------

def not_ready(store: Store, key: StreamKey, start_us: int, end_us: int, now: int) -> str | None:
    """Why [start_us, end_us) of a stream cannot be backfilled now (see the module's readiness rule), or None."""
    cid, tt = key.contract_id, key.tick_type.value
    archived = {e.hour_start_us for e in store.index.archives(cid, tt, start_us, end_us)}
    expired = {h.hour_start_us for h in store.index.expired(cid, tt, start_us, end_us)}
    buffered = [segment_start_us(p) for p in list_segments(stream_dir(store.settings.buffer_root, key))]
    horizon = now - duration_us(store.settings.archive_delay)
    if buffered:
        horizon = min(horizon, hour_floor(min(buffered)))
    for hour in range(hour_floor(start_us), end_us, US_PER_HOUR):
        if hour in expired:
            return f"hour {iso(hour)} expired by retention: its raw ticks are gone, nothing can be added to it"
        if hour not in archived and hour + US_PER_HOUR > horizon:
            return (f"hour {iso(hour)} is not archived yet (its ticks may still arrive or wait in the buffer); "
                    "backfill it once the archiver has archived it")
    return None


def candidates(store: Store, now: int | None = None) -> list[CoverageInterval]:
    """Closed ``gap`` and ``partly_backfilled`` rows that can be backfilled now, most recent first."""
    now = now_us() if now is None else now
    rows = [row for row in store.index.closed_coverage(BACKFILLABLE) if row.end_us is not None and
            not_ready(store, StreamKey(row.contract_id, TickType(row.tick_type)), row.start_us, row.end_us, now) is None]
    return sorted(rows, key=lambda row: (row.start_us, row.contract_id, row.tick_type), reverse=True)


# -- checking the request --------------------------------------------------------------------------

def _the_gap(store: Store, key: StreamKey, start_us: int, end_us: int) -> CoverageInterval:
    rows = store.index.coverage(key.contract_id, key.tick_type.value, start_us, end_us)
    for row in rows:
        if (row.start_us, row.end_us, row.is_open) == (start_us, end_us, False) and row.status in BACKFILLABLE:
            return row
    found = "; ".join(f"{r.status}/{r.reason} {_span(r.start_us, r.end_us)}" for r in rows[:4]) or "none"
    found += f"; and {len(rows) - 4} more" if len(rows) > 4 else ""
    raise InvalidRequestError(
        f"{key} {_span(start_us, end_us)} is not one closed coverage row of status gap or partly_backfilled "
        f"(coverage there: {found}); pass a row Store.backfill_candidates() lists, with its exact start "
        "and end")


def _last_second(store: Store, key: StreamKey, end_us: int) -> int:
    """The last IB second to ask for (see the module): ``floor(end - 1 µs)``, or the IB second of the first tick
    of the ``recorded`` row that starts at the gap's end if it is later. Only that row's ticks say when IB
    resumed: none are looked at when it is a market-data fallback (not IB's tick by tick), nor past its end
    (the next row's ticks may be another gap's backfill)."""
    last = second_floor(end_us - 1)
    window_end = end_us + EDGE_WINDOW_US
    row = next((r for r in store.index.coverage(key.contract_id, key.tick_type.value, end_us, window_end)
                if r.start_us == end_us), None)
    if row is None or row.status != "recorded" or row.reason == FALLBACK_REASON:
        return last
    if not row.is_open and row.end_us is not None:
        window_end = min(window_end, row.end_us)
    first = next((batch for batch in store.plan(key.contract_id, key.tick_type, end_us, window_end).batches()
                  if batch.num_rows), None)  # the rest is never decoded
    return last if first is None else max(last, second_floor(int(as_micros(first.column("ib_time"))[0])))


def seconds_of_gap(store: Store, contract_id: int, tick_type: str, start_us: int, end_us: int) -> tuple[int, int]:
    """The first and last IB second (µs) to ask IB's history for to fill the gap [start_us, end_us): see the
    module's rule on the gap's seconds."""
    return second_floor(int(start_us)), _last_second(store, _key(contract_id, tick_type), int(end_us))


def _checked_historical(key: StreamKey, historical: pa.Table, start_us: int, last_second: int) -> pa.Table:
    schema = schema_for(key.tick_type)
    if not isinstance(historical, pa.Table) or not historical.schema.remove_metadata().equals(
            schema.remove_metadata()):
        got = type(historical).__name__ if not isinstance(historical, pa.Table) else next(
            (f"field {f} where {f.name} is {schema.field(f.name)}" if f.name in schema.names else f"field {f}"
             for f in historical.schema if f.name not in schema.names or not f.equals(schema.field(f.name))),
            f"fields {historical.schema.names}")
        raise InvalidRequestError(f"historical ticks for {key} must be a pyarrow Table of schema_for("
                                  f"{key.tick_type.value!r}) ({', '.join(schema.names)}, none nullable), got "
                                  f"{shown(got, 200)}; build it with that schema")
    table = historical.replace_schema_metadata(schema.metadata).combine_chunks()
    ts, ib = _ts(table), _ts(table, "ib_time")
    first, last = second_floor(start_us), last_second
    problems = [(ts != ib, "ts differs from ib_time (pass ts == ib_time, IB's second)"),
                (ib % US_PER_SECOND != 0, "ib_time is not a whole second"),
                ((ib < first) | (ib > last), f"ib_time is outside the gap's seconds {iso(first)}..{iso(last)}")]
    for bad, what in problems:
        if bad.any():
            at = int(np.argmax(bad))
            raise InvalidRequestError(f"historical ticks for {key}: row {at} ({iso(int(ib[at]))}): {what}; pass "
                                      "what reqHistoricalTicks returned for the gap's seconds, in its order")
    if len(ib) > 1 and bool((ib[1:] < ib[:-1]).any()):
        at = int(np.argmax(ib[1:] < ib[:-1])) + 1
        raise InvalidRequestError(f"historical ticks for {key}: row {at} ({iso(int(ib[at]))}) goes back in time; "
                                  "pass them in IB's order")
    return table


# -- the edge rule -------------------------------------------------------------------------------

def _rows(table: pa.Table) -> list[dict]:
    return table.drop_columns(["ts"]).to_pylist()


def _common(ours: list[dict], theirs: list[dict]) -> int:
    count = 0
    for a, b in zip(ours, theirs):
        if a != b:
            break
        count += 1
    return count


def edge_matched(historical: pa.Table, live_before: pa.Table, live_after: pa.Table, start_us: int,
                 last_second: int) -> tuple[int, int]:
    """How many leading and trailing rows of ``historical`` the live ticks at the gap's edges already hold:
    the longest prefix of its rows of second S (the gap start's) equal to the live rows of S before the
    gap, and the longest suffix of its rows of second E (``last_second``, the last asked for) equal to the
    live rows of E after it."""
    ib = _ts(historical, "ib_time")
    second_s, second_e = second_floor(start_us), last_second
    n_s, n_e = int(np.sum(ib == second_s)), int(np.sum(ib == second_e))
    live_s = live_before.filter(pa.array(_ts(live_before, "ib_time") == second_s))
    live_e = live_after.filter(pa.array(_ts(live_after, "ib_time") == second_e))
    head = _common(_rows(live_s), _rows(historical.slice(0, n_s)))
    tail_rows = _rows(historical.slice(historical.num_rows - n_e, n_e)) if n_e else []
    tail = _common(_rows(live_e)[::-1], tail_rows[::-1])
    return head, min(tail, historical.num_rows - head)


# -- the backfill ----------------------------------------------------------------------------------

def backfill(store: Store, contract_id: int, tick_type: str, gap_start_us: int, gap_end_us: int,
             historical: pa.Table, *, status: str, reason: str = "") -> BackfillResult:
    """Fill the coverage gap [gap_start_us, gap_end_us) of a stream with IB's historical ticks (see the
    module). The caller holds the store's rewrite lock (:meth:`Store.backfill` does)."""
    if store.archiver is None or store.writer is None:
        raise StorageError("this store was opened read_only; backfill runs in the recording process (or with the "
                           "recorder stopped)")
    key = _key(contract_id, tick_type)
    start, end = int(gap_start_us), int(gap_end_us)
    if status not in BACKFILL_STATUSES:
        raise InvalidRequestError(f"backfill status was {shown(status)}; use any of {', '.join(BACKFILL_STATUSES)}")
    gap = _the_gap(store, key, start, end)
    if (problem := not_ready(store, key, start, end, now_us())) is not None:
        raise InvalidRequestError(f"{key} {_span(start, end)} cannot be backfilled yet: {problem}")
    entries = {e.hour_start_us: e for e in store.index.archives(key.contract_id, key.tick_type.value, start, end)}
    archived = {hour: _read_hour(store, key, entry) for hour, entry in entries.items()}  # archived: they hold still
    last_second = _last_second(store, key, end)
    table = _checked_historical(key, historical, start, last_second)
    if status == "unfillable" and (table.num_rows or gap.status != "gap"):
        raise InvalidRequestError(
            f"{key} {_span(start, end)}: status unfillable takes no ticks and a gap never backfilled (got "
            f"{table.num_rows} ticks, coverage {gap.status}); pass the ticks with status backfilled or "
            "partly_backfilled")
    store.writer.seal(key, hour_floor(end - 1) + US_PER_HOUR)  # no late tick can land in the hours written
    before = store.plan(key.contract_id, key.tick_type, start - EDGE_WINDOW_US, start).read_all()
    inside = store.plan(key.contract_id, key.tick_type, start, end).read_all()
    after = store.plan(key.contract_id, key.tick_type, end, end + EDGE_WINDOW_US).read_all()
    if gap.status == "gap" and inside.num_rows:
        raise StorageError(f"{key} {_span(start, end)}: coverage says nothing was recorded in this gap, but "
                           f"{inside.num_rows} ticks are stored there; nothing was changed. Check the coverage rows "
                           "before backfilling it")
    head, tail = edge_matched(table, before, after, start, last_second)
    kept = table.slice(head, table.num_rows - head - tail)
    ts_field = kept.schema.field("ts")
    clamped = np.minimum(np.maximum(_ts(kept), start), end - 1)
    kept = kept.set_column(0, ts_field, pa.array(clamped, pa.int64()).cast(ts_field.type))
    made = now_us()
    filled = CoverageInterval(key.contract_id, key.tick_type.value, status, gap.reason, start, end, False,
                              kept.num_rows, reason, made)
    try:
        written = _write_hours(store, key, gap, filled, kept, _ts(inside), entries, archived)
    except StorageUnavailableError:
        raise
    except OSError as exc:  # a full or failing disk: nothing was swapped in, the files written are gone again
        raise StorageUnavailableError(
            f"backfilling {key} {_span(start, end)}: the disk refused the hour's new file ({exc}); nothing was "
            "changed and the gap is still a gap; free space and backfill again", errno=exc.errno) from exc
    store.cache.clear()  # ticks and bars cached over these hours are stale
    result = BackfillResult(kept.num_rows, head + tail, written[0], written[1], inside.num_rows)
    log.info("backfilled %s %s (%s): %s, %d ticks added, %d already held at the edges, %d hours written (%d "
             "rewritten)", key, _span(start, end), gap.reason, status, result.added, result.duplicates,
             len(result.hours), result.files_rewritten)
    return result


def _read_hour(store: Store, key: StreamKey, entry: ArchiveEntry) -> pa.Table:
    try:
        return read_entry(store.settings.archive_root, entry)
    except (DamagedDataError, FileNotFoundError) as exc:
        what = "is missing" if isinstance(exc, FileNotFoundError) else f"cannot be read ({exc})"
        raise DamagedDataError(f"the archive file of {key} hour {iso(entry.hour_start_us)} ({entry.file_path}) {what}; "
                               "nothing was changed. Run `ibstream verify` (it quarantines the file and reports the "
                               "hour), restore it from a backup if there is one, then backfill again") from None


def _write_hours(store: Store, key: StreamKey, gap: CoverageInterval, filled: CoverageInterval, kept: pa.Table,
                 inside_ts: np.ndarray, entries: dict[int, ArchiveEntry], archived: dict[int, pa.Table]
                 ) -> tuple[int, list[int]]:
    """Steps 1-4: each hour the new ticks (or an earlier partial backfill's) fall in gets a new file holding
    its rows less the gap's, plus the new ones; one index transaction swaps them in with the coverage row.
    Returns (hours rewritten, hours written)."""
    archiver, index = store.archiver, store.index
    assert archiver is not None and filled.end_us is not None
    cid, tt, start, end, made = key.contract_id, key.tick_type.value, filled.start_us, filled.end_us, filled.backfilled_at_us
    kept_ts = _ts(kept)
    kept_hours = kept_ts - kept_ts % US_PER_HOUR
    hours = sorted({int(h) for h in kept_hours} | ({int(h) for h in inside_ts - inside_ts % US_PER_HOUR} & set(entries)))
    tables: dict[int, pa.Table] = {}
    for hour in hours:  # the hour's rows before the gap, the new ones, its rows after the gap: ts order, stably
        old = archived.get(hour, kept.schema.empty_table())
        lo, hi = np.searchsorted(_ts(old), [start, end], side="left")
        tables[hour] = pa.concat_tables([old.slice(0, lo), kept.filter(pa.array(kept_hours == hour)),
                                         old.slice(hi)]).combine_chunks()
    replaced = [entries[hour] for hour in hours if hour in entries]
    new_entries, minute_bars, paths = [], {}, []
    try:
        for hour, merged in tables.items():
            if merged.num_rows == 0:  # its only ticks were an earlier partial backfill's: the hour goes
                continue
            relpath = archive_relpath(key, hour, made)
            paths.append(store.settings.archive_root / relpath)
            ts = _ts(merged)
            rows = [filled if (r.start_us, r.end_us) == (start, end) else r
                    for r in index.coverage(cid, tt, hour, hour + US_PER_HOUR)]
            facts = FileFacts(key, hour, merged.num_rows, int(ts[0]), int(ts[-1]), archiver.contract_facts(cid),
                              coverage_facts(rows, hour, hour + US_PER_HOUR),
                              source={"kind": BACKFILL_SOURCE, "gap_start_us": start, "gap_end_us": end,
                                      "made_us": made, "status": filled.status,
                                      "ticks": int(np.sum(kept_hours == hour))})
            size = archiver.write_atomically(merged, paths[-1], facts, step="backfill")
            new_entries.append(ArchiveEntry(cid, tt, hour, int(ts[0]), int(ts[-1]), relpath, merged.num_rows, size,
                                            merged.nbytes))
            minute_bars[hour] = ipc_bytes(partial_table(merged, key.tick_type, PREAGGREGATE_US))
        days = sorted({hour - hour % US_PER_DAY for hour in hours})
        statistics = [archiver.statistics_with(key, day, new_hours={h: t for h, t in tables.items()
                                                                    if h - h % US_PER_DAY == day}) for day in days]
        index.swap_backfilled(gap, filled, replaced, new_entries, minute_bars, statistics, made or 0)
    except BaseException:
        for path in paths:  # never named by the index: no reader was given them
            path.unlink(missing_ok=True)
        raise
    failpoint("backfill.after_index")
    for relative in sorted({e.file_path for e in replaced} - index.all_archive_paths()):
        move_to_superseded(store.settings.archive_root, relative)
        failpoint("backfill.after_move")
    return len(replaced), hours


# -- provenance --------------------------------------------------------------------------------------

def provenance(store: Store, contract_id: int, tick_type: str, table: pa.Table) -> pa.Table:
    """``table`` (ticks of the stream) with a ``source`` column (:data:`~storage.schemas.SOURCE_FIELD`):
    ``backfill`` inside a ``backfilled`` / ``partly_backfilled`` coverage row, ``fallback`` inside a
    ``recorded`` row of reason ``market_data_fallback`` (an open one reaching on), else ``live``."""
    key = _key(contract_id, tick_type)
    ts = _ts(table) if table.num_rows else np.zeros(0, dtype=np.int64)
    codes = np.zeros(len(ts), dtype=np.int8)
    if len(ts):
        rows = store.index.coverage(key.contract_id, key.tick_type.value, int(ts.min()), int(ts.max()) + 1)
        marked = [(r.start_us, FOREVER_US if r.end_us is None or r.is_open else r.end_us,
                   SOURCES.index("backfill") if r.status in ("backfilled", "partly_backfilled") else
                   SOURCES.index("fallback"))
                  for r in rows if r.status in ("backfilled", "partly_backfilled") or
                  (r.status == "recorded" and r.reason == FALLBACK_REASON)]
        if marked:
            starts, ends, kinds = (np.array(column, dtype=np.int64) for column in zip(*marked))
            at = np.searchsorted(starts, ts, side="right") - 1
            inside = (at >= 0) & (ts < ends[np.maximum(at, 0)])
            codes = np.where(inside, kinds[np.maximum(at, 0)], 0).astype(np.int8)
    source = pa.array(SOURCES, pa.string()).take(pa.array(codes, pa.int8()))
    return table.append_column(SOURCE_FIELD, source)
