"""Nothing acknowledged is ever lost: a lost or stale index, damaged segments and archive files,
a refused or torn write, an open segment cut by another process, a changed rotation interval.

Every scenario writes real segments, Parquet files and SQLite; damage is done to the bytes on
disk, as a failing disk or a careless operator would.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from ibstream.core.errors import CorruptFileError, DamagedDataError, SealedHourError, StorageUnavailableError
from ibstream.core.times import to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import io_faults
from ibstream.storage.index import ContractDetails
from ibstream.storage.maintenance import reindex, verify
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, header_bytes, list_segments, scan_segment, segment_start_us, stream_dir
from ibstream.storage.synthetic import MNQ
from tests.helpers import append_in_batches, between, fill, ticks, utc

CID = MNQ.contract_id
KEY = StreamKey(CID, TickType.BID_ASK)
EVERYTHING = (utc(2000, 1, 1), utc(2100, 1, 1))
START = utc(2025, 1, 10, 13, 30)
DETAILS = ContractDetails(CID, "MNQ", "FUT", "CME", "", "USD", "MNQZ6", "MNQ", "20261218", "2", 0.25,
                          "Micro E-mini Nasdaq-100", "US/Central", "", "", 1)


@pytest.fixture(autouse=True)
def no_faults_left():
    yield
    io_faults.disarm()


def read_all(settings: Settings, *, read_only: bool = False) -> pa.Table:
    with Store(settings, read_only=read_only) as store:
        return store.read(CID, "bid_ask", *EVERYTHING)


def coverage(settings: Settings, status: str | None = None) -> list[dict]:
    with Store(settings, read_only=True) as store:
        rows = store.coverage(CID, "bid_ask", *EVERYTHING).to_pylist()
    return [r for r in rows if status is None or r["status"] == status]


def segments(settings: Settings) -> list[Path]:
    return list_segments(stream_dir(settings.buffer_root, KEY))


def quarantined(settings: Settings) -> list[Path]:
    root = settings.data_root / "quarantine"
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".note.json"))


@pytest.fixture
def recorded(settings: Settings) -> pa.Table:
    """~3 h of quotes from 13:30: hours 13-15 archived (with contract details and coverage), 16 buffered."""
    quotes = ticks(START, 40_000, rate_scale=0.25)
    with Store(settings) as store:
        store.index.upsert_contract(DETAILS)
        store.index.coverage_transition(CID, "bid_ask", to_us(START), "recorded", "subscribed")
        append_in_batches(store, quotes)
        store.index.coverage_confirm([(CID, "bid_ask")], quotes.column("ts")[-1].value)
        store.archive(now=utc(2025, 1, 10, 16))
    return quotes


# -- the index -----------------------------------------------------------------------------------


def test_a_closed_index_holds_everything_in_its_database_file(settings, recorded):
    assert not settings.index_path.with_name("index.sqlite-wal").exists()
    alone = settings.data_root.parent / "copy"
    alone.mkdir()
    shutil.copy(settings.index_path, alone / "index.sqlite")  # a backup that copied the database file alone
    with Store(Settings(data_root=alone), read_only=True) as store:
        assert len(store.index.archives(CID, "bid_ask", 0, 2**62)) == 3


def test_a_lost_index_is_rebuilt_from_the_files_on_the_next_start(settings, recorded):
    for path in settings.data_root.glob("index.sqlite*"):
        path.unlink()
    stored = read_all(settings)  # the writable store adopts every archive file it does not know
    assert stored.equals(recorded)
    assert len(list(settings.archive_root.rglob("*.parquet"))) == 3, "no archive file may be deleted"
    with Store(settings, read_only=True) as store:
        assert store.index.contract(CID) == DETAILS  # from the files' own metadata
        assert [s.total_ticks for s in store.statistics(CID, "bid_ask")] == [between(recorded, utc(2025, 1, 10),
                                                                                   utc(2025, 1, 10, 16)).num_rows]
    recorded_rows = coverage(settings, "recorded")
    assert (recorded_rows[0]["start"], recorded_rows[-1]["end"]) == (START, utc(2025, 1, 10, 16))


def test_hours_adopted_after_a_lost_index_are_sealed(settings):
    quotes = ticks(START, 20_000, rate_scale=0.25)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 11))  # every hour archived: the buffer is empty
    for path in settings.data_root.glob("index.sqlite*"):
        path.unlink()
    with Store(settings) as store:
        with pytest.raises(SealedHourError, match="already archived"):
            store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14, 30), 10))
        assert store.archive(now=utc(2025, 1, 11)) == []  # nothing to archive, nothing overwritten
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_a_stale_index_adopts_the_hours_archived_after_it(settings):
    quotes = ticks(START, 40_000, rate_scale=0.25)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 10, 15))  # hours 13 and 14
    stale = settings.data_root.parent / "stale.sqlite"
    shutil.copy(settings.index_path, stale)
    with Store(settings) as store:
        store.archive(now=utc(2025, 1, 10, 17))  # hours 15 and 16: the stale copy knows nothing of them
    shutil.copy(stale, settings.index_path)
    assert read_all(settings).equals(quotes)
    assert all(segment_start_us(p) >= to_us(utc(2025, 1, 10, 17)) for p in segments(settings)), \
        "the adopted hours' segments were removed when they were archived; nothing is served twice"
    with Store(settings, read_only=True) as store:
        assert [e.hour_start_us for e in store.index.archives(CID, "bid_ask", 0, 2**62)] == [
            to_us(utc(2025, 1, 10, h)) for h in (13, 14, 15, 16)]


def test_a_damaged_index_is_named_with_the_way_to_rebuild_it(settings, recorded):
    settings.index_path.write_bytes(b"this is not sqlite" * 512)
    with pytest.raises(CorruptFileError, match="ibstream reindex --data-root"):
        Store(settings)
    report = reindex(settings)
    assert (report.files, report.ticks) == (3, between(recorded, START, utc(2025, 1, 10, 16)).num_rows)
    assert read_all(settings).equals(recorded)
    (old,) = [p for p in quarantined(settings) if p.name == "index.sqlite"]
    assert old.read_bytes().startswith(b"this is not sqlite"), "the damaged index is kept aside"
    assert coverage(settings, "recorded"), "coverage comes back from the archive files' metadata"


def test_reindex_keeps_what_a_readable_old_index_knows(settings, recorded):
    before = coverage(settings)
    report = reindex(settings)
    assert report.files == 3
    assert coverage(settings) == before
    assert read_all(settings).equals(recorded)


def test_reindex_reports_an_archive_file_that_is_gone(settings, recorded):
    (first, *_) = sorted(settings.archive_root.rglob("*.parquet"))
    first.unlink()
    report = reindex(settings)
    assert report.files == 2 and any("missing" in p for p in report.problems)
    (damaged,) = coverage(settings, "damaged")
    hour_13 = between(recorded, START, utc(2025, 1, 10, 14)).column("ts")
    assert (damaged["start"], damaged["end"]) == (hour_13[0].as_py(), hour_13[-1].as_py())


# -- segments ------------------------------------------------------------------------------------


@pytest.fixture
def one_segment(settings: Settings) -> Settings:
    return settings.model_copy(update={"rotation_interval": timedelta(hours=1)})


def write_batches(settings: Settings, table: pa.Table, batch: int = 1_000) -> None:
    with Store(settings) as store:
        append_in_batches(store, table, batch)


def damage(path: Path, at: int, count: int = 64) -> None:
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(bytes((b ^ 0x5A) or 1 for b in handle.read(count)))


def test_damage_inside_a_closed_segment_loses_only_the_damaged_batch(one_segment):
    settings = one_segment
    table = ticks(utc(2025, 1, 10, 14), 6_000)
    write_batches(settings, table)
    (segment,) = segments(settings)
    whole = scan_segment(segment)
    message_end = [len(header_bytes(TickType.BID_ASK))]
    for batch in whole.batches:
        message_end.append(message_end[-1] + len(pa.ipc.read_message(pa.BufferReader(
            segment.read_bytes()[message_end[-1]:])).serialize()))
    damage(segment, segment.stat().st_size // 3)  # inside the third of six batches
    hit = next(i for i, end in enumerate(message_end[1:]) if end > segment.stat().st_size // 3)

    stored = read_all(settings)
    expected = pa.concat_tables([table.slice(0, hit * 1_000), table.slice((hit + 1) * 1_000)])
    assert stored.equals(expected), "every batch on both sides of the damage keeps serving"
    (damaged,) = coverage(settings, "damaged")
    lost = table.slice(hit * 1_000, 1_000).column("ts")
    assert damaged["start"] <= lost[0].as_py() and damaged["end"] >= lost[-1].as_py()
    assert (damaged["start"], damaged["end"]) == (table.column("ts")[hit * 1_000 - 1].as_py(),
                                                  table.column("ts")[(hit + 1) * 1_000].as_py())
    (original,) = quarantined(settings)
    assert original.read_bytes() != segment.read_bytes() and original.stat().st_size == whole.size
    note = json.loads(original.with_name(original.name + ".note.json").read_text())
    assert note["kept_ticks"] == 5_000 and note["lost_spans"][0]["contract_id"] == CID

    with Store(settings) as store:  # the archiver publishes what survived; the damage stays reported
        store.archive(now=utc(2025, 1, 10, 16))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
    assert len(coverage(settings, "damaged")) == 1


def test_damage_in_the_last_batch_is_not_mistaken_for_a_torn_tail(one_segment):
    settings = one_segment
    table = ticks(utc(2025, 1, 10, 14), 3_000)
    write_batches(settings, table)
    (segment,) = segments(settings)
    damage(segment, segment.stat().st_size - 8 - 200, 16)  # inside the last batch; the file is whole
    assert read_all(settings).equals(table.slice(0, 2_000))
    assert len(coverage(settings, "damaged")) == 1 and len(quarantined(settings)) == 1


@pytest.mark.parametrize("newest", [True, False])
def test_a_damaged_segment_header_loses_nothing(settings, newest):
    table = ticks(utc(2025, 1, 10, 13, 50), 6_000)  # 13:50-14:00+: three 5-minute segments
    write_batches(settings, table)
    target = segments(settings)[-1 if newest else 0]
    damage(target, 20, 40)
    assert read_all(settings, read_only=True).equals(table)  # a server on the store, before any repair
    assert read_all(settings).equals(table)
    assert read_all(settings, read_only=True).equals(table)
    assert not coverage(settings, "damaged"), "the schema holds no tick: nothing was lost"
    assert len(quarantined(settings)) == 1  # the bytes are still kept aside
    with Store(settings) as store:
        store.archive(now=utc(2025, 1, 10, 16))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)


def test_a_read_only_server_skips_damage_it_cannot_repair(one_segment):
    settings = one_segment
    table = ticks(utc(2025, 1, 10, 14), 3_000)
    write_batches(settings, table)
    (segment,) = segments(settings)
    damage(segment, segment.stat().st_size // 2, 16)
    assert read_all(settings, read_only=True).equals(pa.concat_tables([table.slice(0, 1_000), table.slice(2_000)]))


def test_an_open_segment_cut_by_another_process_is_rewritten_from_memory(one_segment):
    settings = one_segment
    table = ticks(utc(2025, 1, 10, 14), 5_000)
    with Store(settings) as store:
        append_in_batches(store, table.slice(0, 3_000))
        (segment,) = segments(settings)
        os.truncate(segment, segment.stat().st_size - 5_000)  # a careless `truncate`, or a disk tool
        append_in_batches(store, table.slice(3_000))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
    assert read_all(settings).equals(table)
    assert len(quarantined(settings)) == 1


# -- writes the disk refuses ---------------------------------------------------------------------


@pytest.mark.parametrize("point,partial", [("segment.write", None), ("segment.write", 700), ("segment.fsync", None)])
def test_a_refused_write_acknowledges_nothing_and_leaves_no_torn_bytes(one_segment, point, partial):
    settings = one_segment.model_copy(update={"fsync": "batch"})
    table = ticks(utc(2025, 1, 10, 14), 3_000)
    with Store(settings) as store:
        store.append(CID, "bid_ask", table.slice(0, 1_000))
        (segment,) = segments(settings)
        size = segment.stat().st_size
        io_faults.arm(point, errno.ENOSPC, partial_bytes=partial, times=3)
        for _ in range(3):
            with pytest.raises(StorageUnavailableError, match="No space left") as refused:
                store.append(CID, "bid_ask", table.slice(1_000, 1_000))
            assert refused.value.acknowledged == 0 and refused.value.errno == errno.ENOSPC
            assert segment.stat().st_size == size, "the failed write was cut off the segment"
        store.append(CID, "bid_ask", table.slice(1_000))  # room again: the retry stores them once
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
    assert read_all(settings).equals(table)
    assert not quarantined(settings)


def test_a_batch_refused_after_a_rotation_says_how_much_was_acknowledged(settings):
    table = ticks(utc(2025, 1, 10, 13, 58), 3_000)  # crosses the 14:00 bucket
    with Store(settings) as store:
        store.append(CID, "bid_ask", table.slice(0, 10))
        io_faults.arm("segment.create", errno.ENOSPC, times=1)  # the new bucket's segment cannot be made
        with pytest.raises(StorageUnavailableError) as refused:
            store.append(CID, "bid_ask", table.slice(10))
        done = 10 + refused.value.acknowledged
        assert between(table, utc(2025, 1, 10, 13), utc(2025, 1, 10, 14)).num_rows == done
        store.append(CID, "bid_ask", table.slice(done))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
    assert not list(settings.buffer_root.rglob("*.tmp"))


def test_archiving_on_a_full_disk_waits_and_keeps_serving(settings, caplog):
    table = ticks(START, 20_000, rate_scale=0.25)
    with Store(settings) as store:
        append_in_batches(store, table)
        io_faults.arm("archive.write", errno.ENOSPC)
        for _ in range(3):
            assert store.archive(now=utc(2025, 1, 10, 16)) == []
        assert sum("archiving stopped" in r.message for r in caplog.records) == 1, "one line per change of state"
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
        io_faults.disarm()
        assert len(store.archive(now=utc(2025, 1, 10, 16))) == 3
        assert any("archiving works again" in r.message for r in caplog.records)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
    assert not list(settings.archive_root.rglob("*.tmp"))


# -- archive files -------------------------------------------------------------------------------


def test_a_damaged_archive_file_is_named_then_quarantined_by_verify(settings, recorded):
    files = sorted(settings.archive_root.rglob("*.parquet"))
    damage(files[1], files[1].stat().st_size // 3)  # hour 14
    with Store(settings, read_only=True) as store:
        with pytest.raises(DamagedDataError, match=r"hour 2025-01-10T14:00:00Z .*ibstream verify"):
            store.read(CID, "bid_ask", *EVERYTHING)
    report = verify(settings)
    assert len(report.damage) == 1 and report.files == 2
    hour_14 = (utc(2025, 1, 10, 14), utc(2025, 1, 10, 15))
    expected = pa.concat_tables([between(recorded, START, hour_14[0]), between(recorded, hour_14[1], EVERYTHING[1])])
    assert read_all(settings).equals(expected)
    (damaged,) = coverage(settings, "damaged")
    assert (damaged["start"], damaged["end"]) == (hour_14[0], hour_14[1] - timedelta(microseconds=1))
    with Store(settings, read_only=True) as store:  # bars agree with the ticks that are served
        bars = store.bars(CID, "bid_ask", to_us(START), to_us(utc(2025, 1, 10, 17)), "1h")
        assert pl.from_arrow(bars)["quote_count"].to_list() == [
            between(expected, utc(2025, 1, 10, h), utc(2025, 1, 10, h + 1)).num_rows for h in (13, 15, 16)]
    assert verify(settings).ok, "a second run finds nothing new"


def test_verify_retiring_the_only_hour_of_a_day_drops_that_days_statistics(settings):
    quotes = ticks(utc(2025, 1, 10, 23, 30), 8_000, rate_scale=0.25)  # 23:30 to past midnight
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 11, 2))
        assert [s.date for s in store.statistics(CID, "bid_ask")] == ["2025-01-10", "2025-01-11"]
    (first, *_) = sorted(settings.archive_root.rglob("*.parquet"))
    damage(first, first.stat().st_size // 2)
    assert len(verify(settings).damage) == 1
    with Store(settings, read_only=True) as store:
        assert [s.date for s in store.statistics(CID, "bid_ask")] == ["2025-01-11"]


# -- settings changed between runs ---------------------------------------------------------------


@pytest.mark.parametrize("first,then", [(timedelta(minutes=15), timedelta(minutes=5)),
                                        (timedelta(minutes=5), timedelta(minutes=15)),
                                        (timedelta(minutes=5), timedelta(hours=1))])
def test_a_changed_rotation_interval_keeps_ticks_in_order(settings, first, then):
    table = ticks(utc(2025, 1, 10, 14), 12_000)  # ~14 minutes
    half = 6_000
    write_batches(settings.model_copy(update={"rotation_interval": first}), table.slice(0, half))
    changed = settings.model_copy(update={"rotation_interval": then})
    write_batches(changed, table.slice(half))
    assert read_all(changed).equals(table)
    assert read_all(changed, read_only=True).equals(table)
    with Store(changed, read_only=True) as store:
        bars = store.bars(CID, "bid_ask", to_us(utc(2025, 1, 10, 14)), to_us(utc(2025, 1, 10, 15)), "1m")
        assert sum(bars.column("quote_count").to_pylist()) == table.num_rows
    with Store(changed) as store:
        store.archive(now=utc(2025, 1, 10, 16))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)


# -- a real full filesystem ----------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (root only; skipped where mounting is not allowed, e.g. in some CI sandboxes:
    the injected faults above cover the same paths portably)."""
    mount = tmp_path / "small-disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the portable fault injection tests cover this path")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({result.stderr.decode().strip()}); fault injection covers this path")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_real_full_disk_refuses_cleanly_and_recording_resumes_when_room_returns(small_disk):
    settings = Settings(data_root=small_disk / "data", rotation_interval=timedelta(minutes=5), fsync="batch")
    table = ticks(utc(2025, 1, 10, 14), 20_000, rate_scale=5)  # ~1.3 MB of segments
    filler = small_disk / "filler"
    acked = 0
    with Store(settings) as store:
        fill(filler)  # then leave 300 kB free
        os.truncate(filler, max(0, filler.stat().st_size - 300_000))
        with pytest.raises(StorageUnavailableError) as refused:
            while acked < table.num_rows:
                store.append(CID, "bid_ask", table.slice(acked, 1_000))
                acked += 1_000
        assert refused.value.errno == errno.ENOSPC
        acked += refused.value.acknowledged
        assert 0 < acked < table.num_rows
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table.slice(0, acked)), "no torn or doubled batch"
        filler.unlink()  # room again
        append_in_batches(store, table.slice(acked), 1_000)
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)
    assert read_all(settings).equals(table)
    assert not quarantined(settings)


def test_files_ibstream_does_not_write_are_left_alone(settings, caplog):
    table = ticks(utc(2025, 1, 10, 14), 2_000)
    write_batches(settings, table)
    directory = stream_dir(settings.buffer_root, KEY)
    (directory / "copy of segment.arrows").write_bytes(b"whatever")
    (directory / "README").write_text("notes")
    assert read_all(settings).equals(table)
    assert read_all(settings, read_only=True).equals(table)
    assert (directory / "copy of segment.arrows").exists() and (directory / "README").exists()
    assert sum("not a segment name" in r.message for r in caplog.records) == 2  # one line a file, on start


def test_the_recorders_scrub_finds_a_damaged_archive_file_without_verify(settings, recorded):
    files = sorted(settings.archive_root.rglob("*.parquet"))
    damage(files[2], files[2].stat().st_size // 2)  # hour 15
    with Store(settings) as store:
        assert store.scrub(2) == []  # hours 13 and 14 are sound
        (problem,) = store.scrub(2)  # hour 15, then round again to 13
        assert "hour=15/data.parquet" in problem
        expected = pa.concat_tables([between(recorded, START, utc(2025, 1, 10, 15)),
                                     between(recorded, utc(2025, 1, 10, 16), EVERYTHING[1])])
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
    (damaged,) = coverage(settings, "damaged")
    assert damaged["start"] == utc(2025, 1, 10, 15) and "quarantine/" in damaged["reason"]
