"""`ibstream import`: an IB-Stream storage root (v3 JSON + protobuf) into the store, checked against what
IB delivered (the fixture's delivered.jsonl), idempotent, resumable after a kill, never counting a tick twice."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ibstream.core.errors import InvalidRequestError
from ibstream.core.times import US_PER_HOUR, to_us
from ibstream.storage import Store
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import ENV, EXIT_CODE
from ibstream.storage.ib_stream_import import (
    IMPORT_REASON,
    SKIP_OURS_ARCHIVED,
    SKIP_OURS_BUFFERED,
    SKIP_RECORDED,
    decode_tick_message,
    encode_tick_message,
    import_ib_stream,
    size_units,
    write_ib_stream_v3,
)
from ibstream.storage.schemas import schema_for
from tests.helpers import EVERYTHING, ROOT, ibstream, utc

FIXTURE = Path("/work/shared/fixtures/ib-stream-v3")
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason="the IB-Stream fixture is not on this machine")
MNQ, AAPL = 711280073, 265598
STREAMS = [(cid, tt) for cid in (MNQ, AAPL) for tt in ("bid_ask", "last", "all_last", "mid_point")]
HOUR_13, HOUR_14 = to_us(utc(2025, 12, 1, 13)), to_us(utc(2025, 12, 1, 14))
# what IB delivered per stream in the fixture (delivered.jsonl), and what v3 lets us import of it
DELIVERED_COUNTS = {(MNQ, "bid_ask"): 5074, (MNQ, "last"): 1039, (MNQ, "all_last"): 1471, (MNQ, "mid_point"): 2004,
                    (AAPL, "bid_ask"): 1899, (AAPL, "last"): 385, (AAPL, "all_last"): 557, (AAPL, "mid_point"): 775}
IMPORTED_COUNTS = {key: 0 if key[1] == "mid_point" else n for key, n in DELIVERED_COUNTS.items()}
# v3 never stored these: the import stores '' / '' / false instead, under coverage reason IMPORT_REASON
NEVER_STORED = {"last": ("exchange", "special_conditions", "past_limit"),
                "all_last": ("exchange", "special_conditions", "past_limit"),
                "mid_point": ("mid_point",), "bid_ask": ()}
IMPORTER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from pathlib import Path
    from ibstream.storage import Store
    from ibstream.storage.config import StorageSettings
    from ibstream.storage.ib_stream_import import import_ib_stream

    with Store(StorageSettings(data_root=Path({data!r}))) as store:
        import_ib_stream(store, Path({source!r}))
""")


def delivered() -> list[dict]:
    with open(FIXTURE / "delivered.jsonl") as handle:
        return [json.loads(line) for line in handle]


def settings_at(root: Path, **extra) -> StorageSettings:
    return StorageSettings(**({"data_root": root, "rotation_interval": timedelta(minutes=15),
                                "archive_delay": timedelta(0)} | extra))


def expected_rows(cid: int, tick_type: str) -> list[dict]:
    """delivered.jsonl's ticks of a stream as our rows would hold them, less what v3 never stored."""
    rows = []
    for d in delivered():
        if (d["contract_id"], d["tick_type"]) != (cid, tick_type):
            continue
        row = {"ts": d["receive_us"], "ib_time": d["ib_time"] * 1_000_000}
        if tick_type == "bid_ask":
            row |= {"bid_price": d["bid_price"], "ask_price": d["ask_price"], "bid_size": Decimal(d["bid_size"]),
                    "ask_size": Decimal(d["ask_size"]), "bid_past_low": d["bid_past_low"],
                    "ask_past_high": d["ask_past_high"]}
        elif tick_type in ("last", "all_last"):
            row |= {"price": d["price"], "size": Decimal(d["size"]), "unreported": d["unreported"],
                    "exchange": "", "special_conditions": "", "past_limit": False}  # v3: never stored
        else:
            continue  # v3 keeps no mid-point price: nothing is imported
        rows.append(row)
    return sorted(rows, key=lambda r: r["ts"])  # (arrival order is receive order in the fixture)


def stored_rows(store: Store, cid: int, tick_type: str) -> list[dict]:
    table = store.read(cid, tick_type, *EVERYTHING)
    table = table.set_column(0, "ts", table.column("ts").cast(pa.int64())).set_column(
        1, "ib_time", table.column("ib_time").cast(pa.int64()))
    return table.to_pylist()


def state(store: Store) -> dict:
    """Everything an import leaves in a store that a reader can see."""
    index = store.index
    return {
        "ticks": {key: store.read(*key, *EVERYTHING) for key in STREAMS},
        "coverage": {key: store.coverage(*key, *EVERYTHING).to_pylist() for key in STREAMS},
        "archives": sorted((e.contract_id, e.tick_type, e.hour_start_us, e.start_us, e.end_us, e.file_path, e.tick_count)
                           for e in index.archives_all()),
        "statistics": {cid: store.statistics(cid) for cid in (MNQ, AAPL)},
        "bars": {key: store.bars(key[0], key[1], HOUR_13, HOUR_14 + US_PER_HOUR, "1m") for key in STREAMS
                 if key[1] != "mid_point"},
    }


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The fixture imported once into a new store: (settings, report)."""
    settings = settings_at(tmp_path_factory.mktemp("imported") / "data")
    with Store(settings) as store:
        report = import_ib_stream(store, FIXTURE)
    return settings, report


# -- the fixture against what IB delivered ---------------------------------------------------------

def test_fixture_import_equals_what_ib_delivered_except_what_v3_never_stored(imported):
    settings, report = imported
    assert Counter((d["contract_id"], d["tick_type"]) for d in delivered()) == DELIVERED_COUNTS
    with Store(settings, read_only=True) as store:
        for cid, tick_type in STREAMS:
            rows = stored_rows(store, cid, tick_type)
            assert len(rows) == IMPORTED_COUNTS[(cid, tick_type)], (cid, tick_type)
            assert rows == expected_rows(cid, tick_type), (cid, tick_type)  # field by field, in order
    assert {(k.contract_id, k.tick_type.value): s.imported for k, s in report.streams.items()} == IMPORTED_COUNTS
    assert report.imported == 10_425 and report.hours == 12  # 6 streams x hours 13 and 14
    assert (report.json_files, report.protobuf_files) == (16, 16)
    assert (report.compared, report.disagreements, report.only_json, report.only_protobuf) == (13_204, 0, 0, 0)
    assert sum(s.sizes_rounded for s in report.streams.values()) == 0  # every size exact (incl. AAPL's 0.5)


def test_what_v3_never_stored_is_what_the_import_leaves_out(imported):
    """The only differences from delivered.jsonl: trades' exchange, special conditions and past-limit,
    and every mid-point price (IB-Stream writes `midpoint`, its v3 mapper reads `mid_point`)."""
    trades = [d for d in delivered() if d["tick_type"] in ("last", "all_last")]
    assert {d["exchange"] for d in trades} == {"CME", "NASDAQ", "ARCA", "IEX", "DARK"}  # lost: stored as ''
    assert {d["special_conditions"] for d in trades} == {"", "I", " T"}
    assert sum(d["past_limit"] for d in trades) == 42  # lost: stored as false
    mids = [d for d in delivered() if d["tick_type"] == "mid_point"]
    assert len(mids) == 2779 and all(isinstance(d["mid_point"], float) for d in mids)  # lost: not imported
    _, report = imported
    assert {(k.contract_id, k.tick_type.value): s.skipped for k, s in report.streams.items() if s.skipped} == {
        (MNQ, "mid_point"): Counter({"mid-point without a price (IB-Stream's v3 loses it)": 2004}),
        (AAPL, "mid_point"): Counter({"mid-point without a price (IB-Stream's v3 loses it)": 775})}
    lines = report.lines()
    assert "mid-points without a price: 2,779 records not imported (IB-Stream's v3 loses the price; none is " \
           "invented)" in lines
    assert any(line.startswith("trades: v3 keeps no exchange") and IMPORT_REASON in line for line in lines)


def test_imported_hours_are_marked_in_coverage_and_in_the_files(imported):
    settings, _ = imported
    with Store(settings, read_only=True) as store:
        for cid, tick_type in STREAMS:
            coverage = store.coverage(cid, tick_type, *EVERYTHING).to_pylist()
            if tick_type == "mid_point":
                assert coverage == []
                continue
            ts = store.read(cid, tick_type, *EVERYTHING).column("ts").cast(pa.int64()).to_pylist()
            by_hour = [[t for t in ts if t // US_PER_HOUR * US_PER_HOUR == hour] for hour in (HOUR_13, HOUR_14)]
            assert [(r["status"], r["reason"], to_us(r["start"]), to_us(r["end"])) for r in coverage] == [
                ("recorded", IMPORT_REASON, hour[0], hour[-1] + 1) for hour in by_hour]
        entries = store.index.archives_all()
        assert len(entries) == 12
        for entry in entries:
            facts = json.loads(pq.read_metadata(settings.archive_root / entry.file_path).metadata[b"ibstream.archive"])
            source = facts["source"]
            assert (source["kind"], source["root"], source["copy"], source["cross_checked"]) == (
                "ib_stream_v3", str(FIXTURE), "json", "protobuf")
            trades = entry.tick_type in ("last", "all_last")
            assert source["missing_fields"] == (["exchange", "past_limit", "special_conditions"] if trades else [])
            assert facts["coverage"][0][:2] == ["recorded", IMPORT_REASON]
        statistics = {(s.tick_type, s.date): s.total_ticks for s in store.statistics(MNQ)}
        assert statistics == {("bid_ask", "2025-12-01"): 5074, ("last", "2025-12-01"): 1039,
                              ("all_last", "2025-12-01"): 1471}
        bars = store.bars(MNQ, "last", HOUR_13, HOUR_14 + US_PER_HOUR, "1h")
        assert bars.column("trade_count").to_pylist() == [517, 522]  # the hours' 1-minute bars, rolled up


# -- idempotent, resumable -------------------------------------------------------------------------

def test_a_second_import_adds_nothing_and_says_so(imported, tmp_path):
    settings, _ = imported
    copy = tmp_path / "data"
    shutil.copytree(settings.data_root, copy)
    with Store(settings_at(copy)) as store:
        before = state(store)
        again = import_ib_stream(store, FIXTURE)
        assert state(store) == before
    assert again.imported == 0 and again.hours == 0
    assert {(k.contract_id, k.tick_type.value): (s.already_imported_hours, s.already_imported_ticks)
            for k, s in again.streams.items() if s.already_imported_hours} == {
        key: (2, n) for key, n in IMPORTED_COUNTS.items() if n}
    assert "nothing new imported: the hours found were imported before (or are skipped as listed)" in again.lines()
    assert any(line.startswith("  711280073/bid_ask: imported 0 ticks of 5,074 records; 2 hours (5,074 ticks) "
                               "imported before") for line in again.lines())


@pytest.mark.parametrize("point", ["archive.after_write_tmp", "archive.after_rename", "archive.after_publish",
                                   "import.after_stream"])
def test_an_import_killed_midway_then_resumed_ends_equal_to_an_uninterrupted_one(imported, tmp_path, point):
    settings = settings_at(tmp_path / "data")
    code = IMPORTER.format(root=str(ROOT), data=str(settings.data_root), source=str(FIXTURE))
    killed = subprocess.run([sys.executable, "-c", code], env={**os.environ, ENV: point}, cwd=ROOT, timeout=120,
                            capture_output=True, text=True)
    assert killed.returncode == EXIT_CODE, killed.stderr
    with Store(settings, read_only=True) as reader:  # what a reader sees meanwhile: whole hours only
        for cid, tick_type in STREAMS:
            table = reader.read(cid, tick_type, *EVERYTHING)
            hours = {t // US_PER_HOUR * US_PER_HOUR for t in table.column("ts").cast(pa.int64()).to_pylist()}
            expected = expected_rows(cid, tick_type)
            assert table.num_rows == sum(1 for r in expected if r["ts"] // US_PER_HOUR * US_PER_HOUR in hours)
    with Store(settings) as store:  # recovery, then the import continues
        resumed = import_ib_stream(store, FIXTURE)
        finished = state(store)
    reference_settings, reference = imported
    with Store(reference_settings, read_only=True) as reference_store:
        assert finished == state(reference_store)
    assert resumed.imported + sum(s.already_imported_ticks for s in resumed.streams.values()) == reference.imported
    assert not (settings.data_root / "quarantine").exists()


# -- the two copies ----------------------------------------------------------------------------------

def _rewrite_protobuf(path: Path, change) -> None:
    data, out, pos = path.read_bytes(), bytearray(), 0
    records = []
    while pos < len(data):
        (size,) = struct.unpack_from(">I", data, pos)
        records.append(decode_tick_message(data[pos + 4:pos + 4 + size]))
        pos += 4 + size
    for record in change(records):
        message = encode_tick_message(record)
        out += struct.pack(">I", len(message)) + message
    path.write_bytes(bytes(out))


MNQ_LAST_14 = "2025/12/01/14/711280073_last_1764597600"


def test_a_disagreement_between_the_copies_is_reported_and_the_json_copy_kept(tmp_path):
    source = tmp_path / "ib-stream"
    shutil.copytree(FIXTURE, source)

    def alter(records):
        records[10] = records[10] | {"p": records[10]["p"] + 0.25}
        return records

    _rewrite_protobuf(source / f"v3/protobuf/{MNQ_LAST_14}.pb", alter)
    with Store(settings_at(tmp_path / "data")) as store:
        report = import_ib_stream(store, source)
        rows = stored_rows(store, MNQ, "last")
    assert (report.compared, report.disagreements, report.only_json, report.only_protobuf) == (13_204, 1, 0, 0)
    assert rows == expected_rows(MNQ, "last")  # the JSON copy's price
    [example] = report.examples["disagreement"]
    assert example.startswith("711280073_last hour 2025-12-01T14Z record 11: JSON {")
    assert "copies: 13,204 records in both, 1 disagree (the JSON copy kept), 0 only in JSON, 0 only in protobuf " \
           "(imported once)" in report.lines()


def test_a_record_one_copy_lost_is_imported_once_and_a_missing_copy_is_read_from_the_other(tmp_path):
    source = tmp_path / "ib-stream"
    shutil.copytree(FIXTURE, source)
    _rewrite_protobuf(source / f"v3/protobuf/{MNQ_LAST_14}.pb", lambda records: records[:5] + records[6:])
    json_path = source / f"v3/json/{MNQ_LAST_14.replace('last', 'all_last', 1)}.jsonl"
    lines = json_path.read_text().splitlines(keepends=True)
    json_path.write_text("".join(lines[:-1]) + lines[-1][:20])  # a torn last line: the protobuf copy has it
    (source / "v3/json/2025/12/01/13/265598_bid_ask_1764594000.jsonl").unlink()  # AAPL quotes: protobuf only
    with Store(settings_at(tmp_path / "data")) as store:
        report = import_ib_stream(store, source)
        for cid, tick_type in STREAMS:
            assert stored_rows(store, cid, tick_type) == expected_rows(cid, tick_type), (cid, tick_type)
    assert (report.only_json, report.only_protobuf, report.unreadable) == (1, 1, Counter({"json": 1}))
    assert (report.json_files, report.protobuf_files) == (15, 16)


# -- side by side with our own recorder ---------------------------------------------------------------

def test_hours_this_store_recorded_beside_ib_stream_count_nothing_twice(tmp_path):
    """Our recorder archived MNQ quotes' hour 13 (with a gap in it) and buffered part of hour 14 of MNQ
    trades; its recorded coverage spans AAPL quotes 14:05-14:06 where it stored no tick."""
    settings = settings_at(tmp_path / "data")
    ours = [r for r in expected_rows(MNQ, "bid_ask") if r["ts"] < HOUR_14][::2]  # every other tick of hour 13
    ours_trades = [r for r in expected_rows(MNQ, "last") if r["ts"] >= HOUR_14][:50]
    quiet = (to_us(utc(2025, 12, 1, 14, 5)), to_us(utc(2025, 12, 1, 14, 6)))
    with Store(settings) as store:
        store.append(MNQ, "bid_ask", pa.Table.from_pylist(ours, schema=schema_for("bid_ask")))
        store.archive(now=utc(2025, 12, 1, 14, 30))  # hour 13 archived by us
        store.append(MNQ, "last", pa.Table.from_pylist(ours_trades, schema=schema_for("last")))  # buffered
        from ibstream.storage.index import CoverageInterval

        start_13 = ours[0]["ts"]
        store.index.add_coverage([
            CoverageInterval(MNQ, "bid_ask", "recorded", "subscribed", start_13, start_13 + 120_000_000, False),
            CoverageInterval(MNQ, "bid_ask", "gap", "disconnected", start_13 + 120_000_000, HOUR_14, False),
            CoverageInterval(AAPL, "bid_ask", "recorded", "subscribed", *quiet, False)])
        report = import_ib_stream(store, FIXTURE)
        quotes = stored_rows(store, MNQ, "bid_ask")
        trades = stored_rows(store, MNQ, "last")
        aapl = stored_rows(store, AAPL, "bid_ask")
        aapl_coverage = [(r["status"], r["reason"], to_us(r["start"]), to_us(r["end"]))
                         for r in store.coverage(AAPL, "bid_ask", *EVERYTHING).to_pylist()]
    every = expected_rows(MNQ, "bid_ask")
    assert quotes == ours + [r for r in every if r["ts"] >= HOUR_14]  # hour 13 ours alone, hour 14 imported
    mnq_quotes = report.streams[next(k for k in report.streams if (k.contract_id, k.tick_type.value) == (MNQ,
                                                                                                          "bid_ask"))]
    in_13 = sum(1 for r in every if r["ts"] < HOUR_14)
    assert mnq_quotes.skipped == Counter({SKIP_OURS_ARCHIVED: in_13})
    in_gap = sum(1 for r in every if start_13 + 120_000_000 <= r["ts"] < HOUR_14 or r["ts"] < start_13)
    assert mnq_quotes.in_our_gaps == in_gap
    every_trade = expected_rows(MNQ, "last")
    assert trades == [r for r in every_trade if r["ts"] < HOUR_14] + ours_trades  # hour 14 stays ours (buffered)
    mnq_trades = next(s for k, s in report.streams.items() if (k.contract_id, k.tick_type.value) == (MNQ, "last"))
    assert mnq_trades.skipped == Counter({SKIP_OURS_BUFFERED: sum(1 for r in every_trade if r["ts"] >= HOUR_14)})
    every_aapl = expected_rows(AAPL, "bid_ask")
    assert aapl == [r for r in every_aapl if not quiet[0] <= r["ts"] < quiet[1]]
    aapl_report = next(s for k, s in report.streams.items() if (k.contract_id, k.tick_type.value) == (AAPL, "bid_ask"))
    inside = sum(1 for r in every_aapl if quiet[0] <= r["ts"] < quiet[1])
    assert inside > 0 and aapl_report.skipped == Counter({SKIP_RECORDED: inside})
    first_14 = next(r["ts"] for r in aapl if r["ts"] >= HOUR_14)
    assert aapl_coverage == [
        ("recorded", IMPORT_REASON, every_aapl[0]["ts"], max(r["ts"] for r in aapl if r["ts"] < HOUR_14) + 1),
        ("recorded", IMPORT_REASON, first_14, quiet[0]),
        ("recorded", "subscribed", *quiet),
        ("recorded", IMPORT_REASON, quiet[1], aapl[-1]["ts"] + 1)]
    text = "\n".join(report.lines())
    assert f"skipped {in_13:,}: {SKIP_OURS_ARCHIVED} ({in_gap:,} of them outside our recorded coverage, not merged" \
           in text


def test_hours_not_over_are_left_for_a_later_run(tmp_path):
    settings = settings_at(tmp_path / "data", archive_delay=timedelta(minutes=1))
    with Store(settings) as store:
        early = import_ib_stream(store, FIXTURE, contract_ids=[AAPL], now=to_us(utc(2025, 12, 1, 15, 0, 30)))
        assert early.imported == sum(1 for cid, tt in STREAMS if cid == AAPL
                                     for r in expected_rows(cid, tt) if r["ts"] < HOUR_14)
        later = import_ib_stream(store, FIXTURE, contract_ids=[AAPL], now=to_us(utc(2025, 12, 1, 15, 1)))
        for tick_type in ("bid_ask", "last", "all_last"):
            assert stored_rows(store, AAPL, tick_type) == expected_rows(AAPL, tick_type)
        assert store.read(MNQ, "bid_ask", *EVERYTHING).num_rows == 0  # --contract-id: only AAPL
    assert early.imported + later.imported == sum(n for (cid, _), n in IMPORTED_COUNTS.items() if cid == AAPL)


# -- order, sizes, mid-points, the decoder -------------------------------------------------------------

def test_ticks_are_ordered_by_receive_time_stably_across_files(tmp_path):
    """st may go backwards in a file and tie across the files of two IB hours; a tick of IB's hour 13
    received in hour 14 joins hour 14."""
    base = to_us(utc(2025, 12, 1, 14))
    rec = lambda ts_s, st, p: {"ts": ts_s * 1_000_000, "st": st, "cid": MNQ, "tt": "last", "rid": 1,  # noqa: E731
                               "p": p, "s": 1.0}
    write_ib_stream_v3(tmp_path / "root", [
        rec(base // 1_000_000 - 1, base + 500_000, 1.0), rec(base // 1_000_000 - 1, base + 300_000, 2.0),
        rec(base // 1_000_000, base + 300_000, 3.0), rec(base // 1_000_000, base + 100_000, 4.0),
        rec(base // 1_000_000 - 5, base - 10, 5.0)])
    with Store(settings_at(tmp_path / "data")) as store:
        report = import_ib_stream(store, tmp_path / "root")
        table = store.read(MNQ, "last", *EVERYTHING)
    assert table.column("price").to_pylist() == [5.0, 4.0, 2.0, 3.0, 1.0]
    assert table.column("ts").cast(pa.int64()).to_pylist() == [base - 10, base + 100_000, base + 300_000,
                                                                base + 300_000, base + 500_000]
    stream = next(iter(report.streams.values()))
    assert stream.hours == [base - US_PER_HOUR, base] and stream.reordered == 3  # each received before an earlier one


def test_sizes_become_exact_decimals_and_the_rest_are_reported():
    values = [1.0, 100.0, 0.5, 0.1, 1e-8, 1234567.12345678, 0.1 + 0.2, 123.456789012, float("nan"), 1e10, -2.0]
    units, exact, valid = size_units(values)
    assert valid.tolist() == [True] * 8 + [False, False, True]
    assert exact[valid].tolist() == [True, True, True, True, True, True, False, False, True]
    assert [Decimal(int(u)).scaleb(-8) for u in units[valid]] == [
        Decimal(v) for v in ("1", "100", "0.5", "0.1", "0.00000001", "1234567.12345678", "0.30000000", "123.45678901",
                             "-2")]


def test_an_odd_size_is_rounded_and_reported_and_a_priced_mid_point_is_imported(tmp_path):
    base = to_us(utc(2025, 12, 1, 14))
    write_ib_stream_v3(tmp_path / "root", [
        {"ts": base, "st": base + 1, "cid": AAPL, "tt": "all_last", "rid": 7, "p": 230.0, "s": 0.1 + 0.2},
        {"ts": base, "st": base + 2, "cid": AAPL, "tt": "all_last", "rid": 7, "p": 230.0, "s": float("inf")},
        {"ts": base, "st": base + 3, "cid": AAPL, "tt": "mid_point", "rid": 8, "mp": 230.005},
        {"ts": base, "st": base + 4, "cid": AAPL, "tt": "mid_point", "rid": 8}])
    (tmp_path / "root/v2/json/2025").mkdir(parents=True)
    (tmp_path / "root/v2/json/2025/stream_1.jsonl").write_text("{}\n")
    (tmp_path / "root/v3/json/notes.txt").write_text("hello")
    with Store(settings_at(tmp_path / "data")) as store:
        report = import_ib_stream(store, tmp_path / "root")
        trades = stored_rows(store, AAPL, "all_last")
        mids = stored_rows(store, AAPL, "mid_point")
    assert [r["size"] for r in trades] == [Decimal("0.30000000")]
    assert mids == [{"ts": base + 3, "ib_time": base, "mid_point": 230.005}]
    lines = report.lines()
    assert "      1 sizes not exact in decimal(18, 8): rounded to 8 decimals" in lines
    assert "      skipped 1: size no decimal(18, 8) holds (NaN, infinite or 10^10 and up)" in lines
    assert "      skipped 1: mid-point without a price (IB-Stream's v3 loses it)" in lines
    assert "v2: 1 files not imported (only v3 is; v2 files are by stream id and write time)" in lines
    assert any(line.startswith("unrecognised: 1 files under v3/") for line in lines)


def test_the_protobuf_decoder_reads_the_schema_and_skips_unknown_fields():
    # ts=1764597000000000 st=5 cid=265598 tt="last" rid=-3 p=1.5 upt=true, plus unknown field 30 (varint 9)
    message = bytes.fromhex("0880a4ed8ac49c9103") + bytes([0x10, 5, 0x18]) + bytes.fromhex("fe9a10") + \
        b"\x22\x04last" + bytes([0x28]) + b"\xfd" + b"\xff" * 8 + b"\x01" + b"\x51" + struct.pack("<d", 1.5) + \
        bytes([0xB0, 0x01, 1]) + bytes([0xF0, 0x01, 9])
    assert decode_tick_message(message) == {"ts": 1764597000000000, "st": 5, "cid": 265598, "tt": "last", "rid": -3,
                                            "p": 1.5, "upt": True}
    record = {"ts": 1764597000000000, "st": 1764597000016150, "cid": 711280073, "tt": "bid_ask", "rid": 9000,
              "bp": 20999.5, "bs": 45.0, "ap": 20999.75, "as": 2.0, "aph": True}
    assert decode_tick_message(encode_tick_message(record)) == record
    with pytest.raises(ValueError):
        decode_tick_message(b"\x51\x00\x00")  # a double cut short


def test_a_folder_that_is_no_ib_stream_root_is_refused_saying_what_was_expected(tmp_path):
    with Store(settings_at(tmp_path / "data")) as store:
        with pytest.raises(InvalidRequestError, match="is not an IB-Stream storage root .* expected an IB-Stream "
                                                      "storage root: the folder holding v3/json/YYYY/MM/DD/HH/"):
            import_ib_stream(store, tmp_path)
        with pytest.raises(InvalidRequestError, match="give the folder above it"):
            import_ib_stream(store, FIXTURE / "v3")


# -- the CLI ---------------------------------------------------------------------------------------

def test_cli_imports_with_a_summary_then_imports_nothing_twice(tmp_path):
    data = str(tmp_path / "data")
    dry = ibstream("import", str(FIXTURE), "--data-root", data, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[0] == (f"{FIXTURE}: read 16 JSON and 16 protobuf files; would import 10,425 ticks "
                                          "in 12 stream-hours")
    assert not (tmp_path / "data").exists()  # a dry run writes nothing
    done = ibstream("import", str(FIXTURE), "--data-root", data)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{FIXTURE}: read 16 JSON and 16 protobuf files; imported 10,425 ticks in 12 stream-hours"
    assert "  711280073/bid_ask: imported 5,074 ticks in 2 hours (2025-12-01T13Z .. 2025-12-01T14Z) of 5,074 " \
           "records" in lines
    assert "      skipped 2,004: mid-point without a price (IB-Stream's v3 loses it)" in lines
    assert "copies: 13,204 records in both, 0 disagree (the JSON copy kept), 0 only in JSON, 0 only in protobuf " \
           "(imported once)" in lines
    again = ibstream("import", str(FIXTURE), "--data-root", data)
    assert again.returncode == 0, again.stderr
    assert f"{FIXTURE}: read 16 JSON and 16 protobuf files; imported 0 ticks in 0 stream-hours" in again.stdout
    assert "nothing new imported" in again.stdout
    with Store(settings_at(tmp_path / "data"), read_only=True) as store:
        assert store.read(MNQ, "bid_ask", *EVERYTHING).num_rows == 5074


def test_cli_refuses_a_path_that_is_no_ib_stream_root_and_a_store_being_recorded(tmp_path):
    bad = ibstream("import", str(tmp_path), "--data-root", str(tmp_path / "data"))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"ibstream import: {tmp_path} is not an IB-Stream storage root")
    assert "expected an IB-Stream storage root: the folder holding v3/json/" in bad.stderr
    with Store(settings_at(tmp_path / "data")):  # a running recorder holds the writer lock
        locked = ibstream("import", str(FIXTURE), "--data-root", str(tmp_path / "data"))
    assert locked.returncode == 2 and locked.stderr.count("\n") == 1, locked.stderr
    assert "is already open for writing by another process" in locked.stderr
    assert "stop the recorder, import, then start it again (`ibstream import --dry-run` runs beside it)" in \
        locked.stderr
    help_text = ibstream("import", "--help")
    assert help_text.returncode == 0 and "Examples:\n  ibstream import /srv/ib-stream/storage" in help_text.stdout


def test_compacted_and_reindexed_imported_hours_keep_their_source(tmp_path):
    from ibstream.storage.maintenance import reindex

    settings = settings_at(tmp_path / "data")
    with Store(settings) as store:
        import_ib_stream(store, FIXTURE)
        before = {key: store.read(*key, *EVERYTHING) for key in STREAMS if key[1] != "mid_point"}
        assert store.compact(datetime(2025, 12, 3, tzinfo=UTC)).files_written == 6  # 6 streams' day of 2 hours
    settings.index_path.unlink()
    reindex(settings)
    with Store(settings) as store:
        assert {key: store.read(*key, *EVERYTHING) for key in before} == before
        for entry in store.index.archives_all():
            assert "/hour=all/day-" in entry.file_path
            facts = json.loads(pq.read_metadata(settings.archive_root / entry.file_path).metadata[b"ibstream.archive"])
            hour = next(h for h in facts["hours"] if h["hour_start_us"] == entry.hour_start_us)
            assert hour["source"]["kind"] == "ib_stream_v3" and hour["coverage"][0][1] == IMPORT_REASON
            assert [c.reason for c in store.index.coverage(entry.contract_id, entry.tick_type, entry.hour_start_us,
                                                          entry.hour_start_us + US_PER_HOUR)] == [IMPORT_REASON]
