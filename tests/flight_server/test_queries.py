"""Query commands over Flight: sessions, windows, daily bars, several contracts, actions, bad input."""

from __future__ import annotations

import json
from datetime import date, datetime, timedelta

import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from ibstream.core.errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from ibstream.core.times import from_us, to_us
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ
from ibstream.storage.sessions import ContractSessions
from ibstream.storage.synthetic import AAPL, MNQ
from tests.bar_reference import assert_bars_equal
from tests.helpers import Served, append_in_batches, between, market, utc

FETCHED = date(2026, 11, 23)  # the Monday of Thanksgiving week 2026, when the recorder resolved the contracts
HISTORY = (utc(2026, 11, 24, 12), utc(2026, 12, 1, 12))


@pytest.fixture(scope="module")
def week(tmp_path_factory):
    """MNQ and AAPL quotes and trades from Tuesday to next Tuesday of Thanksgiving week 2026,
    mostly archived, with the contract details the recorder would have stored."""
    from datetime import timedelta as td

    from ibstream.settings import Settings
    from ibstream.storage import Store

    settings = Settings(data_root=tmp_path_factory.mktemp("week") / "data", rotation_interval=td(minutes=30),
                        archive_delay=td(0), flight_port=0, fsync="none")
    raw = {}
    with Store(settings) as store:
        for sim, contract in ((SIM_MNQ, MNQ), (SIM_AAPL, AAPL)):
            store.index.upsert_contract(sim.details(FETCHED))
            for tick_type, rate in (("bid_ask", 0.5), ("last", 0.2)):
                table = market(contract, tick_type, *HISTORY, rate, seed=contract.contract_id % 97)
                append_in_batches(store, table, batch=5_000, contract_id=contract.contract_id)
                raw[contract.contract_id, tick_type] = table
        store.archive(now=HISTORY[1] - timedelta(hours=5))
        served = Served(store)
        yield store, served, raw
        served.close()


def mnq_sessions() -> ContractSessions:
    return ContractSessions.from_details(SIM_MNQ.details(FETCHED))


def test_a_session_is_exactly_its_ticks(week):
    _, served, raw = week
    quotes = served.client.ticks(AAPL.contract_id, "bid_ask", session="regular", session_date="2026-11-27")
    early_close = between(raw[AAPL.contract_id, "bid_ask"], utc(2026, 11, 27, 14, 30), utc(2026, 11, 27, 18))
    assert quotes.to_arrow().equals(pl.from_arrow(early_close).to_arrow())
    assert quotes.height > 1_000


def test_daily_bars_are_one_per_trading_session(week):
    """MNQ's Globex day runs 17:00-16:00 Chicago; Sunday's open belongs to Monday; ticks in the
    16:00-17:00 break and on the Saturday belong to no day."""
    _, served, raw = week
    start, end = utc(2026, 11, 24, 12), utc(2026, 12, 1, 12)
    bars = served.client.bars(MNQ.contract_id, "last", "1d", start, end)
    sessions = mnq_sessions().sessions("extended", to_us(start), to_us(end))
    assert bars.get_column("session_date").to_list() == [s.trading_date for s in sessions]
    assert bars.get_column("session_date").to_list() == [
        date(2026, 11, d) for d in (24, 25, 26, 27, 30)] + [date(2026, 12, 1)]
    assert bars.get_column("ts")[4] == utc(2026, 11, 29, 23)  # Monday's session opens Sunday 17:00 CST
    trades = pl.from_arrow(raw[MNQ.contract_id, "last"])
    for bar, session in zip(bars.iter_rows(named=True), sessions):
        lo, hi = from_us(max(session.open_us, to_us(start))), from_us(min(session.close_us, to_us(end)))
        day = trades.filter((pl.col("ts") >= lo) & (pl.col("ts") < hi))
        assert bar["trade_count"] == day.height
        assert (bar["open"], bar["high"], bar["low"], bar["close"]) == (
            day["price"][0], day["price"].max(), day["price"].min(), day["price"][-1])
        assert bar["volume"] == day["size"].sum()
    in_sessions = sum(bars.get_column("trade_count"))
    assert in_sessions < trades.height  # the daily breaks and the weekend are outside every session


def test_daily_bars_over_a_range_without_a_session_are_empty(week):
    _, served, _ = week
    weekend = served.client.bars(AAPL.contract_id, "last", "1d", utc(2026, 11, 28, 12), utc(2026, 11, 29, 12),
                                 daily_session="regular")
    assert weekend.height == 0 and weekend.columns[:2] == ["ts", "session_date"]


def test_live_bars_are_planned_with_their_forming_column(week):
    _, served, _ = week
    command = {"version": 1, "contract_id": MNQ.contract_id, "tick_types": ["last"], "window": "1h",
               "resolution": "1m", "live": True}
    schema = served.client._flight.get_schema(flight.FlightDescriptor.for_command(json.dumps(command).encode()))
    assert schema.schema.names[-1] == "forming"


def test_daily_bars_of_regular_sessions(week):
    _, served, raw = week
    bars = served.client.bars(AAPL.contract_id, "bid_ask", "1d", utc(2026, 11, 25), utc(2026, 11, 28),
                              daily_session="regular")
    assert bars.get_column("session_date").to_list() == [date(2026, 11, 25), date(2026, 11, 27)]  # not Thanksgiving
    assert bars.get_column("ts").to_list() == [utc(2026, 11, 25, 14, 30), utc(2026, 11, 27, 14, 30)]
    friday = between(raw[AAPL.contract_id, "bid_ask"], utc(2026, 11, 27, 14, 30), utc(2026, 11, 27, 18))
    assert bars.get_column("quote_count")[1] == friday.num_rows


def test_bars_of_several_contracts_keep_contract_id(week):
    _, served, raw = week
    start, end = utc(2026, 11, 30, 15), utc(2026, 11, 30, 20)
    bars = served.client.bars([MNQ.contract_id, AAPL.contract_id], "bid_ask", "5m", start, end)
    assert bars.columns[:2] == ["contract_id", "ts"]
    assert bars.get_column("contract_id").unique(maintain_order=True).to_list() == [MNQ.contract_id, AAPL.contract_id]
    for contract in (MNQ, AAPL):
        mine = bars.filter(pl.col("contract_id") == contract.contract_id).drop("contract_id")
        direct = served.client.bars(contract.contract_id, "bid_ask", "5m", start, end)
        assert_bars_equal(mine, direct)


def test_several_contracts_at_tick_resolution(week):
    _, served, raw = week
    start, end = utc(2026, 11, 30, 15), utc(2026, 11, 30, 15, 30)
    frames = served.client.ticks([AAPL.contract_id, MNQ.contract_id], ["last"], start, end)
    last = frames["last"]
    for contract in (AAPL, MNQ):
        expected = pl.from_arrow(between(raw[contract.contract_id, "last"], start, end))
        assert last.filter(pl.col("contract_id") == contract.contract_id).drop("contract_id").equals(expected)


def test_window_and_current_session_end_now(tmp_path, settings):
    """A 24h window and the current session, over ticks up to a few minutes ago."""
    from ibstream.storage import Store

    now = datetime.now().astimezone()
    with Store(settings) as store:
        store.index.upsert_contract(SIM_MNQ.details(now.date() - timedelta(days=2), days=10))
        early = market(MNQ, "last", now - timedelta(hours=30), now - timedelta(hours=25), 0.5, seed=1)
        late = market(MNQ, "last", now - timedelta(hours=23), now - timedelta(minutes=2), 0.5, seed=2)
        append_in_batches(store, pa.concat_tables([early, late]))
        served = Served(store)
        try:
            window = served.client.ticks(MNQ.contract_id, "last", window="24h")
            assert window.to_arrow().equals(pl.from_arrow(late).to_arrow())
            current = served.client.session_ticks(MNQ.contract_id, "current", kind="extended", tick_types="last")
            session = ContractSessions.from_details(store.index.contract(MNQ.contract_id)).current(
                "extended", to_us(now))
            everything = pa.concat_tables([early, late])
            assert current.to_arrow().equals(pl.from_arrow(
                between(everything, from_us(session.open_us), from_us(session.close_us))).to_arrow())
        finally:
            served.close()


def test_actions_statistics_sessions_coverage(week):
    store, served, _ = week
    statistics = served.client.statistics(MNQ.contract_id, "last")
    expected = store.statistics(MNQ.contract_id, "last")
    assert statistics.get_column("date").to_list() == [date.fromisoformat(s.date) for s in expected]
    assert statistics.get_column("total_ticks").to_list() == [s.total_ticks for s in expected]
    assert statistics.get_column("vwap").to_list() == [s.vwap for s in expected]

    monday = served.client.session_times(MNQ.contract_id, date(2026, 11, 30))
    assert monday.get_column("kind").to_list() == ["regular", "extended", "pre_market", "after_hours", "full_day"]
    extended = monday.row(1, named=True)
    assert (extended["open"], extended["close"]) == (utc(2026, 11, 29, 23), utc(2026, 11, 30, 22))

    store.index.coverage_transition(MNQ.contract_id, "last", to_us(utc(2026, 11, 24, 12)), "recorded", "subscribed")
    store.index.coverage_transition(MNQ.contract_id, "last", to_us(utc(2026, 11, 25, 3)), "gap", "disconnected")
    coverage = served.client.coverage(MNQ.contract_id, "last", utc(2026, 11, 24), utc(2026, 11, 26))
    assert coverage.select("status", "reason").rows() == [("recorded", "subscribed"), ("gap", "disconnected")]

    names = [action.type for action in served.client._flight.list_actions()]
    assert names == ["statistics", "sessions", "coverage", "scrub", "rolls"]


GOOD = {"version": 1, "contract_id": MNQ.contract_id, "tick_types": ["last"], "start": "2026-11-30T15:00:00Z",
        "end": "2026-11-30T16:00:00Z"}


@pytest.mark.parametrize("change, error, message", [
    ({"session": "lunch"}, pa.ArrowInvalid,
     "session: session kind was 'lunch'; use one of regular, extended, pre_market, after_hours, full_day "
     "('overnight' is accepted for full_day)\n"),
    ({"window": "24h"}, pa.ArrowInvalid, "give the range exactly one way: start (with an optional end), window "
                                         "(e.g. '24h'), session (e.g. 'regular', with session_date) or cursor (to "
                                         "resume a stream); got start and window"),
    ({"live": True, "resolution": "1d"}, pa.ArrowInvalid,
     "live bars go up to 1h; resolution '1d' is served for stored ranges only"),
    ({"start": None, "end": None, "cursor": "12:x"}, pa.ArrowInvalid,
     "cursor: cursor was '12:x'; use the 'cursor' of a batch's app_metadata"),
    ({"start": None, "end": None, "cursor": "12:1", "tick_types": ["last", "bid_ask"]}, pa.ArrowInvalid,
     "a cursor resumes one stream: give one contract_id and one tick type with it"),
    ({"start": None, "end": None, "window": "15 minutes"}, pa.ArrowInvalid, "window was '15 minutes'; use a whole "
                                                                             "number and a unit s, m, h, d or w"),
    ({"start": None, "end": None, "session": "regular", "session_date": "2026-11-26", "contract_id": AAPL.contract_id},
     pa.ArrowInvalid, "no regular session on 2026-11-26"),
    ({"session_date": "previous"}, pa.ArrowInvalid, "session_date needs session"),
    ({"resolution": "2m"}, pa.ArrowInvalid, "resolution was '2m'; use any of tick, 1s, 5s, 10s, 30s, 1m, 5m, 15m, "
                                            "30m, 1h, 1d"),
    ({"fill": True}, pa.ArrowInvalid, "fill applies to bars; give a resolution such as '1m'"),
    ({"resolution": "5m", "daily_session": "regular"}, pa.ArrowInvalid, "daily_session applies to resolution '1d'"),
    ({"contract_id": None, "contract_ids": [MNQ.contract_id, 42]}, pa.ArrowKeyError, "contract_id 42 is not stored"),
    ({"contract_ids": [MNQ.contract_id]}, pa.ArrowInvalid, "give exactly one of contract_id (one contract), "
                                                           "contract_ids"),
    ({"resolution": "1s", "start": "2025-01-01T00:00:00Z", "end": "2025-12-31T00:00:00Z"}, pa.ArrowInvalid,
     "request too large: about 31,449,600 bars of 1s, over the limit of 10,000,000 (IBSTREAM_MAX_BARS)"),
    ({"resolution": "1m", "start": "2024-01-01T00:00:00Z"}, pa.ArrowInvalid,
     "spans more than 366 days, 0:00:00 (IBSTREAM_MAX_BAR_SPAN)"),
    ({"start": None, "end": None, "session": "regular", "resolution": "1d", "daily_session": "extended"},
     pa.ArrowInvalid, "daily_session 'extended' differs from session 'regular'; daily bars of a session query are "
                      "that session's: leave daily_session out"),
    ({"contract_id": 0}, pa.ArrowInvalid, "contract_id: Input should be greater than 0 (got 0)"),
    ({"start": None, "end": None, "window": "99999999999999w", "live": True}, pa.ArrowInvalid,
     "window was '99999999999999w'; a window reaches back at most ten years (3660d)"),
    ({"start": None, "end": None, "session": "full_day", "session_date": "9999-12-31"}, pa.ArrowInvalid,
     "session_date was '9999-12-31'; use a date from 1970-01-01 to 2199-12-31"),
    ({"start": None, "end": None, "cursor": "12:1", "resolution": "1m"}, pa.ArrowInvalid,
     "a cursor is a tick position: resume bars with start at the last bar's ts instead"),
    ({"resolution": "1m", "fill": True, "live": True}, pa.ArrowInvalid,
     "fill applies to stored ranges; a live bar stream sends only bars that have ticks"),
])
def test_bad_queries_get_a_precise_error(week, change, error, message):
    _, served, _ = week
    command = {key: value for key, value in {**GOOD, **change}.items() if value is not None}
    with pytest.raises(error, match=None) as raised:
        served.client._flight.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command).encode()))
    assert message in str(raised.value)
    assert served.client.ticks(MNQ.contract_id, "last", utc(2026, 11, 30, 15), utc(2026, 11, 30, 16)).height > 0


def test_a_session_of_a_contract_without_details_is_refused(tmp_path, settings):
    from ibstream.storage import Store

    with Store(settings) as store:
        append_in_batches(store, market(MNQ, "last", utc(2026, 11, 30, 15), utc(2026, 11, 30, 16), 1.0))
        served = Served(store)
        try:
            with pytest.raises(InvalidRequestError, match="contract 711280073 has no trading hours: sessions and 1d "
                                                          "bars need the contract details"):
                served.client.session_ticks(MNQ.contract_id, "current", kind="regular", tick_types="last")
            with pytest.raises(InvalidRequestError, match="has no trading hours"):
                served.client.bars(MNQ.contract_id, "last", "1d", utc(2026, 11, 30), utc(2026, 12, 1))
            with pytest.raises(InvalidRequestError, match="has no trading hours"):
                served.client.session_times(MNQ.contract_id)
        finally:
            served.close()


def test_one_now_for_every_contract_of_a_window(week):
    _, served, _ = week
    command = {"version": 1, "contract_ids": [MNQ.contract_id, AAPL.contract_id], "tick_types": ["last"],
               "window": "1h"}
    info = served.client._flight.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command).encode()))
    ranges = {(t["start_us"], t["end_us"]) for t in (json.loads(e.ticket.ticket) for e in info.endpoints)}
    assert len(ranges) == 1


def test_a_forged_ticket_with_bar_options_on_ticks_is_refused(week):
    _, served, _ = week
    ticket = {"version": 1, "contract_id": MNQ.contract_id, "tick_type": "last", "start_us": 0, "end_us": 1,
              "fill": True}
    with pytest.raises(pa.ArrowInvalid, match="invalid ticket: fill applies to bars"):
        served.client._flight.do_get(flight.Ticket(json.dumps(ticket).encode())).read_all()


def test_bad_action_calls_are_refused(week):
    _, served, _ = week
    for action in ("statistics", "sessions"):
        with pytest.raises(NotFoundError, match="contract_id 42 is unknown here: no ticks, contract details or "
                                                "coverage are stored for it"):
            served.client._action(action, contract_id=42)
    with pytest.raises(InvalidRequestError, match="range is empty or inverted: start 2026-11-30T00:00:00"):
        served.client.coverage(MNQ.contract_id, "last", utc(2026, 11, 30), utc(2026, 11, 29))
    with pytest.raises(InvalidRequestError, match="action was 'stats'; use any of statistics, sessions, coverage"):
        served.client._action("stats", contract_id=MNQ.contract_id)
    with pytest.raises(InvalidRequestError, match="invalid body for action 'coverage': missing field 'tick_type'"):
        served.client._action("coverage", contract_id=MNQ.contract_id, start="2026-11-30T00:00:00Z")
    with pytest.raises(RequestTooLargeError, match="request too large"):
        served.client.ticks(MNQ.contract_id, "last", utc(2026, 1, 1), utc(2026, 3, 1))
