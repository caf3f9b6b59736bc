"""`storage.export`: a range of streams to Parquet, CSV or Arrow IPC files with a manifest, read back
exactly as the store answers it, from archived hours and the buffer alike."""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta

import polars as pl
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from polars.testing import assert_frame_equal

from ibstream.core.errors import ExpiredDataError, InvalidRequestError
from ibstream.core.times import iso, to_us
from ibstream.settings import Settings
from ibstream.storage import Store, schema_for
from ibstream.storage import export as export_module
from ibstream.storage.config import RetentionRule
from ibstream.storage.export import MANIFEST, export, missing_spans
from ibstream.storage.synthetic import AAPL, MNQ
from tests.helpers import append_in_batches, market, ticks, utc

CID = MNQ.contract_id
START, END = utc(2025, 1, 10, 13, 45), utc(2025, 1, 10, 16, 10)  # from an archived hour into the buffer
STREAMS = [(CID, "bid_ask"), (CID, "last"), (AAPL.contract_id, "bid_ask")]


@pytest.fixture
def recorded(settings: Settings) -> Settings:
    """MNQ quotes and trades 13:30-17:00 and AAPL quotes 14:00-16:30; hours 13 and 14 archived, the rest
    in buffer segments; MNQ quotes recorded with a 10-minute gap at 15:10."""
    with Store(settings) as store:
        append_in_batches(store, ticks(utc(2025, 1, 10, 13, 30), 30_000, rate_scale=0.25))  # to about 17:15
        append_in_batches(store, market(MNQ, "last", utc(2025, 1, 10, 13, 30), utc(2025, 1, 10, 17), 0.5, seed=3))
        append_in_batches(store, market(AAPL, "bid_ask", utc(2025, 1, 10, 14), utc(2025, 1, 10, 16, 30), 0.5, seed=5),
                          contract_id=AAPL.contract_id)
        assert store.archive(now=utc(2025, 1, 10, 15, 30))  # hours 13 and 14
        for at, status, reason in ((utc(2025, 1, 10, 13, 20), "recorded", "subscribed"),
                                   (utc(2025, 1, 10, 15, 10), "gap", "disconnected"),
                                   (utc(2025, 1, 10, 15, 20), "recorded", "subscribed")):
            store.index.coverage_transition(CID, "bid_ask", to_us(at), status, reason)
        store.index.coverage_confirm([(CID, "bid_ask")], to_us(utc(2025, 1, 10, 16, 50)))
    return settings


def read_back(path, format: str, tick_type: str) -> pa.Table:
    schema = schema_for(tick_type)
    if format == "parquet":
        return pq.read_table(path)
    if format == "arrow":
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_file(source).read_all()
    table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=schema))
    return table.cast(schema)  # CSV columns read as nullable; the ticks' are not


@pytest.mark.parametrize("format", ["parquet", "csv", "arrow"])
def test_export_reads_back_exactly_what_the_store_reads_with_an_exact_manifest(recorded, tmp_path, format):
    destination = tmp_path / "export"
    with Store(recorded, read_only=True) as store:
        report = export(store, destination, STREAMS, to_us(START), to_us(END), format)
        expected = {(cid, tt): store.read(cid, tt, START, END) for cid, tt in STREAMS}
        coverage = {(cid, tt): store.coverage(cid, tt, START, END).to_pylist() for cid, tt in STREAMS}
        archived = {(e.contract_id, e.tick_type) for e in store.index.archives(CID, "bid_ask", to_us(START),
                                                                                to_us(END))}
    assert archived == {(CID, "bid_ask")} and expected[CID, "bid_ask"].num_rows > 5_000  # both layers are in
    suffix = {"parquet": "parquet", "csv": "csv", "arrow": "arrow"}[format]
    assert sorted(p.name for p in destination.iterdir()) == sorted(
        [MANIFEST] + [f"{cid}_{tt}.{suffix}" for cid, tt in STREAMS])
    manifest = json.loads((destination / MANIFEST).read_text())
    assert report.manifest == destination / MANIFEST and report.rows == manifest["rows"]
    assert manifest["manifest_version"] == 1 and manifest["ibstream_version"] == "0.1.0"
    assert manifest["range"] == {"start": "2025-01-10T13:45:00Z", "end": "2025-01-10T16:10:00Z",
                                 "bounds": "[start, end)"}
    assert manifest["format"] == format and manifest["source"] == str(recorded.data_root)
    assert manifest["streams"] == [{"contract_id": cid, "tick_type": tt} for cid, tt in STREAMS]
    assert manifest["rows"] == sum(t.num_rows for t in expected.values())
    for entry, (cid, tt) in zip(manifest["files"], STREAMS, strict=True):
        path = destination / entry["path"]
        want = expected[cid, tt]
        got = read_back(path, format, tt)
        assert got.equals(want), (cid, tt)
        if format != "csv":
            frame = pl.read_parquet(path) if format == "parquet" else pl.read_ipc(path)
            assert_frame_equal(frame, pl.from_arrow(want))
        else:  # polars reads it exactly with the manifest's types
            assert_frame_equal(pl.read_csv(path, schema=pl.from_arrow(want).schema), pl.from_arrow(want))
        ts = want.column("ts").cast(pa.int64())
        assert entry == {
            "path": f"{cid}_{tt}.{suffix}", "format": format, "contract_id": cid, "tick_type": tt,
            "rows": want.num_rows, "first_ts": iso(ts[0].as_py()), "last_ts": iso(ts[-1].as_py()),
            "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "schema": [{"name": f.name, "type": str(f.type), "nullable": False} for f in schema_for(tt)],
            "coverage": [{"status": r["status"], "reason": r["reason"], "start": iso(to_us(r["start"])),
                          "end": None if r["end"] is None else iso(to_us(r["end"])), "open": r["open"]}
                         for r in coverage[cid, tt]],
            "missing": entry["missing"],
            **({"csv": entry["csv"]} if format == "csv" else {}),
        }
    mnq_quotes, mnq_trades = manifest["files"][0], manifest["files"][1]
    assert [r["status"] for r in mnq_quotes["coverage"]] == ["recorded", "gap", "recorded"]
    assert mnq_quotes["missing"] == [{"start": "2025-01-10T15:10:00Z", "end": "2025-01-10T15:20:00Z"}]
    assert mnq_trades["coverage"] == [] and mnq_trades["missing"] == [{"start": "2025-01-10T13:45:00Z",
                                                                        "end": "2025-01-10T16:10:00Z"}]
    assert mnq_quotes["schema"][:2] == [{"name": "ts", "type": "timestamp[us, tz=UTC]", "nullable": False},
                                        {"name": "ib_time", "type": "timestamp[us, tz=UTC]", "nullable": False}]
    assert {"name": "bid_size", "type": "decimal128(18, 8)", "nullable": False} in mnq_quotes["schema"]


def test_csv_text_is_iso_utc_with_microseconds_and_exact_decimals(recorded, tmp_path):
    with Store(recorded, read_only=True) as store:
        export(store, tmp_path / "csv", [(CID, "last")], to_us(START), to_us(END), "csv")
        want = store.read(CID, "last", START, END)
    header, first = (tmp_path / "csv" / f"{CID}_last.csv").read_text().splitlines()[:2]
    assert header == '"ts","ib_time","price","size","exchange","special_conditions","past_limit","unreported"'
    row = first.split(",")
    assert row[0] == '"' + want.column("ts")[0].as_py().strftime("%Y-%m-%dT%H:%M:%S.%fZ") + '"'  # text is quoted
    assert row[1].endswith('.000000Z"')  # IB's whole second
    assert row[3] == str(want.column("size")[0].as_py()) and len(row[3].split(".")[1]) == 8  # Decimal text
    assert row[6] in ("true", "false")


@pytest.mark.parametrize("format", ["parquet", "csv", "arrow"])
def test_an_empty_range_writes_the_columns_and_no_rows(recorded, tmp_path, format):
    with Store(recorded, read_only=True) as store:
        report = export(store, tmp_path / "e", [(CID, "bid_ask")], to_us(utc(2025, 1, 9)), to_us(utc(2025, 1, 9, 1)),
                        format)
    (entry,) = json.loads(report.manifest.read_text())["files"]
    assert (entry["rows"], entry["first_ts"], entry["last_ts"]) == (0, None, None)
    assert entry["missing"] == [{"start": "2025-01-09T00:00:00Z", "end": "2025-01-09T01:00:00Z"}]
    got = read_back(tmp_path / "e" / entry["path"], format, "bid_ask")
    assert got.num_rows == 0 and got.schema.equals(schema_for("bid_ask"))


def test_files_are_written_batch_by_batch(recorded, tmp_path, monkeypatch):
    """Parquet row groups of a bounded size and the planner's batches in the IPC file: the range is
    never one table in memory."""
    monkeypatch.setattr(export_module, "PARQUET_ROW_GROUP_ROWS", 4_000)
    seen: list[tuple[str, int, int]] = []

    def progress(items, description, total):
        rows = 0
        for batch in items:
            rows += len(batch)
            yield batch
        seen.append((description, total, rows))

    with Store(recorded, read_only=True) as store:
        export(store, tmp_path / "p", [(CID, "bid_ask")], to_us(START), to_us(END), "parquet", progress)
        export(store, tmp_path / "a", [(CID, "bid_ask")], to_us(START), to_us(END), "arrow")
        estimated = store.plan(CID, "bid_ask", to_us(START), to_us(END)).estimated_rows()
        rows = store.read(CID, "bid_ask", START, END).num_rows
    assert seen == [(f"exporting {CID}/bid_ask", estimated, rows)] and estimated >= rows
    groups = pq.ParquetFile(tmp_path / "p" / f"{CID}_bid_ask.parquet").metadata
    assert groups.num_row_groups >= rows // 8_000 and all(
        groups.row_group(i).num_rows < 4_000 + recorded.batch_rows for i in range(groups.num_row_groups))
    with pa.memory_map(str(tmp_path / "a" / f"{CID}_bid_ask.arrow")) as source:
        assert pa.ipc.open_file(source).num_record_batches > 1


def test_a_failed_write_leaves_no_file_and_no_manifest(recorded, tmp_path, monkeypatch):
    def broken(path, schema, batches):
        path.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setitem(export_module._WRITERS, "csv", broken)
    with Store(recorded, read_only=True) as store, pytest.raises(OSError, match="No space"):
        export(store, tmp_path / "x", STREAMS, to_us(START), to_us(END), "csv")
    assert list((tmp_path / "x").iterdir()) == []


def test_a_non_empty_destination_is_refused(recorded, tmp_path):
    destination = tmp_path / "export"
    destination.mkdir()
    (destination / "notes.txt").write_text("mine")
    with Store(recorded, read_only=True) as store:
        with pytest.raises(InvalidRequestError, match=r"export destination .*export is not empty \(it holds notes.txt"
                                                      r"\); name a new or empty folder"):
            export(store, destination, STREAMS, to_us(START), to_us(END))
        with pytest.raises(InvalidRequestError, match="is a file, not a folder"):
            export(store, destination / "notes.txt", STREAMS, to_us(START), to_us(END))
        with pytest.raises(InvalidRequestError, match="start 2025-01-10T16:10:00Z is not before end"):
            export(store, tmp_path / "new", STREAMS, to_us(END), to_us(START))
    assert [p.name for p in destination.iterdir()] == ["notes.txt"] and not (tmp_path / "new").exists()


def test_an_expired_range_is_an_error_naming_the_stream_and_writes_nothing(tmp_path):
    settings = Settings(data_root=tmp_path / "data", rotation_interval=timedelta(minutes=5),
                        archive_delay=timedelta(0), fsync="none", retention=(RetentionRule(ticks_days=1),))
    with Store(settings) as store:
        append_in_batches(store, ticks(utc(2025, 1, 10, 13, 30), 30_000, rate_scale=0.25))
        append_in_batches(store, market(AAPL, "bid_ask", utc(2025, 1, 10, 15), utc(2025, 1, 10, 16), 0.5),
                          contract_id=AAPL.contract_id)
        store.archive(now=utc(2025, 1, 10, 15, 30))
        store.prune(utc(2025, 1, 11, 15))  # hours 13 and 14 expire
    destination = tmp_path / "export"
    with Store(settings, read_only=True) as store:
        with pytest.raises(ExpiredDataError, match=r"^the raw ticks of 711280073/bid_ask from 2025-01-10T13:00:00Z "
                                                   r"to 2025-01-10T15:00:00Z expired .* or start at 2025-01-10T15:00:00Z "
                                                   r"or later; or leave 711280073/bid_ask out of the export$"):
            export(store, destination, [(AAPL.contract_id, "bid_ask"), (CID, "bid_ask")],
                   to_us(utc(2025, 1, 10, 13)), to_us(utc(2025, 1, 10, 16)))
        assert not destination.exists()
        later = export(store, destination, [(CID, "bid_ask")], to_us(utc(2025, 1, 10, 15)),
                       to_us(utc(2025, 1, 10, 16)))  # after the expired hours: fine
        assert later.rows == store.read(CID, "bid_ask", utc(2025, 1, 10, 15), utc(2025, 1, 10, 16)).num_rows > 0


def test_missing_spans_merge_gaps_damage_and_the_unconfirmed_end():
    def table(*rows):
        return pa.table({"status": [r[0] for r in rows], "start": pa.array([r[1] for r in rows], pa.int64()).cast(
            pa.timestamp("us", tz="UTC")), "end": pa.array([r[2] for r in rows], pa.int64()).cast(
            pa.timestamp("us", tz="UTC"))})

    assert missing_spans(table(("recorded", 0, 10), ("gap", 10, 20), ("recorded", 20, 30), ("damaged", 25, 27)),
                         5, 40) == [(10, 20), (25, 27), (30, 40)]
    assert missing_spans(table(("recorded", 0, 100), ("gap", 100, None)), 5, 40) == []
    assert missing_spans(table(("gap", 0, None)), 5, 40) == [(5, 40)]
    assert missing_spans(table(("recorded", 0, 10), ("recorded", 8, 20), ("damaged", 15, 50)), 0, 40) == [(15, 40)]


def test_iso_text_is_arrow_strftime_to_the_microsecond():
    import numpy as np
    import pyarrow.compute as pc

    from ibstream.core.times import MAX_US
    from ibstream.storage.export import iso_text

    edges = [0, 1, MAX_US, to_us(utc(2000, 2, 29)) - 1, to_us(utc(2000, 2, 29)), to_us(utc(2100, 3, 1)) - 1,
             to_us(utc(2024, 12, 31, 23, 59, 59, 999_999)), to_us(utc(2025, 1, 10, 14, 30, 0, 1))]
    values = np.concatenate([np.random.default_rng(7).integers(0, MAX_US, 200_000), edges])
    ts = pa.array(values, pa.timestamp("us", tz="UTC"))
    text = iso_text(ts)
    text.validate(full=True)
    assert text.equals(pc.strftime(ts, format="%Y-%m-%dT%H:%M:%SZ"))
    assert text[-1].as_py() == "2025-01-10T14:30:00.000001Z" and text[-len(edges)].as_py() == "1970-01-01T00:00:00.000000Z"
    assert iso_text(ts.slice(0, 0)).to_pylist() == []
