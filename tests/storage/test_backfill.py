"""Backfill: the ticks of a coverage gap, fetched from IB afterwards, go into the archive exactly once (edge
rule at both ends, identical ticks inside a second kept), atomically at every kill point, with provenance."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from ibstream.core.errors import DamagedDataError, InvalidRequestError, StorageUnavailableError
from ibstream.core.times import US_PER_HOUR, US_PER_SECOND, to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.archive import archive_files
from ibstream.storage.failpoints import ENV, EXIT_CODE, io_faults
from ibstream.storage.index import CoverageInterval
from ibstream.storage.maintenance import reindex
from ibstream.storage.schemas import SOURCE_FIELD
from ibstream.storage.synthetic import MNQ
from tests.helpers import ROOT, append_in_batches, ticks, utc

CID = MNQ.contract_id
EVERYTHING = (utc(2025, 1, 1), utc(2025, 2, 1))
FIRST = utc(2025, 1, 10, 22)  # ticks from 22:00 on day 10 to about 02:40 on day 11
ARCHIVE_AT = utc(2025, 1, 12)


def settings_at(root: Path, **extra) -> Settings:
    return Settings(**{"data_root": root, "rotation_interval": timedelta(minutes=15), "archive_delay": timedelta(0),
                       "fsync": "none", "flight_port": 0} | extra)


def truth() -> pa.Table:
    """What the market printed (IB's seconds whole and in order), with identical ticks at the gap edges."""
    table = ticks(FIRST, 20_000, rate_scale=0.08)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    ib_time = table.schema.field("ib_time")
    table = table.set_column(1, ib_time, pa.array(ts - ts % US_PER_SECOND).cast(ib_time.type))
    return table


def ts_of(table: pa.Table) -> np.ndarray:
    return table.column("ts").cast(pa.int64()).to_numpy()


def twin_edges(table: pa.Table, near_us: int) -> tuple[pa.Table, int]:
    """The first pair of ticks in one second from ``near_us`` on made identical (all but ts); returns the table
    and a cut between them (the gap edge: the first is before it, the second after)."""
    ts = ts_of(table)
    seconds = ts - ts % US_PER_SECOND
    i = int(np.searchsorted(ts, near_us))
    while seconds[i] != seconds[i + 1] or ts[i] == ts[i + 1]:
        i += 1
    order = np.arange(table.num_rows)
    order[i + 1] = i
    twinned = table.take(pa.array(order)).set_column(0, table.schema.field("ts"), table.column("ts"))
    return twinned, int(ts[i]) + 1


def scenario(gap_from, gap_to) -> tuple[pa.Table, int, int]:
    """The market, and a gap [g0, g1) near ``gap_from`` .. ``gap_to`` with twin ticks across both edges."""
    market, g0 = twin_edges(truth(), to_us(gap_from))
    market, g1 = twin_edges(market, to_us(gap_to))
    return market, g0, g1


def outside(table: pa.Table, g0: int, g1: int) -> pa.Table:
    ts = ts_of(table)
    return table.filter(pa.array((ts < g0) | (ts >= g1)))


def from_ib(market: pa.Table, g0: int, g1: int) -> pa.Table:
    """What reqHistoricalTicks returns for the gap's seconds: IB's ticks of those seconds, ts = ib_time."""
    ib = market.column("ib_time").cast(pa.int64()).to_numpy()
    rows = market.filter(pa.array((ib >= g0 - g0 % US_PER_SECOND) & (ib <= g1 - g1 % US_PER_SECOND)))
    return rows.set_column(0, rows.schema.field("ts"), rows.column("ib_time"))


def merged(market: pa.Table, g0: int, g1: int) -> pa.Table:
    """What the store should hold after the backfill: the live ticks, and the lost ones at their IB second
    clamped into the gap."""
    ts, ib = ts_of(market), market.column("ib_time").cast(pa.int64()).to_numpy()
    lost = (ts >= g0) & (ts < g1)
    at = np.where(lost, np.clip(ib, g0, g1 - 1), ts)
    return market.set_column(0, market.schema.field("ts"), pa.array(at).cast(market.schema.field("ts").type))


def record(settings: Settings, market: pa.Table, g0: int, g1: int, *, archive: bool = True,
           resumed: int | None = None) -> None:
    """Record ``market`` the way the recorder does, losing [g0, g1) to a disconnect (and up to ``resumed``, when
    IB started sending again only then)."""
    with Store(settings) as store:
        store.index.coverage_transition(CID, "bid_ask", to_us(FIRST), "recorded", "subscribed")
        store.index.coverage_transition(CID, "bid_ask", g0, "gap", "disconnected")
        store.index.coverage_transition(CID, "bid_ask", g1, "recorded", "subscribed")
        append_in_batches(store, outside(market, g0, resumed or g1))
        if archive:
            store.archive(now=ARCHIVE_AT)


def coverage(store: Store) -> list[tuple]:
    return [(r["status"], r["reason"], to_us(r["start"]), r["backfilled_ticks"], r["backfill_note"])
            for r in store.coverage(CID, "bid_ask", *EVERYTHING).to_pylist()]


def reference(tmp_path: Path, table: pa.Table) -> dict:
    """Statistics and bars of a store that simply recorded ``table``."""
    with Store(settings_at(tmp_path / "reference")) as store:
        append_in_batches(store, table)
        store.archive(now=ARCHIVE_AT)
        return derived(store)


def derived(store: Store) -> dict:
    span = to_us(EVERYTHING[0]), to_us(EVERYTHING[1])
    return {"statistics": store.statistics(CID, "bid_ask"), "bars_1m": store.bars(CID, "bid_ask", *span, "1m"),
            "bars_1h": store.bars(CID, "bid_ask", *span, "1h"), "hour_bars": store.index.hour_bars(CID, "bid_ask", *span)}


def files(settings: Settings) -> list[str]:
    return [p.relative_to(settings.archive_root).as_posix() for p in archive_files(settings.archive_root)]


# -- one archived hour ----------------------------------------------------------------------------

@pytest.fixture
def one_hour(tmp_path) -> tuple[Settings, pa.Table, int, int]:
    settings = settings_at(tmp_path / "data")
    market, g0, g1 = scenario(utc(2025, 1, 10, 22, 20), utc(2025, 1, 10, 22, 25))
    record(settings, market, g0, g1)
    return settings, market, g0, g1


def test_a_gap_inside_one_archived_hour_is_filled_exactly_and_the_hour_rewritten(one_hour, tmp_path):
    settings, market, g0, g1 = one_hour
    historical = from_ib(market, g0, g1)
    lost = market.num_rows - outside(market, g0, g1).num_rows
    with Store(settings) as store:
        old = store.index.archives(CID, "bid_ask", g0, g1)
        assert [e.file_path for e in old] == ["tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour=22/"
                                              "data.parquet"]
        assert store.backfill_candidates(to_us(ARCHIVE_AT))[0].start_us == g0
        result = store.backfill(CID, "bid_ask", g0, g1, historical, status="backfilled")
        assert (result.added, result.files_rewritten, result.hours, result.replaced) == (
            lost, 1, [to_us(utc(2025, 1, 10, 22))], 0)
        assert result.added + result.duplicates == historical.num_rows
        assert (lost, result.duplicates) == (121, 2)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
        (entry,) = store.index.archives(CID, "bid_ask", g0, g1)
        assert entry.file_path.startswith("tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour=22/data-")
        assert coverage(store) == [("recorded", "subscribed", to_us(FIRST), None, None),
                                   ("backfilled", "disconnected", g0, lost, ""),
                                   ("recorded", "subscribed", g1, None, None)]
        assert store.backfill_candidates(to_us(ARCHIVE_AT)) == []
        after = derived(store)
        with pytest.raises(InvalidRequestError) as refused:  # a repeat: refused, nothing added
            store.backfill(CID, "bid_ask", g0, g1, historical, status="backfilled")
        assert "is not one closed coverage row of status gap or partly_backfilled" in str(refused.value)
        assert "backfilled/disconnected" in str(refused.value)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
    assert after == reference(tmp_path, merged(market, g0, g1))  # statistics, bars and pre-aggregates recomputed
    superseded = sorted(p.relative_to(settings.data_root).as_posix()
                        for p in (settings.data_root / "superseded").rglob("*.parquet"))
    assert superseded == [f"superseded/{old[0].file_path}"]  # the replaced file, kept for the grace period


def test_the_edge_rule_keeps_identical_ticks_inside_a_second(one_hour):
    settings, market, g0, g1 = one_hour
    ts = ts_of(market)
    i, j = int(np.searchsorted(ts, g0)), int(np.searchsorted(ts, g1))
    twins = market.drop_columns(["ts"]).take(pa.array([i - 1, i, j - 1, j])).to_pylist()
    assert twins[0] == twins[1] and twins[2] == twins[3]  # the last live and first lost tick are identical; so at E
    with Store(settings) as store:
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        served = store.read(CID, "bid_ask", *EVERYTHING)
        assert served.num_rows == market.num_rows  # the lost twin at each edge is back; only the live ones dropped
        assert served.drop_columns(["ts"]).equals(market.drop_columns(["ts"]))
        assert (ts_of(served)[i], ts_of(served)[j - 1]) == (g0, (g1 - 1) - (g1 - 1) % US_PER_SECOND)  # clamped


def test_ticks_between_the_request_and_ibs_start_are_fetched_up_to_the_first_live_tick(tmp_path):
    """The recorder resubscribed at g1 (the gap's end), but IB started sending two seconds' edges later: the
    ticks in between reached no one. The gap's seconds run to the first live tick's; its second is matched
    at the edge, the seconds before it are added (clamped into the gap)."""
    settings = settings_at(tmp_path / "data")
    market, g0, g1 = scenario(utc(2025, 1, 10, 22, 20), utc(2025, 1, 10, 22, 25))
    ts, ib = ts_of(market), market.column("ib_time").cast(pa.int64()).to_numpy()
    resumed = int(ts[np.searchsorted(ts, g1 + 2 * US_PER_SECOND)])  # IB's first tick after the request
    record(settings, market, g0, g1, resumed=resumed)
    lost = (ts >= g0) & (ts < resumed)
    with Store(settings) as store:
        first, last = store.gap_seconds(CID, "bid_ask", g0, g1)
        assert (first, last) == (g0 - g0 % US_PER_SECOND, resumed - resumed % US_PER_SECOND)
        historical = from_ib(market, first, last)
        with pytest.raises(InvalidRequestError, match="ib_time is outside the gap's seconds"):  # one second more
            store.backfill(CID, "bid_ask", g0, g1, from_ib(market, first, int(ib[ib > last][0])), status="backfilled")
        result = store.backfill(CID, "bid_ask", g0, g1, historical, status="backfilled")
        assert (result.added, result.added + result.duplicates) == (int(lost.sum()), historical.num_rows)
        served = store.read(CID, "bid_ask", *EVERYTHING)
        assert served.drop_columns(["ts"]).equals(market.drop_columns(["ts"]))  # nothing lost, nothing twice
        assert ts_of(served).tolist() == np.where(lost, np.clip(ib, g0, g1 - 1), ts).tolist()


@pytest.mark.parametrize("order", ["earlier first", "later first"])
def test_two_gaps_around_a_span_without_ticks_fill_the_same_either_way(tmp_path, order):
    """A reconnect flap: gap A, a recorded span IB sent nothing in, gap B, then live ticks. A's seconds do
    not stretch over B (only ticks of the span after A say when IB resumed): nothing is stored twice, in
    either order; the ticks of the silent span's inner seconds are lost to both (IB sent them to no one)."""
    settings = settings_at(tmp_path / "data")
    market = truth()
    ts = ts_of(market)
    a0 = int(ts[np.searchsorted(ts, to_us(utc(2025, 1, 10, 22, 20)))]) + 1
    a1, b0 = a0 + 3_300_000, a0 + 33_300_000
    b1 = b0 + 3_300_000
    with Store(settings) as store:
        for at, status, reason in ((to_us(FIRST), "recorded", "subscribed"), (a0, "gap", "disconnected"),
                                   (a1, "recorded", "subscribed"), (b0, "gap", "disconnected"),
                                   (b1, "recorded", "subscribed")):
            store.index.coverage_transition(CID, "bid_ask", at, status, reason)
        append_in_batches(store, outside(market, a0, b1))
        store.archive(now=ARCHIVE_AT)
        gaps = [(a0, a1), (b0, b1)] if order == "earlier first" else [(b0, b1), (a0, a1)]
        for start, end in gaps:
            first, last = store.gap_seconds(CID, "bid_ask", start, end)
            store.backfill(CID, "bid_ask", start, end, from_ib(market, first, last), status="backfilled")
        assert store.gap_seconds(CID, "bid_ask", a0, a1)[1] == (a1 - 1) - (a1 - 1) % US_PER_SECOND
        seconds = ts - ts % US_PER_SECOND
        silent = (ts >= a1) & (ts < b0) & (seconds > (a1 - 1) - (a1 - 1) % US_PER_SECOND) & (seconds < b0 - b0 % US_PER_SECOND)
        assert silent.sum() > 0
        served = store.read(CID, "bid_ask", *EVERYTHING)
        assert served.drop_columns(["ts"]).equals(market.filter(pa.array(~silent)).drop_columns(["ts"]))


def test_provenance_marks_backfilled_and_fallback_rows(one_hour):
    settings, market, g0, g1 = one_hour
    with Store(settings) as store:
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        fallback = (to_us(utc(2025, 1, 11, 1)), to_us(utc(2025, 1, 11, 1, 10)))
        store.index.add_coverage([CoverageInterval(CID, "bid_ask", "recorded", "market_data_fallback", *fallback, False)])
        table = store.read(CID, "bid_ask", *EVERYTHING)
        marked = store.provenance(CID, "bid_ask", table)
        assert marked.schema.field("source") == SOURCE_FIELD
        assert marked.drop_columns(["source"]).equals(table)
        ts = ts_of(table)
        expected = np.where((ts >= g0) & (ts < g1), "backfill",
                            np.where((ts >= fallback[0]) & (ts < fallback[1]), "fallback", "live"))
        assert marked.column("source").cast(pa.string()).to_pylist() == expected.tolist()
        counts = pc.value_counts(marked.column("source")).to_pylist()
        assert sorted((c["values"], c["counts"]) for c in counts) == [("backfill", 121), ("fallback", 238),
                                                                        ("live", 19_641)]
        empty = store.provenance(CID, "bid_ask", table.schema.empty_table())
        assert empty.num_rows == 0 and empty.schema.field("source") == SOURCE_FIELD


# -- across hours, a day boundary, a compacted day, an hour without a file -----------------------------

@pytest.mark.parametrize("compacted", [False, True])
def test_a_gap_across_two_hours_and_a_day_boundary(tmp_path, compacted):
    settings = settings_at(tmp_path / "data", archive_url=str(tmp_path / "bucket"))
    market, g0, g1 = scenario(utc(2025, 1, 10, 23, 50), utc(2025, 1, 11, 0, 12))
    record(settings, market, g0, g1)
    hours = [to_us(utc(2025, 1, 10, 23)), to_us(utc(2025, 1, 11, 0))]
    with Store(settings) as store:
        if compacted:
            assert store.compact(utc(2025, 1, 13)).files_written == 2
        store.publish(utc(2025, 1, 12, 1))
        before = {e.hour_start_us: e.file_path for e in store.index.archives(CID, "bid_ask", hours[0], hours[1] + 1)}
        result = store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        assert (result.files_rewritten, result.hours) == (2, hours)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
        after = {e.hour_start_us: e.file_path for e in store.index.archives(CID, "bid_ask", hours[0], hours[1] + 1)}
        assert all("/data-" in after[h] and after[h] != before[h] for h in hours)
        day_files = [f for f in files(settings) if "hour=all" in f]
        assert len(day_files) == (2 if compacted else 0)  # they still answer the other hours: not superseded
        published = store.publish(utc(2025, 1, 12, 2))
        assert published.uploaded == 2  # the two new files, under content-addressed keys
        uploaded = store.index.published_files()
        assert set(uploaded) == store.index.all_archive_paths()  # the replaced files left the publication
        assert set(after.values()) <= set(uploaded) and (compacted or not set(before.values()) & set(uploaded))
        derived_after = derived(store)
        replica_sees(tmp_path / "reader", tmp_path / "bucket", merged(market, g0, g1), derived_after["bars_1m"])
        if compacted:  # the day files take the rewritten hours back
            assert store.compact(utc(2025, 1, 13)).files_written == 2  # at the same `now`: new day files beside
            assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
            store.compact(utc(2025, 1, 14))  # the replaced files deleted (retention_grace past)
            assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
            assert store.scrub(50) == []
            assert derived(store) == derived_after
            store.publish(utc(2025, 1, 12, 3))
    assert derived_after == reference(tmp_path, merged(market, g0, g1))


def replica_sees(root: Path, bucket: Path, expected: pa.Table, bars_1m: pa.Table) -> None:
    """A read server of the publication serves the new files and their pre-aggregates (not a day file's stale ones)."""
    with Store(settings_at(root, archive_url=str(bucket), replica=True), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(expected)
        assert replica.bars(CID, "bid_ask", to_us(EVERYTHING[0]), to_us(EVERYTHING[1]), "1m").equals(bars_1m)


def test_a_gap_covering_an_hour_without_a_file_gives_it_one(tmp_path):
    settings = settings_at(tmp_path / "data")
    market, g0, g1 = scenario(utc(2025, 1, 11, 0, 50), utc(2025, 1, 11, 2, 5))
    record(settings, market, g0, g1)
    with Store(settings) as store:
        hour_1 = to_us(utc(2025, 1, 11, 1))
        assert not store.index.archives(CID, "bid_ask", hour_1, hour_1 + 1)
        result = store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        assert (result.files_rewritten, result.hours) == (2, [hour_1 - US_PER_HOUR, hour_1, hour_1 + US_PER_HOUR])
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
        (entry,) = store.index.archives(CID, "bid_ask", hour_1, hour_1 + 1)
        assert "date=2025-01-11/hour=01/data-" in entry.file_path
        assert entry.tick_count == 1898
        derived_after = derived(store)
    assert derived_after == reference(tmp_path, merged(market, g0, g1))
    with Store(settings) as store:  # a restart adopts nothing, quarantines nothing
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
    assert not (settings.data_root / "quarantine").exists()


# -- partly, unfillable, settings, readiness, bad input, damage -----------------------------------------

def test_partly_backfilled_is_retried_without_duplicates(one_hour, tmp_path):
    settings, market, g0, g1 = one_hour
    historical = from_ib(market, g0, g1)
    with Store(settings) as store:
        first = store.backfill(CID, "bid_ask", g0, g1, historical.slice(0, 100), status="partly_backfilled",
                               reason="IB returned 100 of the gap's ticks")
        assert (first.added, first.duplicates) == (99, 1)
        assert coverage(store)[1] == ("partly_backfilled", "disconnected", g0, 99, "IB returned 100 of the gap's ticks")
        assert [r.start_us for r in store.backfill_candidates(to_us(ARCHIVE_AT))] == [g0]  # to retry
        again = store.backfill(CID, "bid_ask", g0, g1, historical, status="backfilled")
        assert (again.added, again.duplicates, again.replaced) == (121, 2, 99)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
        assert coverage(store)[1] == ("backfilled", "disconnected", g0, 121, "")
        derived_after = derived(store)
    assert derived_after == reference(tmp_path, merged(market, g0, g1))


def test_an_unfillable_gap_keeps_its_files_and_says_why(one_hour):
    settings, market, g0, g1 = one_hour
    empty = from_ib(market, g0, g1).slice(0, 0)
    with Store(settings) as store:
        before = store.read(CID, "bid_ask", *EVERYTHING)
        with pytest.raises(InvalidRequestError, match="status unfillable takes no ticks"):
            store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="unfillable")
        result = store.backfill(CID, "bid_ask", g0, g1, empty, status="unfillable", reason="no market data permissions")
        assert (result.added, result.duplicates, result.files_rewritten, result.hours) == (0, 0, 0, [])
        assert coverage(store)[1] == ("unfillable", "disconnected", g0, 0, "no market data permissions")
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(before)
        assert store.backfill_candidates(to_us(ARCHIVE_AT)) == []  # not retried


def test_bad_requests_are_refused_with_one_clear_message(one_hour):
    settings, market, g0, g1 = one_hour
    historical = from_ib(market, g0, g1)
    with Store(settings) as store:
        cases = [
            (dict(status="done"), "backfill status was 'done'; use any of backfilled, partly_backfilled, unfillable"),
            (dict(gap_end_us=g1 + 1), "is not one closed coverage row of status gap or partly_backfilled (coverage "
                                      "there: gap/disconnected [2025-01-10T22:20:28.050159Z, 2025-01-10T22:25:33."
                                      "204207Z); recorded/subscribed [2025-01-10T22:25:33.204207Z, "),
            (dict(tick_type="quotes"), "tick_type was 'quotes'; use any of"),
            (dict(historical=historical.drop_columns(["bid_past_low"])), "must be a pyarrow Table of schema_for("),
            (dict(historical=historical.set_column(0, historical.schema.field("ts"), market.column("ts").slice(
                0, historical.num_rows))), "ts differs from ib_time"),
            (dict(historical=from_ib(market, g0 - 10 * US_PER_SECOND, g1)), "ib_time is outside the gap's seconds"),
            (dict(historical=historical.take(pa.array(range(historical.num_rows - 1, -1, -1)))), "goes back in time"),
        ]
        for change, message in cases:
            call = dict(contract_id=CID, tick_type="bid_ask", gap_start_us=g0, gap_end_us=g1, historical=historical,
                        status="backfilled") | change
            with pytest.raises(InvalidRequestError) as refused:
                store.backfill(**call)
            assert message in str(refused.value), (change.keys(), str(refused.value))
        assert coverage(store)[1][0] == "gap"
        assert len(files(settings)) == 9 and not [f for f in files(settings) if "/data-" in f]


def test_an_hour_still_in_the_buffer_waits_until_it_is_archived(tmp_path):
    settings = settings_at(tmp_path / "data")
    market, g0, g1 = scenario(utc(2025, 1, 11, 0, 50), utc(2025, 1, 11, 1, 5))
    record(settings, market, g0, g1, archive=False)
    with Store(settings) as store:
        assert store.backfill_candidates(to_us(ARCHIVE_AT)) == []
        with pytest.raises(InvalidRequestError, match="hour 2025-01-11T00:00:00Z is not archived yet"):
            store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        store.archive(now=utc(2025, 1, 11, 1))  # hour 00 archived, 01 still buffered
        assert store.backfill_candidates(to_us(ARCHIVE_AT)) == []
        store.archive(now=ARCHIVE_AT)
        assert [r.start_us for r in store.backfill_candidates(to_us(ARCHIVE_AT))] == [g0]
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))


@pytest.mark.parametrize("fault", ["missing", "damaged"])
def test_a_missing_or_damaged_archive_file_stops_the_backfill_and_loses_nothing(one_hour, fault):
    settings, market, g0, g1 = one_hour
    with Store(settings) as store:
        (entry,) = store.index.archives(CID, "bid_ask", g0, g1)
        path = settings.archive_root / entry.file_path
        if fault == "missing":
            path.unlink()
        else:
            with open(path, "r+b") as handle:
                handle.seek(path.stat().st_size // 3)
                handle.write(b"\x00" * 64)
        with pytest.raises(DamagedDataError) as stopped:
            store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        message = str(stopped.value)
        assert message.startswith("the archive file of 711280073/bid_ask hour 2025-01-10T22:00:00Z "
                                  f"({entry.file_path}) " + ("is missing" if fault == "missing" else "cannot be read"))
        assert message.endswith("nothing was changed. Run `ibstream verify` (it quarantines the file and reports the "
                                "hour), restore it from a backup if there is one, then backfill again")
        assert coverage(store)[1][0] == "gap"
        assert store.index.archives(CID, "bid_ask", g0, g1) == [entry]
        assert not [f for f in files(settings) if "/data-" in f] and not list(settings.archive_root.rglob("*.tmp"))


def test_an_index_of_version_4_takes_the_new_statuses(one_hour):
    settings, market, g0, g1 = one_hour
    with sqlite3.connect(settings.index_path) as conn:  # coverage as ibstream before backfill wrote it
        conn.execute("ALTER TABLE coverage RENAME TO coverage_new")
        conn.execute("CREATE TABLE coverage (id INTEGER PRIMARY KEY, contract_id INTEGER NOT NULL, tick_type TEXT "
                     "NOT NULL, status TEXT NOT NULL CHECK (status IN ('recorded', 'gap', 'unknown')), reason TEXT "
                     "NOT NULL, start_us INTEGER NOT NULL, end_us INTEGER, is_open INTEGER NOT NULL)")
        conn.execute("INSERT INTO coverage SELECT id, contract_id, tick_type, status, reason, start_us, end_us, is_open "
                     "FROM coverage_new")
        conn.execute("DROP TABLE coverage_new")
        conn.execute("PRAGMA user_version = 4")
    conn.close()
    with Store(settings) as store:
        assert [row[:3] for row in coverage(store)] == [("recorded", "subscribed", to_us(FIRST)),
                                                        ("gap", "disconnected", g0), ("recorded", "subscribed", g1)]
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        assert coverage(store)[1] == ("backfilled", "disconnected", g0, 121, "")


# -- a kill at each step ---------------------------------------------------------------------------

BACKFILLER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from tests.storage.test_backfill import CID, KILL_GAP, from_ib, scenario, settings_at
    from ibstream.storage import Store

    market, g0, g1 = scenario(*KILL_GAP)
    with Store(settings_at(Path({data!r}))) as store:
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
""")
KILL_GAP = (utc(2025, 1, 10, 23, 50), utc(2025, 1, 11, 0, 12))  # two hours: two files, two moves


@pytest.mark.parametrize("point", ["backfill.after_write_tmp", "backfill.after_rename", "backfill.after_index",
                                   "backfill.after_move"])
def test_killed_at_each_step_the_store_shows_either_state_and_a_retry_completes(tmp_path, point):
    settings = settings_at(tmp_path / "data")
    market, g0, g1 = scenario(*KILL_GAP)
    record(settings, market, g0, g1)
    live, filled = outside(market, g0, g1), merged(market, g0, g1)
    code = BACKFILLER.format(root=str(ROOT), data=str(settings.data_root))
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: point}, cwd=ROOT, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == EXIT_CODE, killed.stderr
    swapped = point in ("backfill.after_index", "backfill.after_move")
    for read_only in (True, False):  # what a read server sees (no recovery), then a recovering writable store
        with Store(settings, read_only=read_only) as store:
            assert store.read(CID, "bid_ask", *EVERYTHING).equals(filled if swapped else live)
            assert coverage(store)[1][0] == ("backfilled" if swapped else "gap")
    quarantined = sorted(p.name for p in (settings.data_root / "quarantine").rglob("*.parquet"))
    assert len(quarantined) == (1 if point == "backfill.after_rename" else 0)  # the unpublished new file, set aside
    assert not list(settings.archive_root.rglob("*.tmp"))
    retried = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    if swapped:
        assert retried.returncode == 1 and "is not one closed coverage row" in retried.stderr
    else:
        assert retried.returncode == 0, retried.stderr
    with Store(settings) as store:
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(filled)  # every tick once
        assert coverage(store)[1][:4] == ("backfilled", "disconnected", g0, 493)
        assert len([f for f in files(settings) if "/data-" in f]) == 2
        assert len(list((settings.data_root / "superseded").rglob("*.parquet"))) == 2
        assert not list(settings.archive_root.rglob("*.tmp"))


def test_settings_changed_since_recording_apply_to_the_rewritten_files_only(one_hour):
    settings, market, g0, g1 = one_hour
    changed = settings_at(settings.data_root, parquet_compression="snappy", archive_delay=timedelta(days=400))
    with Store(changed) as store:
        assert [r.start_us for r in store.backfill_candidates(to_us(ARCHIVE_AT))] == [g0]  # every hour archived
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
        (entry,) = store.index.archives(CID, "bid_ask", g0, g1)
        codecs = {pq.ParquetFile(settings.archive_root / f).metadata.row_group(0).column(2).compression
                  for f in files(settings)}
        assert codecs == {"ZSTD", "SNAPPY"}  # the rewritten hour in the new codec, the others as written
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
        assert store.scrub(20) == []  # every file checks against the index


def test_a_full_disk_during_the_rewrite_changes_nothing_and_a_retry_fills_the_gap(one_hour):
    settings, market, g0, g1 = one_hour
    historical = from_ib(market, g0, g1)
    with Store(settings) as store:
        before_files, before = files(settings), store.read(CID, "bid_ask", *EVERYTHING)
        io_faults.arm("archive.write", errno.ENOSPC)
        try:
            with pytest.raises(StorageUnavailableError) as full:
                store.backfill(CID, "bid_ask", g0, g1, historical, status="backfilled")
        finally:
            io_faults.disarm()
        assert full.value.errno == errno.ENOSPC
        assert str(full.value).startswith(f"backfilling {CID}/bid_ask ") and str(full.value).endswith(
            "nothing was changed and the gap is still a gap; free space and backfill again")
        assert files(settings) == before_files and not list(settings.archive_root.rglob("*.tmp"))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(before)
        assert [row[0] for row in coverage(store)] == ["recorded", "gap", "recorded"]
        result = store.backfill(CID, "bid_ask", g0, g1, historical, status="backfilled")  # room again
        assert result.added == 121
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))


@pytest.mark.parametrize("rebuild", ["adopted on open", "ibstream reindex"])
def test_a_lost_index_gets_the_backfilled_gap_back_from_the_files(tmp_path, rebuild):
    """A gap backfilled over three hours: each rewritten file says what the backfill did, so a lost index comes
    back with the gap's one row, its status, ticks added, note and time (provenance then marks the same rows)."""
    settings = settings_at(tmp_path / "data")
    market, g0, g1 = scenario(utc(2025, 1, 11, 0, 50), utc(2025, 1, 11, 2, 5))
    record(settings, market, g0, g1)
    with Store(settings) as store:
        store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="partly_backfilled",
                       reason="IB returned part of the gap")
        before = store.coverage(CID, "bid_ask", *EVERYTHING).to_pylist()
        sources = store.provenance(CID, "bid_ask", store.read(CID, "bid_ask", *EVERYTHING))[SOURCE_FIELD.name]
    for path in settings.data_root.glob("index.sqlite*"):
        path.unlink()
    if rebuild == "ibstream reindex":
        reindex(settings)
    with Store(settings) as store:
        after = store.coverage(CID, "bid_ask", *EVERYTHING).to_pylist()
        assert after[:2] == before[:2]  # recorded from 22:00 (one row again, from three hours' files), the gap
        assert after[1]["status"] == "partly_backfilled" and after[1]["backfill_note"] == "IB returned part of the gap"
        assert after[1]["backfilled_ticks"] == before[1]["backfilled_ticks"] > 0
        assert [(r["status"], r["start"]) for r in after[2:]] == [("recorded", before[2]["start"])]  # closed now
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(merged(market, g0, g1))
        assert store.provenance(CID, "bid_ask", store.read(CID, "bid_ask", *EVERYTHING))[SOURCE_FIELD.name].equals(
            sources)
