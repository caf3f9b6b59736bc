"""Recording within IB's limits: the tick-by-tick limit with the market-data fallback, and fast reconnects.

The fallback rows are checked against what the simulator wrote as ``reqMktData`` ticks
(:meth:`GatewaySimulator.mkt_data_sent`), turned into rows by the documented pairing: a quote row
per size tick that changes the quote (a price tick carries its size), a trade per last price with
its size and per size alone.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import polars as pl

from ibstream.recorder.ib import _says_tick_by_tick_limit
from ibstream.settings import ContractSpec
from ibstream.simulator.gateway import ASK, BID, LAST, LAST_SIZE
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey
from tests.helpers import EVERYTHING, wait_until
from tests.recorder.harness import AAPL, MNQ, TODAY, Recording, ib_settings

QUOTE = ["bid_price", "ask_price", "bid_size", "ask_size", "bid_past_low", "ask_past_high"]
TRADE = ["price", "size", "past_limit"]


def rows_from_mkt_data(sent) -> tuple[list[tuple], list[tuple]]:
    """(quote rows, trade rows) a market-data line's ticks make, as the fallback documents it."""
    bid = ask = bid_size = ask_size = last = None
    quotes: list[tuple] = []
    trades: list[tuple] = []
    for tick_type, price, size in zip(*(sent.column(c).to_pylist() for c in ("tick_type", "price", "size"))):
        if tick_type in (BID, BID - 1):
            bid, bid_size = price if price is not None else bid, size
        elif tick_type in (ASK, ASK + 1):
            ask, ask_size = price if price is not None else ask, size
        elif tick_type == LAST:
            last = price
            trades.append((price, size))
            continue
        elif tick_type == LAST_SIZE:
            trades.append((last, size))
            continue
        quote = (bid, ask, bid_size, ask_size)
        if None not in quote and (not quotes or quotes[-1] != quote):
            quotes.append(quote)
    return quotes, trades


def served(running: Recording, contract_id: int, tick_type: str) -> pl.DataFrame:
    return running.client.ticks(contract_id, tick_type, *TODAY)


def test_a_stream_over_the_tick_by_tick_limit_is_recorded_from_market_data(tmp_path, gateway, caplog):
    gateway.tick_by_tick_limit = 1
    specs = (ContractSpec(con_id=MNQ, tick_types=("bid_ask",)), ContractSpec(con_id=AAPL, tick_types=("bid_ask", "last")))
    running = Recording(ib_settings(tmp_path, gateway, contracts=specs, market_data_fallback=True), gateway)
    try:
        key = StreamKey(AAPL, TickType.BID_ASK)
        wait_until(lambda: running.service.recorder.acknowledged.get(key, 0) >= 30, what="fallback quotes")
        wait_until(lambda: running.service.recorder.acknowledged.get(StreamKey(AAPL, TickType.LAST), 0) >= 3,
                   what="fallback trades")
        assert running.feed.status() == {(f"conId {MNQ}", "bid_ask"): "recording",
                                         (f"conId {AAPL}", "bid_ask"): "market_data_fallback",
                                         (f"conId {AAPL}", "last"): "market_data_fallback"}
        gateway.pause()
        quotes, trades = rows_from_mkt_data(gateway.mkt_data_sent(AAPL))
        wait_until(lambda: running.service.recorder.acknowledged.get(key, 0) == len(quotes), what="every quote row")
        wait_until(lambda: running.service.recorder.acknowledged.get(StreamKey(AAPL, TickType.LAST), 0) == len(trades),
                   what="every trade row")
        wait_until(lambda: running.acknowledged - len(quotes) - len(trades) == gateway.sent(MNQ, "bid_ask").num_rows,
                   what="every tick-by-tick tick")
        assert gateway.sent(AAPL, "bid_ask") is None and gateway.sent(AAPL, "last") is None
        assert gateway.mkt_data_count() == 1  # one line for both of AAPL's streams
        got = served(running, AAPL, "bid_ask")
        assert got.select(QUOTE[:4]).rows() == [tuple(float(v) if i < 2 else v for i, v in enumerate(q)) for q in quotes]
        assert got["ts"].is_sorted() and not got["bid_past_low"].any() and not got["ask_past_high"].any()
        got = served(running, AAPL, "last")
        assert got.select(TRADE[:2]).rows() == trades
        assert set(got["exchange"]) == {""} and not got["past_limit"].any()
        assert served(running, MNQ, "bid_ask").drop("ts").equals(pl.from_arrow(gateway.sent(MNQ, "bid_ask")).drop("ts"))
        for tick_type in ("bid_ask", "last"):
            assert running.coverage(AAPL, tick_type) == [("recorded", "subscribed"), ("gap", "tick_by_tick_limit"),
                                                         ("recorded", "market_data_fallback")]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert sum(f"conId {AAPL} bid_ask" in m for m in errors) == 1, errors
        assert sum(f"conId {AAPL} last" in m for m in errors) == 1, errors
        assert any("not recorded tick-by-tick" in m and "IB 10190" in m and "from market data" in m for m in errors)
    finally:
        running.close()


def test_a_freed_tick_by_tick_line_switches_the_stream_back(tmp_path, gateway, caplog):
    gateway.tick_by_tick_limit = 1
    specs = (ContractSpec(con_id=MNQ, tick_types=("bid_ask",)), ContractSpec(con_id=AAPL, tick_types=("bid_ask",)))
    running = Recording(ib_settings(tmp_path, gateway, contracts=specs, market_data_fallback=True), gateway)
    caplog.set_level(logging.INFO, logger="ibstream.recorder.ib")
    try:
        key = StreamKey(AAPL, TickType.BID_ASK)
        wait_until(lambda: running.service.recorder.acknowledged.get(key, 0) >= 10, what="fallback quotes")
        gateway.tick_by_tick_limit = None
        wait_until(lambda: running.status(AAPL, "bid_ask") == "recording", what="back to tick-by-tick")
        wait_until(lambda: gateway.mkt_data_count() == 0, what="the market data line cancelled")
        running.wait_for_ticks(200)
        gateway.pause()
        stored = lambda: served(running, MNQ, "bid_ask").height + served(running, AAPL, "bid_ask").filter(  # noqa: E731
            pl.col("ts") >= running.service.store.coverage(AAPL, "bid_ask", *EVERYTHING)["start"][-1].as_py()).height
        wait_until(lambda: stored() == gateway.sent_count() - running.sent_before, what="every tick-by-tick tick")
        quotes, _ = rows_from_mkt_data(gateway.mkt_data_sent(AAPL))
        tick_by_tick = pl.from_arrow(gateway.sent(AAPL, "bid_ask"))
        got = served(running, AAPL, "bid_ask")
        table = running.service.store.coverage(AAPL, "bid_ask", *EVERYTHING).to_pylist()
        assert [(r["status"], r["reason"]) for r in table] == [
            ("recorded", "subscribed"), ("gap", "tick_by_tick_limit"), ("recorded", "market_data_fallback"),
            ("recorded", "subscribed")]
        switch = table[-1]["start"]
        fallback, after = got.filter(pl.col("ts") < switch), got.filter(pl.col("ts") >= switch)
        assert after.drop("ts").equals(tick_by_tick.drop("ts"))  # every tick-by-tick tick sent, exactly
        # market data the gateway sent after the first tick-by-tick tick, before our cancel reached it, is not kept
        expected = quotes[:fallback.height]
        assert fallback.height >= 10 and fallback.select(QUOTE[:4]).rows() == [
            (float(b), float(a), bs, as_) for b, a, bs, as_ in expected]
        assert f"recorded tick-by-tick again: conId {AAPL} bid_ask" in caplog.text
    finally:
        running.close()


def test_without_fallback_the_stream_is_a_gap_named_once(tmp_path, gateway, caplog):
    gateway.tick_by_tick_limit = 1
    specs = (ContractSpec(con_id=MNQ, tick_types=("bid_ask",)), ContractSpec(con_id=AAPL, tick_types=("bid_ask",)))
    running = Recording(ib_settings(tmp_path, gateway, contracts=specs), gateway)
    try:
        wait_until(lambda: running.status(AAPL, "bid_ask") == "tick_by_tick_limit", what="10190")
        running.wait_for_ticks(300)  # several retries, each refused again
        assert gateway.mkt_data_count() == 0
        assert running.coverage(AAPL, "bid_ask") == [("recorded", "subscribed"), ("gap", "tick_by_tick_limit")]
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert sum(f"conId {AAPL} bid_ask" in m for m in errors) == 1, errors
        assert any("gaps in coverage (tick_by_tick_limit)" in m for m in errors)
    finally:
        running.close()


def test_322_counts_as_the_tick_by_tick_limit_when_its_text_says_so():
    assert _says_tick_by_tick_limit("Error processing request.-'bX' : cause - Max number of tick-by-tick requests "
                                    "has been reached.")
    assert _says_tick_by_tick_limit("Max number of tick by tick requests has been reached")
    assert not _says_tick_by_tick_limit("Error processing request.-'bX' : cause - Invalid tick type")


def test_a_dropped_connection_is_retried_at_once_not_after_the_backoff(tmp_path, gateway):
    """With a one-minute backoff, only the immediate first attempt reconnects within the wait."""
    settings = ib_settings(tmp_path, gateway, ib_reconnect_initial=timedelta(seconds=60),
                           ib_reconnect_stable=timedelta(milliseconds=200))
    running = Recording(settings, gateway)
    try:
        running.wait_for_ticks(300)
        gateway.drop_connections()
        wait_until(lambda: running.feed.connections == 2, timeout=20, what="an immediate reconnect")
        running.wait_for_ticks(300)
        running.settle()
        running.assert_served_equals_sent()
    finally:
        running.close()
