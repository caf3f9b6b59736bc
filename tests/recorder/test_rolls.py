"""Futures rolls: the pure rule (``ibstream.core.rolls``) and a roll recorded through ibapi + the simulator."""

from __future__ import annotations

import time
from datetime import date, datetime, timedelta
from datetime import time as wall_time
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from pydantic import ValidationError

from ibstream.core import rolls
from ibstream.core.errors import InvalidConfigError
from ibstream.core.times import from_us, now_us, to_us
from ibstream.settings import ContractSpec, Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.market import futures_chain
from ibstream.storage.index import RollPiece
from tests.helpers import EVERYTHING, Served, between, wait_until
from tests.recorder.harness import Recording, ib_settings

CHICAGO = ZoneInfo("America/Chicago")
SECOND = 1_000_000


def utc_us(*args) -> int:
    return to_us(datetime(*args, tzinfo=ZoneInfo("UTC")))


# -- the rule ---------------------------------------------------------------------------------------

def test_ib_zone_names_map_to_zoneinfo():
    assert rolls.exchange_zone("US/Central").key == "US/Central"
    assert rolls.exchange_zone("CST (Central Standard Time)").key == "America/Chicago"
    assert rolls.exchange_zone("MET (Middle Europe Time)").key == "Europe/Berlin"
    with pytest.raises(InvalidConfigError, match="'Mars/Olympus' from IB's contract details is neither"):
        rolls.exchange_zone("Mars/Olympus")


def test_last_trade_date_needs_the_day():
    assert rolls.last_trade_date("20261218") == date(2026, 12, 18)
    assert rolls.last_trade_date("20261218 08:30 US/Central") == date(2026, 12, 18)
    with pytest.raises(InvalidConfigError, match="'202612' is not YYYYMMDD"):
        rolls.last_trade_date("202612")


def test_roll_instant_is_wall_time_in_the_exchange_zone_across_dst():
    at = wall_time(17)
    assert rolls.roll_instant_us(date(2026, 12, 18), CHICAGO, 8, at) == utc_us(2026, 12, 10, 23)  # CST
    assert rolls.roll_instant_us(date(2027, 6, 17), CHICAGO, 8, at) == utc_us(2027, 6, 9, 22)  # CDT
    assert rolls.roll_instant_us(date(2027, 3, 19), CHICAGO, 3, at) == utc_us(2027, 3, 16, 22)  # DST from 14 March
    assert rolls.roll_instant_us(date(2027, 3, 19), CHICAGO, 8, at) == utc_us(2027, 3, 11, 23)  # still CST


def test_front_is_the_earliest_expiry_whose_roll_instant_is_after_t():
    chain = rolls.schedule([(3, date(2027, 6, 17)), (1, date(2026, 12, 18)), (2, date(2027, 3, 19))], CHICAGO, 8,
                           wall_time(17))
    z6, h7, m7 = chain
    assert [e.contract_id for e in chain] == [1, 2, 3]
    assert rolls.front(chain, utc_us(2026, 12, 1)) == z6
    assert rolls.front(chain, z6.roll_us - 1) == z6
    assert rolls.front(chain, z6.roll_us) == h7
    assert rolls.front(chain, m7.roll_us) is None
    assert rolls.active_from_us(chain, h7) == z6.roll_us and rolls.active_from_us(chain, z6) is None
    assert rolls.neighbours(chain, z6) == (None, h7) and rolls.neighbours(chain, m7) == (h7, None)


def test_wanted_holds_both_expiries_across_the_overlap():
    chain = rolls.schedule([(1, date(2026, 12, 18)), (2, date(2027, 3, 19))], CHICAGO, 8, wall_time(17))
    z6, h7 = chain
    overlap = 600 * SECOND
    ids = lambda t: [e.contract_id for e in rolls.wanted(chain, t, overlap)]  # noqa: E731
    assert ids(z6.roll_us - overlap - 1) == [1]
    assert ids(z6.roll_us - overlap) == [1, 2]
    assert ids(z6.roll_us + overlap - 1) == [1, 2]
    assert ids(z6.roll_us + overlap) == [2]
    assert ids(h7.roll_us) == []
    assert [e.contract_id for e in rolls.wanted(chain, z6.roll_us, 0)] == [2]


def test_roll_fields_are_refused_on_a_contract_that_does_not_roll():
    assert ContractSpec(symbol="MNQ", sec_type="FUT", exchange="CME").rolls
    assert not ContractSpec(symbol="MNQ", sec_type="FUT", exchange="CME", expiry="202612").rolls
    with pytest.raises(ValidationError, match="conId 711280073 does not roll: roll_days_before_expiry and roll_time "
                                              "apply to a future given by symbol"):
        ContractSpec(con_id=711280073, roll_days_before_expiry=5)
    with pytest.raises(ValidationError, match="roll_overlap must not be negative"):
        Settings(roll_overlap=timedelta(seconds=-1))


# -- a roll through ibapi and the simulator ------------------------------------------------------------

def test_a_future_by_symbol_is_recorded_as_its_front_and_rolled_without_losing_a_tick(tmp_path):
    now = datetime.now(CHICAGO)
    if (now + timedelta(seconds=30)).date() != now.date():  # the roll day must be today in Chicago
        time.sleep((datetime.combine(now.date() + timedelta(days=1), wall_time(), CHICAGO) - now).total_seconds() + 1)
        now = datetime.now(CHICAGO)
    roll_at = (now + timedelta(seconds=6)).replace(microsecond=0, tzinfo=None).time()
    days = 8
    front = now.date() + timedelta(days=days)
    chain = futures_chain("MNQ", [front, front + timedelta(days=91), front + timedelta(days=182)])
    old, new, third = (c.con_id for c in chain)
    roll_us = to_us(datetime.combine(now.date(), roll_at, CHICAGO))
    spec = ContractSpec(symbol="MNQ", sec_type="FUT", exchange="CME", roll_time=roll_at)
    with GatewaySimulator(contracts=chain, speed=40, send_interval=0.005) as gateway:
        running = Recording(ib_settings(tmp_path, gateway, contracts=(spec,), roll_days_before_expiry=days,
                                        roll_overlap=timedelta(seconds=2)), gateway)
        try:
            assert running.feed.status()[("MNQ FUT CME USD", "bid_ask")] in ("waiting", "rolling")
            wait_until(lambda: now_us() > roll_us + 2 * SECOND and (f"conId {old}", "last") not in running.feed.status(),
                       timeout=60, what="the roll and the end of its overlap")
            running.wait_for_ticks(300)
            running.settle()
            streams = [(cid, tt) for cid in (old, new) for tt in ("bid_ask", "last")]
            running.assert_served_equals_sent(streams)  # every tick sent on either expiry, field for field
            assert gateway.sent(third, "last") is None
            assert running.feed.status() == {("MNQ FUT CME USD", "bid_ask"): "rolling",
                                             ("MNQ FUT CME USD", "last"): "rolling",
                                             (f"conId {new}", "bid_ask"): "recording",
                                             (f"conId {new}", "last"): "recording"}
            store = running.service.store
            running.service.recorder.flush()
            for tick_type in ("bid_ask", "last"):
                before = store.coverage(old, tick_type, *EVERYTHING).to_pylist()
                assert [(r["status"], r["reason"]) for r in before] == [("recorded", "subscribed"), ("gap", "rolled")]
                assert to_us(before[0]["end"]) >= roll_us
                after = store.coverage(new, tick_type, *EVERYTHING).to_pylist()
                assert [(r["status"], r["reason"]) for r in after] == [("recorded", "subscribed")]
                assert to_us(after[0]["start"]) <= roll_us
            pieces = store.rolls("MNQ")
            third_roll = rolls.roll_instant_us(front + timedelta(days=91), CHICAGO, days, roll_at)
            assert pieces[1:] == [RollPiece("MNQ", new, roll_us, third_roll), RollPiece("MNQ", third, third_roll, None)]
            assert pieces[0].contract_id == old and pieces[0].end_us == roll_us and pieces[0].start_us < roll_us
            assert {c.contract_id for c in store.contracts()} == {old, new}
            assert {c.last_trade_date for c in store.contracts()} == {f"{front:%Y%m%d}",
                                                                      f"{front + timedelta(days=91):%Y%m%d}"}
            # the continuous contract across the roll: the old expiry up to the roll instant, the new one after
            start, end = from_us(pieces[0].start_us), from_us(now_us())
            served = Served(store)
            try:
                got = served.client.tables("MNQ.c.0", "last", start, end)["last"]
            finally:
                served.close()
            expected = pa.concat_tables([between(store.read(old, "last", start, end), start, from_us(roll_us)),
                                         between(store.read(new, "last", start, end), from_us(roll_us), end)])
            assert got.drop_columns(["contract_id", "local_symbol"]).replace_schema_metadata(None).equals(
                expected.replace_schema_metadata(None))
            counts = pc.value_counts(got.column("local_symbol")).to_pylist()
            assert [c["values"] for c in counts] == [chain[0].local_symbol, chain[1].local_symbol]
            assert all(c["counts"] > 0 for c in counts)
        finally:
            running.close()
