"""Closed segments of small group commits are rewritten as large compressed batches: the same
ticks, crash-safe at every step, never over damage, never losing the original to a full disk."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import ENV, EXIT_CODE, io_faults
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, list_segments, scan_segment, stream_dir
from ibstream.storage.synthetic import MNQ
from tests.helpers import ticks, utc

CID = MNQ.contract_id
KEY = StreamKey(CID, TickType.BID_ASK)
ROOT = Path(__file__).resolve().parents[2]
EVERYTHING = (utc(2000, 1, 1), utc(2100, 1, 1))
START = utc(2025, 1, 10, 14)
COUNT, COMMIT = 12_000, 7  # ~12 min of quotes in commits of 7 ticks: two closed 5-minute segments and the open one
NOW = utc(2025, 1, 10, 14, 30)  # the archiver runs, but no hour has ended


@pytest.fixture(autouse=True)
def no_faults_left():
    yield
    io_faults.disarm()


def small_commits(store: Store, table: pa.Table, size: int = COMMIT) -> None:
    for offset in range(0, table.num_rows, size):
        store.append(CID, "bid_ask", table.slice(offset, size))


def segments(settings: Settings) -> list[Path]:
    return list_segments(stream_dir(settings.buffer_root, KEY))


def quarantined(settings: Settings) -> list[Path]:
    return [p for p in (settings.data_root / "quarantine").rglob("*") if p.is_file()]


def test_closed_segments_are_coalesced_with_the_same_ticks(settings):
    table = ticks(START, COUNT)
    with Store(settings) as store:
        small_commits(store, table)
        closed = store.writer.snapshot(KEY).closed
        assert len(closed) >= 2
        before = {p: p.stat().st_size for p in segments(settings)}
        open_segment = store.writer.snapshot(KEY).open_path
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)  # fills the segment cache with the old files
        store.archive(now=NOW)  # the archiver's run coalesces what it leaves buffered
        for path in closed:
            scan = scan_segment(path)
            assert scan.whole and scan.ended and len(scan.batches) == 1
            assert path.stat().st_size * 10 < before[path], "a tenth of the bytes, or less"
        assert open_segment.stat().st_size == before[open_segment], "the open segment is never touched"
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
        assert not store.writer.coalesce_closed(), "a coalesced segment is left alone"
        small_commits(store, ticks(START + timedelta(hours=1), 100))  # recording goes on
    assert not list(settings.buffer_root.rglob("*.tmp"))
    with Store(settings) as store:  # recovery reads coalesced segments as any other
        assert store.read(CID, "bid_ask", START, START + timedelta(hours=1)).equals(table)
        store.archive(now=utc(2025, 1, 10, 17))
        assert store.read(CID, "bid_ask", START, START + timedelta(hours=1)).equals(table)
        assert sum(e.tick_count for e in store.index.archives(CID, "bid_ask", 0, 2**62)) == COUNT + 100


def test_a_reader_of_another_process_sees_each_rewrite(settings):
    """A read-only store caches parsed segments by path and file version: a rewrite of the same
    size is re-read, and a reader holding the old file's map still reads it whole."""
    table = ticks(START, COUNT)
    with Store(settings) as store, Store(settings, read_only=True) as reader:
        small_commits(store, table)
        assert reader.read(CID, "bid_ask", *EVERYTHING).equals(table)
        old = dict(reader.planner.cache._entries)
        mapped = pa.memory_map(str(store.writer.snapshot(KEY).closed[0]), "r")  # a read in flight holds the old file
        done = store.writer.coalesce_closed()
        assert done and all(d.bytes_after < d.bytes_before for d in done)
        assert pa.Table.from_batches(scan_segment(done[0].path, mapped).batches).equals(
            pa.Table.from_batches(scan_segment(done[0].path).batches))
        assert reader.read(CID, "bid_ask", *EVERYTHING).equals(table)
        new = dict(reader.planner.cache._entries)
        assert len(new) == len(old), "one entry a segment: the old versions' were replaced"
        assert {path for path, _ in new} == {path for path, _ in old}
        assert len(set(new) - set(old)) == len(done), "each rewritten segment was read again"


def test_a_damaged_segment_is_not_coalesced_but_quarantined(settings):
    table = ticks(START, COUNT)
    with Store(settings) as store:
        small_commits(store, table)
        victim = store.writer.snapshot(KEY).closed[0]
        with open(victim, "r+b") as handle:  # damage under a running writer, as a failing disk does
            handle.seek(victim.stat().st_size // 2)
            handle.write(b"\xa5" * 32)
        damaged = victim.read_bytes()
        done = store.writer.coalesce_closed()
        assert victim not in [d.path for d in done] and victim.read_bytes() == damaged
        assert len(done) == len(store.writer.snapshot(KEY).closed) - 1
    with Store(settings) as store:  # on start: quarantined, the good batches kept
        (damage,) = [r for r in store.coverage(CID, "bid_ask", *EVERYTHING).to_pylist() if r["status"] == "damaged"]
        stored = store.read(CID, "bid_ask", *EVERYTHING)
        assert 0 < table.num_rows - stored.num_rows <= 2 * COMMIT
    assert len([p for p in quarantined(settings) if not p.name.endswith(".json")]) == 1


def test_a_full_disk_during_the_rewrite_leaves_the_original_and_logs_one_line(settings, caplog):
    table = ticks(START, COUNT)
    with Store(settings) as store:
        small_commits(store, table)
        closed = store.writer.snapshot(KEY).closed
        originals = {p: p.read_bytes() for p in closed}
        caplog.set_level(logging.INFO, logger="ibstream.storage.segments")
        for point, partial in (("coalesce.write", 5_000), ("coalesce.fsync", None)):
            io_faults.arm(point, errno.ENOSPC, partial_bytes=partial)
            for _ in range(3):  # three archiver runs on a full disk
                store.archive(now=NOW)
            io_faults.disarm()
            assert {p: p.read_bytes() for p in closed} == originals
            assert not list(settings.buffer_root.rglob("*.tmp"))
            assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
        assert sum("could not coalesce" in r.message for r in caplog.records) == 1, "one line per change of state"
        store.archive(now=NOW)  # room again
        assert any("coalescing segments works again" in r.message for r in caplog.records)
        assert all(len(scan_segment(p).batches) == 1 for p in closed)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
    assert not quarantined(settings)


COALESCER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from pathlib import Path
    sys.path.insert(0, {root_dir!r})  # for tests.helpers
    from tests.helpers import ticks, utc
    from ibstream.settings import Settings
    from ibstream.storage import Store

    settings = Settings(data_root=Path({root!r}), rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0),
                        fsync="batch")
    table = ticks(utc(2025, 1, 10, 14), {count})
    store = Store(settings)
    for offset in range(0, table.num_rows, {commit}):
        store.append({cid}, "bid_ask", table.slice(offset, {commit}))
    print("ACKED", flush=True)
    store.archive(now=utc(2025, 1, 10, 14, 30))
    """
)


@pytest.mark.parametrize("point", ["coalesce.mid_write", "coalesce.before_rename", "coalesce.after_rename"])
def test_a_kill_at_each_step_of_coalescing_loses_and_doubles_nothing(tmp_path, point):
    root = tmp_path / "data"
    code = COALESCER.format(root_dir=str(ROOT), root=str(root), count=COUNT, commit=COMMIT, cid=CID)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, ENV: point},
                            capture_output=True, text=True)
    assert result.returncode == EXIT_CODE and "ACKED" in result.stdout, result.stderr
    expected = ticks(START, COUNT)
    leftovers = list(root.rglob("*.arrows.tmp"))
    assert bool(leftovers) == (point != "coalesce.after_rename")

    reader = Store(Settings(data_root=root), read_only=True)  # a reader that does no recovery
    assert reader.read(CID, "bid_ask", *EVERYTHING).equals(expected)
    reader.close()

    settings = Settings(data_root=root, rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0))
    with Store(settings) as store:  # recovery, then coalescing and archival finish
        assert not list(root.rglob("*.tmp"))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
        store.archive(now=utc(2025, 1, 10, 14, 30))
        assert all(len(scan_segment(p).batches) == 1 for p in list_segments(stream_dir(settings.buffer_root, KEY)))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
        store.archive(now=utc(2025, 1, 10, 16))
        assert sum(e.tick_count for e in store.index.archives(CID, "bid_ask", 0, 2**62)) == COUNT
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
    assert not quarantined(settings)
