"""Continuous futures over Flight: ``MNQ.c.0`` stitches the expiries by the recorded roll schedule."""

from __future__ import annotations

import json
from dataclasses import replace
from urllib.error import HTTPError
from urllib.parse import urlencode
from urllib.request import urlopen

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from ibstream.core.continuous import Continuous
from ibstream.core.errors import InvalidRequestError, NotFoundError
from ibstream.core.times import to_us
from ibstream.flight_server.commands import command
from ibstream.http_gateway import HttpGateway
from ibstream.storage.index import ContractDetails
from ibstream.storage.synthetic import MNQ, synthetic_ticks
from tests.helpers import Served, append_in_batches, between, utc

DEC, MAR, JUN = 711280073, 730283085, 750150186
START, ROLL, END = utc(2026, 12, 10, 22), utc(2026, 12, 10, 23), utc(2026, 12, 11, 0)


def details(contract_id: int, local_symbol: str, expiry: str) -> ContractDetails:
    return ContractDetails(contract_id=contract_id, symbol="MNQ", sec_type="FUT", exchange="CME", primary_exchange="",
                           currency="USD", local_symbol=local_symbol, trading_class="MNQ", last_trade_date=expiry,
                           multiplier="2", min_tick=0.25, long_name="Micro E-Mini Nasdaq-100 Index",
                           time_zone="US/Central", trading_hours="", liquid_hours="", updated_at_us=0)


@pytest.fixture
def rolled(store):
    """Dec and Mar recorded over the same two hours (the overlap a roll subscribes); Mar is the front from ROLL."""
    recorded = {}
    for contract_id, level in ((DEC, 21_000.0), (MAR, 21_150.0)):
        market = replace(MNQ, contract_id=contract_id, start_price=level)
        for tick_type in ("bid_ask", "last"):
            table = between(synthetic_ticks(market, tick_type, to_us(START), 30_000, seed=contract_id % 97), START, END)
            append_in_batches(store, table, contract_id=contract_id)
            recorded[contract_id, tick_type] = table
    store.index.upsert_contract(details(DEC, "MNQZ6", "20261218"))
    store.index.upsert_contract(details(MAR, "MNQH7", "20270319"))
    store.record_roll("MNQ", DEC, to_us(utc(2026, 12, 1)))
    store.record_roll("MNQ", MAR, to_us(ROLL))
    store.record_roll("MNQ", JUN, to_us(utc(2027, 3, 11)))  # planned, nothing stored yet
    served = Served(store)
    yield served, recorded
    served.close()


def tagged(table: pa.Table, contract_id: int, local_symbol: str) -> pa.Table:
    table = table.add_column(0, "local_symbol", pa.array([local_symbol] * table.num_rows, pa.string()))
    return table.add_column(0, pa.field("contract_id", pa.int64(), nullable=False),
                            pa.array([contract_id] * table.num_rows, pa.int64()))


def test_the_front_contract_is_stitched_at_the_roll_with_each_rows_expiry(rolled):
    served, recorded = rolled
    got = served.client.tables("MNQ.c.0", ["bid_ask", "last"], START, END)
    for tick_type in ("bid_ask", "last"):
        expected = pa.concat_tables([tagged(between(recorded[DEC, tick_type], START, ROLL), DEC, "MNQZ6"),
                                     tagged(between(recorded[MAR, tick_type], ROLL, END), MAR, "MNQH7")])
        assert got[tick_type].replace_schema_metadata(None).equals(expected.replace_schema_metadata(None))
    frame = served.client.ticks("MNQ.c.0", "last", START, END)
    assert frame.columns[:3] == ["contract_id", "local_symbol", "ts"]
    assert frame.get_column("local_symbol").unique(maintain_order=True).to_list() == ["MNQZ6", "MNQH7"]


def test_the_next_expiry_is_rank_one(rolled):
    served, recorded = rolled
    got = served.client.tables("MNQ.c.1", "bid_ask", START, END)["bid_ask"]
    # Mar is c.1 while Dec is the front; from ROLL c.1 is Jun, of which nothing is stored
    expected = tagged(between(recorded[MAR, "bid_ask"], START, ROLL), MAR, "MNQH7")
    assert got.replace_schema_metadata(None).equals(expected.replace_schema_metadata(None))


def test_bars_across_a_roll_are_cut_there_and_say_their_expiry(rolled):
    served, recorded = rolled
    bars = served.client.bars("MNQ.c.0", "last", "1h", utc(2026, 12, 10, 22, 30), utc(2026, 12, 10, 23, 30))
    assert bars.select("contract_id", "local_symbol").rows() == [(DEC, "MNQZ6"), (MAR, "MNQH7")]
    assert bars.get_column("ts").dt.hour().to_list() == [22, 23]
    dec_trades = between(recorded[DEC, "last"], utc(2026, 12, 10, 22, 30), ROLL).num_rows
    mar_trades = between(recorded[MAR, "last"], ROLL, utc(2026, 12, 10, 23, 30)).num_rows
    assert bars.get_column("trade_count").to_list() == [dec_trades, mar_trades]


def test_plain_pyarrow_reads_the_endpoints_in_order(rolled):
    served, recorded = rolled
    with flight.connect(served.location) as plain:
        info = plain.get_flight_info(flight.FlightDescriptor.for_command(command("MNQ.c.0", "last", START, END)))
        assert [json.loads(e.ticket.ticket)["contract_id"] for e in info.endpoints] == [DEC, MAR]
        table = pa.concat_tables([plain.do_get(e.ticket).read_all() for e in info.endpoints])
    assert table.num_rows == between(recorded[DEC, "last"], START, ROLL).num_rows + \
        between(recorded[MAR, "last"], ROLL, END).num_rows
    assert pc.unique(table.column("contract_id")).to_pylist() == [DEC, MAR]


def test_the_rolls_action_lists_the_schedule(rolled):
    served, _ = rolled
    rolls = served.client.rolls("MNQ")
    assert rolls.select("contract_id", "local_symbol", "last_trade_date").rows() == [
        (DEC, "MNQZ6", "20261218"), (MAR, "MNQH7", "20270319"), (JUN, None, None)]
    assert rolls.get_column("end").to_list()[:2] == [ROLL, utc(2027, 3, 11)]
    assert rolls.get_column("end").to_list()[2] is None
    with pytest.raises(NotFoundError, match=r"no roll schedule for 'ES' \(roots with one: MNQ\)"):
        served.client.rolls("ES")


@pytest.mark.parametrize("text", ["MNQ", "MNQ.c.x", "mnq.c.0", "MNQ.c.10", "MNQ.v.0", "", "M" * 40 + ".c.0"])
def test_a_malformed_continuous_contract_is_refused_with_the_syntax(text):
    with pytest.raises(InvalidRequestError, match=r"is not ROOT\.c\.N with N from 0 to 9; use e\.g\. MNQ\.c\.0"):
        Continuous.parse(text)


def test_continuous_queries_refuse_what_follows_one_expiry(rolled):
    served, _ = rolled
    with pytest.raises(InvalidRequestError, match="sessions, live streams and cursors follow one expiry"):
        served.client.ticks("MNQ.c.0", "last", session="regular")
    with pytest.raises(NotFoundError, match="no roll schedule for 'ES'"):
        served.client.ticks("ES.c.0", "last", START, END)
    with pytest.raises(NotFoundError, match=r"MNQ.c.0 has nothing stored over \[2027-04-01T00:00:00Z, 2027-04-02T"):
        served.client.ticks("MNQ.c.0", "last", utc(2027, 4, 1), utc(2027, 4, 2))  # Jun: planned, not recorded
    with pytest.raises(NotFoundError, match=r"MNQ.c.1 has no contract over .* names 3 expiries; rank 1 is past the "
                                            "last one known"):
        served.client.ticks("MNQ.c.1", "last", utc(2027, 4, 1), utc(2027, 4, 2))


def test_the_http_gateway_serves_a_continuous_contract(rolled, store):
    served, recorded = rolled
    gateway = HttpGateway(served.server.queries, store.settings).start()
    try:
        query = urlencode({"tick_types": "last", "start": START.isoformat(), "end": END.isoformat(), "format": "arrow"})
        with urlopen(f"{gateway.url}/v2/historical/MNQ.c.0?{query}") as reply:
            table = pa.ipc.open_stream(reply.read()).read_all()
        assert table.column_names[:4] == ["tick_type", "contract_id", "local_symbol", "ts"]
        assert pc.unique(table.column("contract_id")).to_pylist() == [DEC, MAR]
        assert table.num_rows == between(recorded[DEC, "last"], START, ROLL).num_rows + \
            between(recorded[MAR, "last"], ROLL, END).num_rows
        with pytest.raises(HTTPError) as refused:
            urlopen(f"{gateway.url}/v2/historical/MNQ.c.x?tick_types=last&window=1h")
        assert refused.value.code == 400 and "is not ROOT.c.N" in refused.value.read().decode()
    finally:
        gateway.stop()


def test_a_front_recorded_again_after_a_restart_continues_its_piece():
    fronts = [(0, DEC), (50, DEC), (100, MAR), (200, JUN)]
    assert Continuous.parse("MNQ.c.0").pieces(fronts, 10, 300) == [(DEC, 10, 100), (MAR, 100, 200), (JUN, 200, 300)]
    assert Continuous.parse("MNQ.c.1").pieces(fronts, 10, 300) == [(MAR, 10, 100), (JUN, 100, 200)]
    assert Continuous.parse("MNQ.c.2").pieces(fronts, 10, 300) == [(JUN, 10, 100)]
