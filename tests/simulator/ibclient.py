"""A real ibapi 9.81 client (EClient + EWrapper on its own thread) that records what the gateway answers."""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from datetime import UTC, datetime, time, timedelta

from ibapi.client import EClient
from ibapi.contract import Contract
from ibapi.wrapper import EWrapper

from ibstream.simulator.market import SIM_MNQ, SimContract
from tests.helpers import wait_until


class IBClient(EWrapper, EClient):
    """Connects on construction; ``history(...)`` and friends send a request and wait for its answer."""

    def __init__(self, port: int, client_id: int = 1):
        EClient.__init__(self, self)
        self.ready = threading.Event()
        self.errors: dict[int, list[tuple[int, str]]] = defaultdict(list)
        self.messages: dict[int, list[tuple[list, bool]]] = defaultdict(list)  # reqId -> (ticks, done) per message
        self.done: set[int] = set()
        self.details: dict[int, list] = defaultdict(list)
        self.details_end: set[int] = set()
        self.tick_by_tick: dict[int, list[tuple]] = defaultdict(list)
        self.market_data: dict[int, list[tuple]] = defaultdict(list)  # reqId -> ("price"|"size", tickType, value)
        self.snapshot_end: set[int] = set()
        self._next_req = 100
        self.connect("127.0.0.1", port, client_id)
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        assert self.ready.wait(10), "no nextValidId from the simulator"

    def close(self) -> None:
        self.disconnect()
        self._thread.join(5)

    def new_id(self) -> int:
        self._next_req += 1
        return self._next_req

    # -- EWrapper ---------------------------------------------------------------------------------

    def nextValidId(self, orderId: int) -> None:
        self.ready.set()

    def error(self, reqId, errorCode, errorString, *advanced) -> None:
        self.errors[reqId].append((errorCode, errorString))

    def historicalTicks(self, reqId, ticks, done) -> None:
        self._history(reqId, [(t.time, t.price, t.size) for t in ticks], done)

    def historicalTicksBidAsk(self, reqId, ticks, done) -> None:
        self._history(reqId, [(t.time, t.priceBid, t.priceAsk, t.sizeBid, t.sizeAsk, t.tickAttribBidAsk.bidPastLow,
                               t.tickAttribBidAsk.askPastHigh) for t in ticks], done)

    def historicalTicksLast(self, reqId, ticks, done) -> None:
        self._history(reqId, [(t.time, t.price, t.size, t.exchange, t.specialConditions, t.tickAttribLast.pastLimit,
                               t.tickAttribLast.unreported) for t in ticks], done)

    def _history(self, req_id: int, ticks: list, done: bool) -> None:
        self.messages[req_id].append((ticks, done))
        if done:
            self.done.add(req_id)

    def contractDetails(self, reqId, contractDetails) -> None:
        self.details[reqId].append(contractDetails)

    def contractDetailsEnd(self, reqId) -> None:
        self.details_end.add(reqId)

    def tickByTickBidAsk(self, reqId, time, bidPrice, askPrice, bidSize, askSize, tickAttribBidAsk) -> None:
        self.tick_by_tick[reqId].append((time, bidPrice, askPrice, bidSize, askSize, tickAttribBidAsk.bidPastLow,
                                         tickAttribBidAsk.askPastHigh))

    def tickPrice(self, reqId, tickType, price, attrib) -> None:
        self.market_data[reqId].append(("price", tickType, price, attrib.canAutoExecute, attrib.pastLimit))

    def tickSize(self, reqId, tickType, size) -> None:
        self.market_data[reqId].append(("size", tickType, size))

    def tickSnapshotEnd(self, reqId) -> None:
        self.snapshot_end.add(reqId)

    # -- requests ---------------------------------------------------------------------------------

    def history(self, contract: Contract, start: str, end: str, number: int, what: str) -> tuple[int, list]:
        """(reqId, every tick of the answer) — the list is empty after an error (see ``errors[reqId]``)."""
        req_id = self.new_id()
        self.reqHistoricalTicks(req_id, contract, start, end, number, what, 0, True, [])
        wait_until(lambda: req_id in self.done or req_id in self.errors, what=f"history request {req_id}")
        return req_id, [tick for ticks, _ in self.messages[req_id] for tick in ticks]

    def history_error(self, contract: Contract, start: str, end: str, number: int, what: str) -> int | None:
        """The error code a history request got (None: it got ticks)."""
        req_id, _ = self.history(contract, start, end, number, what)
        return self.errors[req_id][0][0] if self.errors[req_id] else None

    def contract_details(self, contract: Contract) -> list:
        req_id = self.new_id()
        self.reqContractDetails(req_id, contract)
        wait_until(lambda: req_id in self.details_end or req_id in self.errors, what="contract details")
        return self.details[req_id]


def by_con_id(con_id: int, exchange: str = "") -> Contract:
    contract = Contract()
    contract.conId = con_id
    contract.exchange = exchange
    return contract


def ib_text(moment: datetime, zone: str = " UTC") -> str:
    return f"{moment.astimezone(UTC):%Y%m%d %H:%M:%S}{zone}"


@dataclasses.dataclass(frozen=True)
class DailyClose(SimContract):
    """A contract whose sessions run close to close, every day closing at ``closes_at`` UTC."""

    closes_at: time = time(0, 0)

    def hours(self, today, days: int = 7) -> tuple[str, str]:
        hhmm = f"{self.closes_at:%H%M}"
        spans = ";".join(f"{day - timedelta(days=1):%Y%m%d}:{hhmm}-{day:%Y%m%d}:{hhmm}"
                         for day in (today + timedelta(days=i) for i in range(days)))
        return spans, spans


def daily_close(closes_at: time, template: SimContract = SIM_MNQ) -> DailyClose:
    """``template`` trading close to close at ``closes_at`` UTC (no exchange calendar: sec type CASH)."""
    values = {f.name: getattr(template, f.name) for f in dataclasses.fields(SimContract)}
    return DailyClose(**values | {"sec_type": "CASH", "exchange": "IDEALPRO", "time_zone": "UTC"}, closes_at=closes_at)


def far_close() -> DailyClose:
    """MNQ with its session close an hour away from now, so no test request meets it."""
    return daily_close((datetime.now(UTC) + timedelta(hours=1)).time().replace(second=0, microsecond=0))
