"""reqHistoricalTicks through the real ibapi client: paging, whole seconds, sessions, times, pacing."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pytest

from ibstream.core.times import to_us
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.history import NO_PERMISSIONS, PACING_VIOLATION, HistoryPacing, session_bounds
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ
from ibstream.storage.synthetic import synthetic_ticks
from tests.helpers import utc, wait_until
from tests.simulator.ibclient import IBClient, by_con_id, daily_close, far_close, ib_text

RELAXED = HistoryPacing(burst_requests=1_000, window_requests=10_000)


def expected(table: pa.Table, what: str) -> list[tuple]:
    """What ibapi's historicalTicks* callbacks should deliver for these market rows."""
    seconds = (table.column("ib_time").cast(pa.int64()).to_numpy() // 1_000_000).tolist()
    rows = table.to_pylist()
    if what == "MIDPOINT":
        return [(s, r["mid_point"], 0) for s, r in zip(seconds, rows)]
    if what == "BID_ASK":
        return [(s, r["bid_price"], r["ask_price"], int(r["bid_size"]), int(r["ask_size"]), r["bid_past_low"],
                 r["ask_past_high"]) for s, r in zip(seconds, rows)]
    return [(s, r["price"], int(r["size"]), r["exchange"], r["special_conditions"], r["past_limit"], r["unreported"])
            for s, r in zip(seconds, rows)]


def first_whole(ticks: list[tuple], number: int) -> list[tuple]:
    """The first ``number`` ticks and the rest of the last one's second (the reference, by hand)."""
    if len(ticks) <= number:
        return ticks
    last_second = ticks[number - 1][0]
    return [t for i, t in enumerate(ticks) if i < number or t[0] == last_second]


@pytest.fixture
def market():
    """MNQ (session close an hour away) on a market clock that started 20 s ago, at 50x."""
    contract = far_close()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=20)
    with GatewaySimulator(contracts=(contract,), market_clock=True, market_start=start, speed=50,
                          history_pacing=RELAXED) as sim:
        client = IBClient(sim.port)
        yield sim, client, by_con_id(contract.con_id), start
        client.close()


def test_paging_forward_reads_the_market_exactly(market):
    sim, client, contract, start = market
    first, stop = start + timedelta(seconds=2), start + timedelta(seconds=8)
    reference = expected(sim.market(contract.conId, "bid_ask", first, stop), "BID_ASK")
    got, cursor, pages = [], first, 0
    while cursor < stop:
        _, ticks = client.history(contract, ib_text(cursor), "", 1000, "BID_ASK")
        assert len(ticks) >= 1000 and ticks[0][0] >= to_us(cursor) // 1_000_000
        got += [t for t in ticks if t[0] < to_us(stop) // 1_000_000]
        cursor = datetime.fromtimestamp(ticks[-1][0] + 1, UTC)  # whole seconds: the next page starts after the last
        pages += 1
    assert got == reference and pages > 2


def test_paging_backward_reads_the_market_exactly(market):
    sim, client, contract, start = market
    first, stop = start + timedelta(seconds=2), start + timedelta(seconds=8)
    reference = expected(sim.market(contract.conId, "bid_ask", first, stop), "BID_ASK")
    got: list[tuple] = []
    end = stop - timedelta(seconds=1)  # the last whole second of the range
    while end >= first:
        _, ticks = client.history(contract, "", ib_text(end), 1000, "BID_ASK")
        assert len(ticks) >= 1000 and ticks[-1][0] <= to_us(end) // 1_000_000
        got = [t for t in ticks if t[0] >= to_us(first) // 1_000_000] + got
        end = datetime.fromtimestamp(ticks[0][0] - 1, UTC)
    assert got == reference


@pytest.mark.parametrize(("what", "tick_type", "number"), [("MIDPOINT", "mid_point", 1000), ("TRADES", "last", 100)])
def test_midpoint_and_trades_come_from_their_tapes(market, what, tick_type, number):
    sim, client, contract, start = market
    first = start + timedelta(seconds=3)
    reference = expected(sim.market(contract.conId, tick_type, first), what)
    _, ticks = client.history(contract, ib_text(first), "", number, what)
    assert ticks == first_whole(reference, number) and len(ticks) >= number


def test_trades_can_be_served_from_the_all_last_tape():
    contract = far_close()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)  # 200 trades are surely in the past
    with GatewaySimulator(contracts=(contract,), market_clock=True, market_start=start, speed=50,
                          history_trades="all_last") as sim:
        client = IBClient(sim.port)
        try:
            first = start + timedelta(seconds=1)
            _, ticks = client.history(by_con_id(contract.con_id), ib_text(first), "", 200, "TRADES")
            reference = expected(sim.market(contract.con_id, "all_last", first), "TRADES")
            assert ticks == first_whole(reference, 200)
        finally:
            client.close()


def test_every_time_format_names_the_same_second(market):
    sim, client, contract, start = market
    moment = start + timedelta(seconds=4)
    texts = [ib_text(moment), f"{moment:%Y%m%d-%H:%M:%S}", f"{moment:%Y%m%d %H:%M:%S}",
             f"{moment.astimezone(ZoneInfo('US/Eastern')):%Y%m%d %H:%M:%S} US/Eastern"]
    answers = [client.history(contract, text, "", 50, "MIDPOINT")[1] for text in texts]
    assert all(answer == answers[0] for answer in answers) and answers[0][0][0] == to_us(moment) // 1_000_000


def test_ticks_not_yet_due_are_not_returned(market):
    sim, client, contract, _ = market
    first = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=2)
    _, ticks = client.history(contract, ib_text(first), "", 1000, "TRADES")
    asked = datetime.now(UTC)
    assert 0 < len(ticks) < 1000  # fewer than asked: the market has made no more yet
    wait_until(lambda: sim.market(contract.conId, "last", asked).num_rows > 0, what="trades after the request")
    assert ticks == expected(sim.market(contract.conId, "last", first), "TRADES")[:len(ticks)]


@pytest.mark.parametrize(("start", "end", "number", "what", "code"), [
    ("20261203 10:00:00 UTC", "", 1001, "BID_ASK", 322),
    ("20261203 10:00:00 UTC", "", 0, "BID_ASK", 322),
    ("20261203 10:00:00 UTC", "20261203 11:00:00 UTC", 10, "BID_ASK", 321),
    ("", "", 10, "BID_ASK", 321),
    ("2026-12-03 10:00:00", "", 10, "BID_ASK", 321),
    ("20261203 10:00:00 Mars/Olympus", "", 10, "BID_ASK", 321),
    ("20261203 10:00:00 UTC", "", 10, "BID", 321),
])
def test_bad_requests_get_a_clear_error(market, start, end, number, what, code):
    sim, client, contract, _ = market
    req_id, ticks = client.history(contract, start, end, number, what)
    assert client.errors[req_id][0][0] == code and ticks == []
    assert sim.history_requests[-1].code == code


def test_an_unknown_contract_gets_200(market):
    _, client, _, _ = market
    assert client.history_error(by_con_id(12345), "20261203 10:00:00 UTC", "", 10, "BID_ASK") == 200


def burst_tape(contract, tick_type, n):
    """Second 1: 300 ticks, second 2: 2,500 ticks at one instant (the first two flagged), second 3: 200."""
    table = synthetic_ticks(contract.market, tick_type, 0, 3_000, seed=7)
    offsets = np.concatenate([1_100_000 + np.arange(300) * 1_000, np.full(2_500, 2_500_000),
                              3_200_000 + np.arange(200) * 1_000])
    table = table.set_column(0, "ts", pa.array(offsets))
    if tick_type == "bid_ask":
        flags = np.zeros(3_000, dtype=bool)
        low, high = flags.copy(), flags.copy()
        low[300], high[301] = True, True
        table = table.set_column(6, "bid_past_low", pa.array(low)).set_column(7, "ask_past_high", pa.array(high))
    yield table


def test_a_second_with_more_than_1000_ticks_comes_back_whole():
    contract = far_close()
    origin = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=10)
    with GatewaySimulator(contracts=(contract,), market_clock=True, market_start=origin, tapes=burst_tape,
                          history_pacing=RELAXED) as sim:
        client = IBClient(sim.port)
        try:
            c = by_con_id(contract.con_id)
            second = [ib_text(origin + timedelta(seconds=s)) for s in range(4)]
            req_id, ticks = client.history(c, second[1], "", 1000, "BID_ASK")
            assert len(ticks) == 2_800  # 300 + the whole burst second
            assert [(len(t), done) for t, done in client.messages[req_id]] == [(1000, False), (1000, False), (800, True)]
            assert ticks == expected(sim.market(contract.con_id, "bid_ask"), "BID_ASK")[:2_800]
            assert ticks[300][5:] == (True, False) and ticks[301][5:] == (False, True)  # bidPastLow, askPastHigh
            assert len(client.history(c, second[2], "", 10, "BID_ASK")[1]) == 2_500
            assert len(client.history(c, "", second[2], 10, "BID_ASK")[1]) == 2_500
            assert len(client.history(c, "", second[3], 100, "BID_ASK")[1]) == 200
            assert len(client.history(c, "", second[3], 201, "BID_ASK")[1]) == 2_700
            req_id, ticks = client.history(c, "", second[0], 10, "BID_ASK")
            assert ticks == [] and client.messages[req_id] == [([], True)]  # nothing: one empty message, done
        finally:
            client.close()


def test_a_request_never_runs_past_its_session():
    now = datetime.now(UTC)
    close = (now - timedelta(seconds=30)).replace(second=0, microsecond=0)  # a minute boundary 30-90 s ago
    contract = daily_close(close.time())
    with GatewaySimulator(contracts=(contract,), market_clock=True, market_start=close - timedelta(seconds=10),
                          speed=5, history_pacing=RELAXED) as sim:
        client = IBClient(sim.port)
        try:
            c = by_con_id(contract.con_id)
            before = sim.market(contract.con_id, "bid_ask", close - timedelta(seconds=2), close)
            after = sim.market(contract.con_id, "bid_ask", close, close + timedelta(seconds=2))
            assert before.num_rows > 0 and after.num_rows > 0
            _, ticks = client.history(c, ib_text(close - timedelta(seconds=2)), "", 1000, "BID_ASK")
            assert ticks == expected(before, "BID_ASK")  # stops at the close though the market went on
            _, ticks = client.history(c, "", ib_text(close + timedelta(seconds=1)), 1000, "BID_ASK")
            assert ticks == expected(after, "BID_ASK")  # starts at the close: the session the end is in
        finally:
            client.close()


def test_session_bounds_follow_globex_hours():
    wednesday = to_us(utc(2026, 12, 2, 15))
    assert session_bounds(SIM_MNQ, wednesday) == (to_us(utc(2026, 12, 1, 22)), to_us(utc(2026, 12, 2, 22)))
    saturday = to_us(utc(2026, 12, 5, 12))  # a weekend start runs to Monday's close
    assert session_bounds(SIM_MNQ, saturday) == (to_us(utc(2026, 12, 4, 22)), to_us(utc(2026, 12, 7, 22)))
    assert session_bounds(SIM_AAPL, to_us(utc(2026, 12, 2, 15)))[1] == to_us(utc(2026, 12, 3, 1))  # 20:00 ET


# -- pacing ---------------------------------------------------------------------------------------

def pacing_sim(pacing: HistoryPacing, contracts=None):
    contracts = contracts or (far_close(),)
    return GatewaySimulator(contracts=contracts, market_clock=True, speed=5, history_pacing=pacing,
                            market_start=datetime.now(UTC) - timedelta(seconds=5))


def codes(sim: GatewaySimulator) -> list[int | None]:
    return [r.code for r in sim.history_requests]


START = ib_text(datetime.now(UTC) - timedelta(seconds=4))


def test_default_pacing_is_ibs():
    p = HistoryPacing()
    assert (p.identical_seconds, p.burst_seconds, p.burst_requests, p.window_seconds, p.window_requests,
            p.max_open) == (15.0, 2.0, 6, 600.0, 60, 50)


def test_an_identical_request_inside_the_window_is_a_pacing_violation():
    with pacing_sim(HistoryPacing(identical_seconds=1.0)) as sim:
        client = IBClient(sim.port)
        c = by_con_id(sim.contracts[0].con_id)
        assert client.history_error(c, START, "", 10, "BID_ASK") is None
        req_id, ticks = client.history(c, START, "", 10, "BID_ASK")
        assert client.errors[req_id] == [(162, PACING_VIOLATION)] and ticks == []
        assert client.history_error(c, START, "", 11, "BID_ASK") is None  # not identical
        wait_until(lambda: time.monotonic() - sim.history_requests[0].when > 1.0, what="the identical window")
        assert client.history_error(c, START, "", 10, "BID_ASK") is None
        assert codes(sim) == [None, 162, None, None]
        client.close()


def test_six_requests_for_one_contract_and_type_inside_the_burst_window_are_a_violation():
    contracts = (far_close(), SIM_AAPL)
    with pacing_sim(HistoryPacing(burst_seconds=600), contracts) as sim:
        client = IBClient(sim.port)
        mnq, aapl = by_con_id(contracts[0].con_id), by_con_id(SIM_AAPL.con_id)
        assert [client.history_error(mnq, START, "", n, "TRADES") for n in range(1, 7)] == [None] * 5 + [162]
        assert client.history_error(mnq, START, "", 1, "MIDPOINT") is None  # another whatToShow
        assert client.history_error(aapl, START, "", 1, "TRADES") is None  # another contract
        client.close()
    with pacing_sim(HistoryPacing(burst_seconds=0.5)) as sim:
        client = IBClient(sim.port)
        c = by_con_id(sim.contracts[0].con_id)
        for n in range(1, 6):
            client.history(c, START, "", n, "TRADES")
        wait_until(lambda: time.monotonic() - sim.history_requests[0].when > 0.5, what="the burst window")
        assert client.history_error(c, START, "", 6, "TRADES") is None
        client.close()


def test_more_than_the_window_allows_is_a_violation_and_bid_ask_counts_twice():
    contracts = (far_close(), SIM_AAPL)
    with pacing_sim(HistoryPacing(burst_requests=1_000, window_requests=10), contracts) as sim:
        client = IBClient(sim.port)
        mnq, aapl = by_con_id(contracts[0].con_id), by_con_id(SIM_AAPL.con_id)
        assert [client.history_error(mnq, START, "", n, "BID_ASK") for n in range(1, 5)] == [None] * 4  # 8
        assert [client.history_error(aapl, START, "", n, "MIDPOINT") for n in range(1, 3)] == [None] * 2  # 10
        assert client.history_error(aapl, START, "", 3, "MIDPOINT") == 162  # 11 > 10
        assert client.history_error(mnq, START, "", 5, "BID_ASK") == 162
        assert codes(sim) == [None] * 6 + [162, 162]
        client.close()


def test_forced_violations_refusals_and_the_open_limit():
    with pacing_sim(RELAXED) as sim:
        client = IBClient(sim.port)
        c = by_con_id(sim.contracts[0].con_id)
        sim.pacing_violations(2)
        assert [client.history_error(c, START, "", n, "TRADES") for n in (1, 2, 3)] == [162, 162, None]
        sim.refuse_history(sim.contracts[0].con_id)
        req_id, _ = client.history(c, START, "", 4, "TRADES")
        assert client.errors[req_id] == [(162, NO_PERMISSIONS)]
        sim.refuse_history(sim.contracts[0].con_id, 10187, "Failed to request historical ticks:No data")
        req_id, _ = client.history(c, START, "", 5, "TRADES")
        assert client.errors[req_id] == [(10187, "Failed to request historical ticks:No data")]
        record = sim.history_requests[-1]
        assert (record.con_id, record.what_to_show, record.start, record.end, record.number, record.code) == (
            sim.contracts[0].con_id, "TRADES", START, "", 5, 10187)
        assert sim.history.open == 0
        client.close()
    with pacing_sim(HistoryPacing(max_open=0)) as sim:
        client = IBClient(sim.port)
        assert client.history_error(by_con_id(sim.contracts[0].con_id), START, "", 1, "TRADES") == 322
        client.close()
