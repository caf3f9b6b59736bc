"""A store written by an older ibstream opens in this one with every tick and record intact:
an index of schema version 2 is migrated in place, archive files of metadata format 1 are read
(and reindexed) as written."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from datetime import date

import pyarrow.parquet as pq
import pytest

from ibstream.settings import Settings
from ibstream.simulator.market import SIM_MNQ
from ibstream.storage import Store
from ibstream.storage.archive import METADATA_KEY
from ibstream.storage.index import _RENAMED_V3, SCHEMA_VERSION
from ibstream.storage.maintenance import reindex, verify
from ibstream.storage.synthetic import MNQ
from tests.helpers import append_in_batches, ticks, utc

CID = MNQ.contract_id
EVERYTHING = (utc(2000, 1, 1), utc(2100, 1, 1))


def snapshot(settings: Settings) -> dict:
    with Store(settings) as store:
        return {
            "ticks": store.read(CID, "bid_ask", *EVERYTHING),
            "archives": store.index.archives(CID, "bid_ask", 0, 2**62),
            "coverage": store.index.coverage(CID, "bid_ask", 0, 2**62),
            "contract": store.index.contract(CID),
            "statistics": store.statistics(CID, "bid_ask"),
        }


@pytest.fixture
def recorded(settings: Settings) -> dict:
    with Store(settings) as store:
        store.index.upsert_contract(SIM_MNQ.details(date(2025, 1, 6)))
        store.index.coverage_transition(CID, "bid_ask", 1_736_514_000_000_000, "recorded", "subscribed")
        append_in_batches(store, ticks(utc(2025, 1, 10, 13, 30), 30_000, rate_scale=0.25))
        store.archive(now=utc(2025, 1, 10, 15, 30))
    return snapshot(settings)


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def test_an_index_of_version_2_is_migrated_in_place_with_every_row(settings, recorded):
    with sqlite3.connect(settings.index_path) as conn:  # what ibstream before schema version 3 wrote
        for table, renames in _RENAMED_V3.items():
            for old, new in renames.items():
                conn.execute(f"ALTER TABLE {table} RENAME COLUMN {new} TO {old}")
        for column in ("row_group_start", "row_group_count"):  # version 4: compacted day files
            conn.execute(f"ALTER TABLE tick_archives DROP COLUMN {column}")
        conn.execute("DROP TABLE superseded_files")
        conn.execute("PRAGMA user_version = 2")
    conn.close()

    assert snapshot(settings) == recorded
    with sqlite3.connect(settings.index_path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 5
        assert {"hour_start_us", "start_us", "end_us", "row_group_start", "row_group_count"} <= columns(
            conn, "tick_archives")
        assert {"start_us", "end_us", "detected_at_us"} <= columns(conn, "damage")
        assert "updated_at_us" in columns(conn, "contracts")
        assert not {"hour_start", "start_time", "end_time"} & columns(conn, "tick_archives")
    conn.close()


def test_archive_files_of_metadata_format_1_are_reindexed_as_written(settings, recorded):
    files = sorted(settings.archive_root.rglob("*.parquet"))
    assert len(files) == 2
    for path in files:  # rewrite each file's self-description the way format 1 named it
        table = pq.read_table(path)
        facts = json.loads(pq.read_metadata(path).metadata[METADATA_KEY])
        old = {"hour_start": facts.pop("hour_start_us"), "start_time": facts.pop("start_us"),
               "end_time": facts.pop("end_us")}
        contract = dict(facts["contract"])
        contract["updated_at"] = contract.pop("updated_at_us")
        facts |= old | {"format": 1, "contract": contract}
        with pq.ParquetWriter(path, table.schema, write_page_checksum=True) as writer:
            writer.write_table(table)
            writer.add_key_value_metadata({METADATA_KEY: json.dumps(facts)})
    settings.index_path.unlink()

    report = reindex(settings)
    assert (report.files, report.damage) == (2, [])
    assert report.problems == ["index.sqlite was missing: contracts and coverage come from the archive files"]
    assert snapshot(settings)["ticks"] == recorded["ticks"]
    after = snapshot(settings)
    assert [asdict(e) | {"file_size_bytes": 0} for e in after["archives"]] == [
        asdict(e) | {"file_size_bytes": 0} for e in recorded["archives"]]
    assert after["contract"] == recorded["contract"]
    assert verify(settings).ok
