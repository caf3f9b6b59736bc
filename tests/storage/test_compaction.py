"""Compaction: closed days of hourly files become one file per stream and day, swapped in atomically;
every tick is served exactly once before, during and after, at every crash point."""

from __future__ import annotations

import errno
import os
import random
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ibstream.core.errors import ExpiredDataError
from ibstream.core.times import to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.archive import archive_files
from ibstream.storage.config import RetentionRule
from ibstream.storage.failpoints import ENV, EXIT_CODE, io_faults
from ibstream.storage.maintenance import reindex
from ibstream.storage.synthetic import MNQ
from tests.helpers import ROOT, append_in_batches, between, fill, ibstream, ticks, utc

CID = MNQ.contract_id
FIRST, END = utc(2025, 1, 10, 20), utc(2025, 1, 11, 9)  # 20:00 .. ~08:30: 4 hours of day 10, 9 of day 11
COMPACT_AT = utc(2025, 1, 12, 2)  # both days ended more than compact_delay (1 h) ago
EVERYTHING = (utc(2025, 1, 1), utc(2025, 2, 1))


def compact_settings(root: Path, **extra) -> Settings:
    return Settings(data_root=root, rotation_interval=timedelta(minutes=15), archive_delay=timedelta(0), fsync="none",
                    flight_port=0, **extra)


@pytest.fixture
def recorded(tmp_path) -> tuple[Settings, pa.Table]:
    settings = compact_settings(tmp_path / "data")
    quotes = ticks(FIRST, 40_000, rate_scale=0.1)
    with Store(settings) as store:
        store.index.coverage_transition(CID, "bid_ask", to_us(FIRST), "recorded", "subscribed")
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 12))
    return settings, quotes


def day_files(settings: Settings) -> list[str]:
    return [p.relative_to(settings.archive_root).as_posix() for p in archive_files(settings.archive_root)]


def snapshot(store: Store) -> dict:
    return {"bars_1m": store.bars(CID, "bid_ask", to_us(FIRST), to_us(END), "1m"),
            "bars_1h": store.bars(CID, "bid_ask", to_us(FIRST), to_us(END), "1h"),
            "statistics": store.statistics(CID, "bid_ask")}


def test_a_closed_day_becomes_one_file_with_row_groups_per_hour_and_answers_the_same(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        hourly = day_files(settings)
        before = snapshot(store)
        assert len(hourly) == 13
        dry = store.compact(COMPACT_AT, apply=False)
        assert [(d.files, d.ticks) for d in dry.days] == [(4, between(quotes, FIRST, utc(2025, 1, 11)).num_rows),
                                                          (9, between(quotes, utc(2025, 1, 11), END).num_rows)]
        assert day_files(settings) == hourly  # a dry run changes nothing
        report = store.compact(COMPACT_AT)
        assert (report.files_before, report.files_written, report.ticks) == (13, 2, quotes.num_rows)
        days = day_files(settings)
        assert [Path(d).parent.name for d in days] == ["hour=all", "hour=all"]
        assert days[0].startswith("tick_type=bid_ask/contract_id=711280073/date=2025-01-10/")
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        rng = random.Random(3)
        ts = quotes.column("ts").cast(pa.int64()).to_pylist()
        for _ in range(40):  # ranges inside an hour, across hours and across the day boundary
            lo, hi = sorted(rng.sample(range(len(ts)), 2))
            assert store.read(CID, "bid_ask", *(utc_of(ts[lo]), utc_of(ts[hi]))).equals(
                between(quotes, utc_of(ts[lo]), utc_of(ts[hi])))
        assert snapshot(store) == before  # bars from the recomputed pre-aggregates, statistics unchanged
        entries = store.index.archives(CID, "bid_ask", 0, 2**62)
        parquet = pq.ParquetFile(settings.archive_root / days[1])
        assert [e.row_group_start for e in entries[4:]] == list(range(9))  # one row group per hour here
        assert parquet.num_row_groups == 9
        hour = store.plan(CID, "bid_ask", to_us(utc(2025, 1, 11, 3, 10)), to_us(utc(2025, 1, 11, 3, 20)))
        assert [(e.file_path, e.row_groups) for e in hour.archives] == [(days[1], [3])]  # pruning by hour stays
        # the replaced files left the archive tree at once and go after the grace period
        assert len(list((settings.data_root / "superseded").rglob("*.parquet"))) == 13
        later = store.compact(COMPACT_AT + timedelta(minutes=6))
        assert (later.files_written, later.files_removed) == (0, 13)
        assert not (settings.data_root / "superseded").exists() or not any(
            (settings.data_root / "superseded").rglob("*.parquet"))
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{settings.archive_root}/**/*.parquet', "
                       "hive_partitioning = true)").fetchall()
    assert count == [(quotes.num_rows,)]  # an outside engine counts each tick once


def utc_of(micros: int):
    from ibstream.core.times import from_us
    return from_us(micros)


def test_a_reader_that_planned_before_the_swap_reads_every_tick_once(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        plan = store.plan(CID, "bid_ask", *(to_us(t) for t in EVERYTHING))
        store.compact(COMPACT_AT)
        assert plan.read_all().equals(quotes)  # its hourly files now wait in superseded/


def test_ranges_over_a_day_files_row_groups_read_them_in_time_order(recorded):
    """Arrow's make_fragment(row_groups=...) keeps row groups in set order ({7, 8} reads 8 first): every
    span of hours of a day file, whole or cut inside its first and last hour, comes back in order."""
    settings, quotes = recorded
    with Store(settings) as store:
        store.compact(COMPACT_AT)
        for first in range(9):  # the day file of 2025-01-11: hours 0..8, one row group each
            for hours in (1, 2, 3, 9 - first):
                for cut in (timedelta(0), timedelta(minutes=17)):
                    span = (utc(2025, 1, 11, first) + cut, utc(2025, 1, 11) + timedelta(hours=first + hours) - cut)
                    assert store.read(CID, "bid_ask", *span).equals(between(quotes, *span)), (first, hours, cut)


def test_concurrent_readers_see_every_tick_exactly_once_throughout(recorded):
    settings, quotes = recorded
    ts = quotes.column("ts").cast(pa.int64()).to_pylist()
    errors: list[str] = []
    done = threading.Event()
    reads = [0]

    def read(seed: int) -> None:
        rng = random.Random(seed)
        with Store(settings, read_only=True) as reader:  # a separate server's view of the same folder
            while not done.is_set() or reads[0] < 20:
                lo, hi = sorted(rng.sample(range(len(ts)), 2))
                start, end = utc_of(ts[lo]), utc_of(ts[hi])
                served = reader.read(CID, "bid_ask", start, end)
                if not served.equals(between(quotes, start, end)):
                    errors.append(f"{start}..{end}: {served.num_rows} rows")
                reads[0] += 1

    with Store(settings) as store:
        readers = [threading.Thread(target=read, args=(seed,)) for seed in range(2)]
        for thread in readers:
            thread.start()
        store.compact(COMPACT_AT)
        store.compact(COMPACT_AT + timedelta(minutes=10))  # and the replaced files deleted
        done.set()
        for thread in readers:
            thread.join()
    assert not errors, errors[:3]
    assert reads[0] >= 20


COMPACTOR = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from datetime import timedelta
    from pathlib import Path
    from tests.storage.test_compaction import compact_settings, COMPACT_AT
    from ibstream.storage import Store

    with Store(compact_settings(Path({data!r}), retention_grace=timedelta(0))) as store:
        store.compact(COMPACT_AT)
""")


@pytest.mark.parametrize("point", ["compact.after_write_tmp", "compact.after_rename", "compact.after_index",
                                   "compact.after_move", "compact.after_unlink"])
def test_killed_at_each_step_a_reader_then_a_recovering_store_see_every_tick_once(recorded, point):
    settings, quotes = recorded
    with Store(settings, read_only=True) as reader:
        before = snapshot(reader)
    code = COMPACTOR.format(root=str(ROOT), data=str(settings.data_root))
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: point}, cwd=ROOT, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == EXIT_CODE, killed.stderr
    with Store(settings, read_only=True) as reader:  # no recovery: what a read-only server sees
        assert reader.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
    with Store(settings) as store:  # recovery
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        assert snapshot(store) == before
    finished = subprocess.run([sys.executable, "-c", code], cwd=ROOT, timeout=120, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr
    assert [Path(p).parent.name for p in day_files(settings)] == ["hour=all", "hour=all"]
    with Store(compact_settings(settings.data_root, retention_grace=timedelta(0))) as store:
        store.compact()  # now: what recovery superseded (at the wall clock's time) goes too
    assert not list((settings.data_root / "superseded").rglob("*.parquet"))
    assert not (settings.data_root / "quarantine").exists()  # nothing was taken for damage
    with Store(settings) as store:
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        assert snapshot(store) == before


def test_retention_over_a_day_file_keeps_it_until_its_every_hour_expired(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        store.compact(COMPACT_AT)
    kept = compact_settings(settings.data_root, retention=(RetentionRule(ticks_days=1),), retention_grace=timedelta(0))
    with Store(kept) as store:
        store.prune(utc(2025, 1, 12, 4))  # hours before 2025-01-11 04:00 expire: part of day 11's file
        assert store.read(CID, "bid_ask", utc(2025, 1, 11, 4), END).equals(between(quotes, utc(2025, 1, 11, 4), END))
        with pytest.raises(ExpiredDataError):
            store.read(CID, "bid_ask", utc(2025, 1, 11, 3), utc(2025, 1, 11, 4))
        files = day_files(settings)
        assert len(files) == 1 and "date=2025-01-11" in files[0]  # day 10's file went, day 11's still answers
        store.prune(utc(2025, 1, 13))
        assert day_files(settings) == []


def test_damage_in_a_day_file_takes_out_only_the_damaged_hour(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        store.compact(COMPACT_AT)
        entries = store.index.archives(CID, "bid_ask", to_us(utc(2025, 1, 11)), to_us(END))
        damaged = entries[2]  # 02:00
        path = settings.archive_root / damaged.file_path
        column = pq.read_metadata(path).row_group(damaged.row_group_start).column(1)
        with open(path, "r+b") as handle:  # flip bytes inside that hour's row group
            handle.seek(column.data_page_offset + 40)
            handle.write(b"\xff" * 16)
        problem = store.check_archived(damaged)
        assert problem.startswith(f"archive file {damaged.file_path} (hour 2025-01-11T02:00:00Z) cannot be read: ")
        hour = (utc(2025, 1, 11, 2), utc(2025, 1, 11, 3))
        lost = between(quotes, *hour)
        rest = pa.concat_tables([between(quotes, EVERYTHING[0], hour[0]), between(quotes, hour[1], EVERYTHING[1])])
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(rest)  # every other hour salvaged, exactly
        assert [d.start_us for d in store.index.damage(CID, "bid_ask")] == [to_us(hour[0])]
        assert lost.num_rows > 0
        assert len(list((settings.data_root / "quarantine").rglob("day-*.parquet"))) == 1


def test_a_lost_index_is_rebuilt_from_day_files(recorded):
    settings, quotes = recorded
    with Store(settings) as store:
        store.compact(COMPACT_AT)
        before = snapshot(store)
    settings.index_path.unlink()
    report = reindex(settings)
    assert (report.files, report.ticks) == (2, quotes.num_rows)
    with Store(settings) as store:
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        assert snapshot(store)["bars_1h"] == before["bars_1h"]
        assert snapshot(store)["statistics"] == before["statistics"]


def test_a_disk_that_fills_during_compaction_changes_nothing_and_the_next_run_finishes(recorded, caplog):
    settings, quotes = recorded
    with Store(settings) as store:
        hourly = day_files(settings)
        io_faults.arm("compact.write", errno.ENOSPC, times=1)
        try:
            report = store.compact(COMPACT_AT)
        finally:
            io_faults.disarm()
        assert report.files_written == 0 and len(report.failed) == 1 and "No space left" in report.failed[0]
        assert day_files(settings) == hourly  # no day file, no .tmp left
        assert not list(settings.archive_root.rglob("*.tmp"))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        assert [r.message for r in caplog.records if "compaction stopped" in r.message][0].endswith(
            "the hourly files keep answering, the next run tries again")
        assert store.compact(COMPACT_AT).files_written == 2
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_compact_as_an_operator_runs_it(recorded):
    settings, quotes = recorded
    root = str(settings.data_root)
    dry = ibstream("compact", "--data-root", root)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines() == [
        "  711280073/bid_ask 2025-01-10: 4 files, 12,521 ticks",
        "  711280073/bid_ask 2025-01-11: 9 files, 27,479 ticks",
        "would compact 2 days (13 files, 40,000 ticks) into 2 files; run with --apply to compact them"]
    with Store(settings):  # the writer lock is held: --apply says what to do, in one line
        held = ibstream("compact", "--data-root", root, "--apply")
    assert held.returncode == 2 and len(held.stderr.strip().splitlines()) == 1, held.stderr
    applied = ibstream("compact", "--data-root", root, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[-1] == ("compacted 2 days (13 hourly files, 40,000 ticks) into 2 files; deleted "
                                               "0 files replaced earlier (0.0 MB)")
    with Store(settings, read_only=True) as store:
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
    assert ibstream("compact", "--data-root", root).stdout.splitlines() == [
        "would compact 0 days (0 files, 0 ticks) into 0 files; run with --apply to compact them"]


def test_a_day_with_buffered_hours_waits(tmp_path):
    settings = compact_settings(tmp_path / "data")
    quotes = ticks(FIRST, 40_000, rate_scale=0.1)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 11, 5))  # day 11's hours from 05:00 stay in segments
        report = store.compact(COMPACT_AT)
        assert [(d.day_start_us, d.files) for d in report.days] == [(to_us(utc(2025, 1, 10)), 4)]
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_a_real_full_filesystem_stops_compaction_and_retention_without_loss(small_disk, caplog):
    settings = compact_settings(small_disk / "data", retention=(RetentionRule(ticks_days=1),),
                                retention_grace=timedelta(0))
    quotes = ticks(FIRST, 40_000, rate_scale=0.1)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 12))
        hourly = day_files(settings)
        fill(small_disk / "filler")
        report = store.compact(COMPACT_AT)
        assert report.files_written == 0 and "No space left on device" in report.failed[0]
        assert day_files(settings) == hourly and not list(settings.archive_root.rglob("*.tmp"))
        with pytest.raises(sqlite3.OperationalError):  # the index cannot take the expiry: nothing expired
            store.prune(utc(2025, 1, 12, 4))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        (small_disk / "filler").unlink()
        assert store.compact(COMPACT_AT).files_written == 2
        store.prune(utc(2025, 1, 12, 4))
        assert store.read(CID, "bid_ask", utc(2025, 1, 11, 4), END).equals(between(quotes, utc(2025, 1, 11, 4), END))


def test_a_scheduled_job_that_meets_a_full_disk_logs_one_line_per_change(recorded, caplog):
    from ibstream.storage.store import _reported

    settings, quotes = recorded
    kept = compact_settings(settings.data_root, retention=(RetentionRule(ticks_days=1),))
    with Store(kept) as store:
        job = _reported("retention", lambda: store.prune(utc(2025, 1, 12, 4)))
        io_faults.arm("index.write", errno.ENOSPC)
        try:
            assert job() is None and job() is None  # two runs: one line, nothing expired
            assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        finally:
            io_faults.disarm()
        assert job().hours  # and then it expires what is due
    lines = [r.getMessage() for r in caplog.records if r.name == "ibstream.storage.store"]
    assert lines == ["retention stopped: OperationalError: database or disk is full (injected at index.write); "
                     "nothing was changed, it runs again on schedule",
                     "retention works again (it had stopped: OperationalError: database or disk is full (injected at "
                     "index.write))"]
