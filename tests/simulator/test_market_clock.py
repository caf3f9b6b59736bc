"""Market-clock mode: one market per stream on the wall clock, joined by every subscriber."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from ibstream.core.times import to_us
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.storage.schemas import schema_for
from tests.helpers import wait_until
from tests.simulator.ibclient import IBClient, by_con_id, far_close


def as_tick_by_tick(table: pa.Table) -> list[tuple]:
    seconds = (table.column("ib_time").cast(pa.int64()).to_numpy() // 1_000_000).tolist()
    return [(s, r["bid_price"], r["ask_price"], int(r["bid_size"]), int(r["ask_size"]), r["bid_past_low"],
             r["ask_past_high"]) for s, r in zip(seconds, table.to_pylist())]


def test_subscribers_join_one_market_and_get_its_ticks_with_their_ib_seconds():
    contract = far_close()
    start = datetime.now(UTC) - timedelta(seconds=3)
    with GatewaySimulator(contracts=(contract,), market_clock=True, market_start=start, speed=20) as sim:
        clients = [IBClient(sim.port, client_id) for client_id in (1, 2)]
        try:
            for client in clients:  # one after the other: the second joins later
                subscribed = datetime.now(UTC)
                client.reqTickByTickData(7, by_con_id(contract.con_id), "BidAsk", 0, False)
                wait_until(lambda: len(client.tick_by_tick[7]) >= 100, what="100 quotes")
            for client in clients:
                client.cancelTickByTickData(7)
            wait_until(lambda: not sim.subscriptions(), what="both cancelled")
            sent = sim.sent(contract.con_id, "bid_ask")
            wait_until(lambda: sum(len(c.tick_by_tick[7]) for c in clients) == sent.num_rows, what="every tick read")
            market = sim.market(contract.con_id, "bid_ask")
            rows = as_tick_by_tick(market)
            for client in clients:  # each client's ticks are one contiguous run of the market
                got = client.tick_by_tick[7]
                k = rows.index(got[0])
                assert got == rows[k:k + len(got)]
            assert sorted(as_tick_by_tick(sent)) == sorted(clients[0].tick_by_tick[7] + clients[1].tick_by_tick[7])
            assert to_us(market.column("ts")[-1].as_py()) <= to_us(datetime.now(UTC))  # only what is due
            assert datetime.fromtimestamp(clients[1].tick_by_tick[7][0][0] + 1, UTC) >= subscribed  # joined late
            assert sent.schema == schema_for("bid_ask") and sent.num_rows == sum(len(c.tick_by_tick[7]) for c in clients)
        finally:
            for client in clients:
                client.close()


def test_the_market_is_the_same_whoever_asks_and_whenever():
    contract = far_close()
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=5)
    with GatewaySimulator(contracts=(contract,), market_clock=True, market_start=start, speed=20, seed=3) as one, \
            GatewaySimulator(contracts=(contract,), market_start=start, speed=20, seed=3) as other:
        end = start + timedelta(seconds=4)
        a = one.market(contract.con_id, "last", start, end)
        b = other.market(contract.con_id, "last", start, end)  # default mode: the market exists for history
        assert a.num_rows > 0 and a.equals(b)
        ib_time = a.column("ib_time").cast(pa.int64()).to_numpy()
        ts = a.column("ts").cast(pa.int64()).to_numpy()
        assert (ib_time == ts - ts % 1_000_000).all()  # IB time = the whole second of the due time
        assert one.market(contract.con_id, "last", start + timedelta(seconds=1), end).equals(
            a.filter(pc.greater_equal(a.column("ts"), pa.scalar(start + timedelta(seconds=1), a.column("ts").type))))
