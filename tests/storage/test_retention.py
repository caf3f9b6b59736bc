"""Retention: raw ticks past their stream's retention leave the archive atomically and crash-safely;
their 1-minute bars (and up), statistics and coverage stay; a query for expired ticks says so."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from polars.testing import assert_frame_equal

from ibstream.core.errors import ExpiredDataError
from ibstream.core.times import to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.config import RetentionRule
from ibstream.storage.failpoints import ENV, EXIT_CODE
from ibstream.storage.synthetic import MNQ
from tests.helpers import ROOT, Served, append_in_batches, between, ibstream, ticks, utc

CID = MNQ.contract_id
T13, T15, T17 = utc(2025, 1, 10, 13), utc(2025, 1, 10, 15), utc(2025, 1, 10, 17)
PRUNE_AT = utc(2025, 1, 11, 15)  # one day after hours 13 and 14 ended: those expire under ticks_days=1
AFTER_GRACE = PRUNE_AT + timedelta(minutes=10)


def retained_settings(root: Path, **extra) -> Settings:
    return Settings(data_root=root, rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0), fsync="none",
                    flight_port=0, retention=(RetentionRule(ticks_days=1),), **extra)


@pytest.fixture
def recorded(tmp_path) -> tuple[Settings, pa.Table]:
    settings = retained_settings(tmp_path / "data")
    quotes = ticks(utc(2025, 1, 10, 13, 30), 30_000, rate_scale=0.25)  # 13:30 .. 17:15
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 10, 15, 30))  # hours 13 and 14 archived; 15 and 16 in segments
        store.index.coverage_transition(CID, "bid_ask", to_us(utc(2025, 1, 10, 13, 20)), "recorded", "subscribed")
    return settings, quotes


def bars(store: Store, start, end, resolution: str) -> pl.DataFrame:
    return pl.DataFrame(store.bars(CID, "bid_ask", to_us(start), to_us(end), resolution))


def test_rules_pick_the_most_specific():
    settings = Settings(retention=(RetentionRule(ticks_days=90), RetentionRule(tick_type="bid_ask", ticks_days=30),
                                   RetentionRule(contract_id=CID, ticks_days=60),
                                   RetentionRule(contract_id=CID, tick_type="last", ticks_days=7)))
    assert settings.ticks_days(CID, "last") == 7
    assert settings.ticks_days(CID, "bid_ask") == 60  # contract beats tick type
    assert settings.ticks_days(265598, "bid_ask") == 30
    assert settings.ticks_days(265598, "last") == 90
    assert Settings().ticks_days(CID, "last") is None  # the default keeps everything


def test_expired_ticks_say_so_and_bars_statistics_coverage_stay(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        before = {(res, s, e): bars(store, s, e, res) for res in ("1m", "5m", "1h")
                  for s, e in ((T13, T15), (utc(2025, 1, 10, 13, 30), T17), (utc(2025, 1, 10, 14, 7), T17))}
        statistics, coverage = store.statistics(CID), store.coverage(CID, "bid_ask", T13, T17)
        assert [f.name for f in sorted(settings.archive_root.rglob("*.parquet"))] == ["data.parquet"] * 2

        report = store.prune(PRUNE_AT, apply=False)  # a dry run changes nothing
        assert [e.hour_start_us for e in report.hours] == [to_us(T13), to_us(utc(2025, 1, 10, 14))]
        assert report.ticks == between(quotes, T13, T15).num_rows
        assert store.read(CID, "bid_ask", T13, T15).equals(between(quotes, T13, T15))

        report = store.prune(PRUNE_AT)
        assert report.ticks == between(quotes, T13, T15).num_rows and report.files_removed == 0  # within the grace
        with pytest.raises(ExpiredDataError, match=r"the raw ticks of 711280073/bid_ask from 2025-01-10T13:00:00Z "
                                                   r"to 2025-01-10T15:00:00Z expired \(retention: 1 days"):
            store.read(CID, "bid_ask", T13, T17)
        assert store.read(CID, "bid_ask", T15, T17).equals(between(quotes, T15, T17))
        for (resolution, start, end), expected in before.items():
            assert_frame_equal(bars(store, start, end, resolution), expected)
        with pytest.raises(ExpiredDataError):
            bars(store, T13, T15, "1s")  # sub-minute bars need the raw ticks
        with pytest.raises(ExpiredDataError, match="on whole minutes"):
            bars(store, utc(2025, 1, 10, 13, 30, 30), T15, "1m")
        assert store.statistics(CID) == statistics
        assert store.coverage(CID, "bid_ask", T13, T17).equals(coverage)

        assert store.prune(AFTER_GRACE).files_removed == 2
        assert list(settings.archive_root.rglob("*.parquet")) == []
        for (resolution, start, end), expected in before.items():
            assert_frame_equal(bars(store, start, end, resolution), expected)
    with Store(settings) as reopened:  # recovery neither resurrects nor loses anything
        assert reopened.read(CID, "bid_ask", T15, T17).equals(between(quotes, T15, T17))
        with pytest.raises(ExpiredDataError):
            reopened.read(CID, "bid_ask", T13, T15)


def test_a_server_and_our_client_say_the_ticks_expired(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        store.prune(PRUNE_AT)
        served = Served(store)
        try:
            with pytest.raises(ExpiredDataError, match="expired"):
                served.client.ticks(CID, "bid_ask", T13, T17)
            raw = flight.connect(served.location)
            from ibstream.flight_server.commands import command

            with pytest.raises(pa.ArrowKeyError, match=r"\[ibstream.expired\] the raw ticks of 711280073/bid_ask"):
                raw.get_flight_info(flight.FlightDescriptor.for_command(command(CID, "bid_ask", T13, T17)))
            raw.close()
            assert served.client.bars(CID, "bid_ask", "5m", T13, T17).height == 42  # 13:30 .. 17:00 in 5 minutes
        finally:
            served.close()


PRUNER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from datetime import timedelta
    from pathlib import Path
    from tests.storage.test_retention import retained_settings, PRUNE_AT, AFTER_GRACE
    from ibstream.storage import Store

    with Store(retained_settings(Path({data!r}), retention_grace=timedelta(0))) as store:
        store.prune(AFTER_GRACE)
""")


@pytest.mark.parametrize("point", ["prune.after_index", "prune.after_unlink"])
def test_killed_at_each_step_a_reader_then_a_recovering_store_see_every_retained_tick_once(recorded, point):
    settings, quotes = recorded
    code = PRUNER.format(root=str(ROOT), data=str(settings.data_root))
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: point}, cwd=ROOT, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == EXIT_CODE, killed.stderr
    with Store(settings, read_only=True) as reader:
        assert reader.read(CID, "bid_ask", T15, T17).equals(between(quotes, T15, T17))
        with pytest.raises(ExpiredDataError):
            reader.read(CID, "bid_ask", T13, T15)
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert list(settings.archive_root.rglob("*.parquet")) == []
    with Store(settings) as store:
        assert store.read(CID, "bid_ask", T15, T17).equals(between(quotes, T15, T17))
        assert [h.file_removed for h in store.index.expired()] == [True, True]


def test_status_and_prune_as_an_operator_runs_them(recorded):
    settings, quotes = recorded
    root = str(settings.data_root)
    shown = ibstream("status", "--data-root", root)
    assert shown.returncode == 0, shown.stderr
    assert f"{root}: 1 streams, {quotes.num_rows:,} ticks;" in shown.stdout
    assert "711280073/bid_ask: recording; last tick 2025-01-10T17:15:47.124196Z (" in shown.stdout
    assert "archived to 2025-01-10T15:00Z" in shown.stdout and "kept for ever" in shown.stdout
    retention = '[{"ticks_days": 1}]'
    expiring = between(quotes, T13, T15).num_rows
    dry = ibstream("prune", "--data-root", root, IBSTREAM_RETENTION=retention)
    assert dry.returncode == 0, dry.stderr
    assert f"would expire 2 hours ({expiring:,} ticks" in dry.stdout and "run with --apply" in dry.stdout
    assert "711280073/bid_ask: 2 hours 2025-01-10T13:00Z .. 2025-01-10T15:00Z" in dry.stdout
    applied = ibstream("prune", "--data-root", root, "--apply", IBSTREAM_RETENTION=retention)
    assert applied.returncode == 0, applied.stderr
    assert f"expired 2 hours ({expiring:,} ticks" in applied.stdout
    after = ibstream("status", "--data-root", root, IBSTREAM_RETENTION=retention)
    assert "ticks kept 1 days, expired before 2025-01-10T15:00Z" in after.stdout, after.stdout
    with Store(settings, read_only=True) as store, pytest.raises(ExpiredDataError):
        store.read(CID, "bid_ask", T13, T15)
