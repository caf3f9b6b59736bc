"""reqMktData: throttled top-of-book snapshots (tickPrice + tickSize), only what changed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

from ibstream.simulator.gateway import ASK, BID, LAST, SIZE_OF, GatewaySimulator
from tests.helpers import wait_until
from tests.simulator.ibclient import IBClient, by_con_id, far_close


def as_callbacks(sent: pa.Table) -> list[tuple]:
    """What ibapi 9.81 calls for these messages: TICK_PRICE -> tickPrice then tickSize of the same size."""
    out: list[tuple] = []
    for row in sent.to_pylist():
        if row["price"] is None:
            out.append(("size", row["tick_type"], row["size"]))
        else:
            out += [("price", row["tick_type"], row["price"], bool(row["mask"] & 1), bool(row["mask"] & 2)),
                    ("size", SIZE_OF[row["tick_type"]], row["size"])]
    return out


def market_sim(**options):
    return GatewaySimulator(contracts=(far_close(),), market_clock=True, speed=20, mkt_data_interval=0.05,
                            market_start=datetime.now(UTC) - timedelta(seconds=3), **options)


def test_snapshots_carry_the_latest_quote_and_last_trade_and_only_changes():
    with market_sim() as sim:
        cid = sim.contracts[0].con_id
        client = IBClient(sim.port)
        try:
            client.reqMktData(5, by_con_id(cid), "", False, False, [])
            wait_until(lambda: len(set(sim.mkt_data_sent(cid).column("ts").to_pylist())) >= 15, what="15 snapshots")
            client.cancelMktData(5)
            wait_until(lambda: sim.mkt_data_count() == 0, what="the cancel")
            sent = sim.mkt_data_sent(cid)
            wait_until(lambda: len(client.market_data[5]) == len(as_callbacks(sent)), what="every tick read")
            assert client.market_data[5] == as_callbacks(sent)
            rows = sent.to_pylist()
            assert {r["mask"] & 1 for r in rows if r["tick_type"] in (BID, ASK)} == {1}  # canAutoExecute
            assert {r["mask"] & 1 for r in rows if r["tick_type"] == LAST} <= {0}
            assert {r["tick_type"] for r in rows if r["ts"] == rows[0]["ts"]} == {BID, ASK, LAST}  # the first: all
            state: dict[int, list] = {BID: [None, None], ASK: [None, None], LAST: [None, None]}
            by_size = {size: price for price, size in SIZE_OF.items()}
            quotes, trades = (sim.market(cid, t) for t in ("bid_ask", "last"))
            for ts in sorted({r["ts"] for r in rows}):
                for r in (r for r in rows if r["ts"] == ts):
                    side = state[by_size.get(r["tick_type"], r["tick_type"])]
                    if r["price"] is not None:
                        assert r["price"] != side[0]  # a price tick only when the price changed
                        side[0] = r["price"]
                    else:
                        assert r["size"] != side[1]  # a size tick only when only the size changed
                    side[1] = r["size"]
                quote = quotes.filter(pa.compute.less_equal(quotes.column("ts"), pa.scalar(ts, quotes.column("ts").type)))
                q = quote.slice(quote.num_rows - 1).to_pylist()[0]
                assert state[BID] == [q["bid_price"], int(q["bid_size"])]
                assert state[ASK] == [q["ask_price"], int(q["ask_size"])]
                trade = trades.filter(pa.compute.less_equal(trades.column("ts"), pa.scalar(ts, trades.column("ts").type)))
                t = trade.slice(trade.num_rows - 1).to_pylist()[0]
                assert state[LAST] == [t["price"], int(t["size"])]
        finally:
            client.close()


def test_a_snapshot_request_ends_with_tick_snapshot_end_and_sizes_may_be_echoed():
    with market_sim() as sim:
        cid = sim.contracts[0].con_id
        sim.mkt_data_echo_sizes = True
        client = IBClient(sim.port)
        try:
            client.reqMktData(6, by_con_id(cid), "", True, False, [])
            wait_until(lambda: 6 in client.snapshot_end, what="tickSnapshotEnd")
            assert sim.mkt_data_count() == 0
            events = client.market_data[6]
            assert [e[:2] for e in events] == [("price", BID), ("size", 0), ("size", 0), ("price", ASK), ("size", 3),
                                               ("size", 3), ("price", LAST), ("size", 5), ("size", 5)]
        finally:
            client.close()


def test_refusals_duplicates_and_the_line_limit():
    with market_sim() as sim:
        cid = sim.contracts[0].con_id
        client = IBClient(sim.port)
        try:
            sim.mkt_data_limit = 1
            client.reqMktData(1, by_con_id(cid), "", False, False, [])
            client.reqMktData(1, by_con_id(cid), "", False, False, [])
            client.reqMktData(2, by_con_id(cid), "", False, False, [])
            client.reqMktData(3, by_con_id(999), "", False, False, [])
            wait_until(lambda: all(client.errors[i] for i in (1, 2, 3)), what="three errors")
            assert [client.errors[i][0][0] for i in (1, 2, 3)] == [102, 101, 200]
            sim.refuse(cid, 354)
            client.reqMktData(4, by_con_id(cid), "", False, False, [])
            wait_until(lambda: client.errors[4], what="the refusal")
            assert client.errors[4][0][0] == 354
        finally:
            client.close()
