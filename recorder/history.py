"""IB's historical ticks over a connection of their own: what the backfill fills gaps with.

:class:`HistorySession` opens its own ``ibapi`` connection (client id ``backfill_client_id``,
by default ``ib_client_id + 100``), so the recorder's tick-by-tick connection is never
disturbed, on the same reader and message loop as the feed (:class:`~recorder.ib.IBConnection`).
:meth:`HistorySession.fetch_ticks` pages through ``reqHistoricalTicks`` within IB's pacing rules
(:class:`~recorder.pacing.HistoricalPacer`); ``proto_docs/backfill.md`` states the rules.

Paging. A request names ``startDateTime`` (a whole second, UTC) and ``numberOfTicks`` = 1000
with no end; IB answers the first ticks from that second on, *completing the last second*, so a
page may hold more than 1000, and never spans two sessions. The next page starts at the last
returned second + 1 s: nothing is skipped (that second came whole) and nothing comes twice, and
since the last second is never before the start, every page moves the start forward by at
least one second, so a second with more than 1000 ticks cannot loop (paging by the last time
itself would ask for that second for ever). A stretch ends when a page

* returns fewer than 1000 ticks (IB has nothing more up to now or the session's end),
* reaches the end second, or
* returns nothing at or after its start (ticks before the start are dropped as IB's mistake).

Each request stays inside one session: the span is cut at the sessions' closes and each piece is
paged on its own (a piece runs from a close to the next, closed time included: IB answers a start
in closed time from the next open). IB's answers:

====== =====================================================================================
162    "pacing violation" (and 322 "only 50 simultaneous requests"): wait (the pacer, plus a
       backoff that doubles per violation in a row, from ``backfill_pacing_backoff``) and ask
       for the same page again; nothing is lost.
       After 5 in a row the run stops (:class:`~ibstream.core.errors.ServerUnavailableError`).
162    any other message (no data, no permissions for historical data, ...): :class:`HistoryRefused`
200    no security definition: :class:`HistoryRefused`
354    not subscribed: :class:`HistoryRefused`
321    request invalid (322: any other processing error): :class:`HistoryRefused`
====== =====================================================================================

A lost connection, a request unanswered for ``backfill_request_timeout`` or a stop ends the
fetch with :class:`~ibstream.core.errors.ServerUnavailableError`: what was fetched is dropped
(the gap stays a gap and is tried again on the next run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

import pyarrow as pa
from ibapi.contract import Contract

from ibstream.core.errors import IbstreamError, ServerUnavailableError
from ibstream.core.ticks import TickType
from ibstream.core.times import US_PER_SECOND
from ibstream.recorder.ib import CONNECTION_CODES, INFO_CODES, IBConnection
from ibstream.recorder.pacing import HistoricalPacer, HistoricalRequest
from ibstream.recorder.recorder import rows_to_batch
from ibstream.settings import Settings
from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import schema_for

log = logging.getLogger(__name__)

PAGE_TICKS = 1_000  # IB's most per request (it completes the last second, so a page may hold more)
MAX_PACING_RETRIES = 5  # pacing violations in a row on one page before the run gives up
CLIENT_ID_ATTEMPTS = 3  # client ids tried when IB says one is in use (326)
WHAT_TO_SHOW = {TickType.BID_ASK: "BID_ASK", TickType.LAST: "TRADES", TickType.ALL_LAST: "TRADES",
                TickType.MID_POINT: "MIDPOINT"}
REFUSALS = {162, 200, 321, 322, 354}  # historical data refused for the request (unless :func:`_paced`)


def _paced(code: int, message: str) -> bool:
    """IB's answer says "too many requests", not "no": 162 pacing violation, 322 too many open at once."""
    text = message.lower()
    return (code == 162 and "pacing violation" in text) or (code == 322 and "simultaneous" in text)


class HistoryRefused(IbstreamError):
    """IB refused historical ticks for a request: ``code`` and IB's ``message``; ``ticks`` holds what
    earlier pages of the same fetch returned (in the stored schema)."""

    code = "history_refused"

    def __init__(self, ib_code: int, message: str, ticks: pa.Table | None = None):
        super().__init__(f"IB {ib_code}: {message}")
        self.ib_code = ib_code
        self.ib_message = message
        self.ticks = ticks


def backfill_client_id(settings: Settings) -> int:
    """The client id of the backfill's connection: ``backfill_client_id``, else ``ib_client_id + 100``."""
    return settings.backfill_client_id if settings.backfill_client_id is not None else settings.ib_client_id + 100


def ib_contract(details: ContractDetails) -> Contract:
    """The contract a historical request names: IB's conId and the exchange the recorder stored."""
    contract = Contract()
    contract.conId = details.contract_id
    contract.exchange = details.exchange
    return contract


def start_text(second: int) -> str:
    """``startDateTime`` of a request: IB's UTC form ``yyyymmdd-hh:mm:ss``."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y%m%d-%H:%M:%S")


def session_spans(first: int, last: int, closes: Iterable[int] = ()) -> list[tuple[int, int]]:
    """The seconds ``first..last`` (inclusive) cut at each session close (µs): ``(first, last)`` pieces,
    each inside one session (and the closed time before it), so no request spans two."""
    seconds = (-(-close // US_PER_SECOND) for close in closes)  # a close's first second belongs to what follows
    edges = [first, *sorted({second for second in seconds if first < second <= last}), last + 1]
    return [(lo, hi - 1) for lo, hi in zip(edges, edges[1:]) if lo < hi]


def tick_rows(tick_type: TickType, ticks: Iterable) -> list[tuple]:
    """IB's HistoricalTick / HistoricalTickBidAsk / HistoricalTickLast as rows of the stored schema,
    ``ts`` = ``ib_time`` = IB's second (µs); sizes stay exact (int or Decimal)."""
    if tick_type is TickType.BID_ASK:
        return [(t.time * US_PER_SECOND, t.time * US_PER_SECOND, t.priceBid, t.priceAsk, t.sizeBid, t.sizeAsk,
                 t.tickAttribBidAsk.bidPastLow, t.tickAttribBidAsk.askPastHigh) for t in ticks]
    if tick_type is TickType.MID_POINT:
        return [(t.time * US_PER_SECOND, t.time * US_PER_SECOND, t.price) for t in ticks]
    return [(t.time * US_PER_SECOND, t.time * US_PER_SECOND, t.price, t.size, t.exchange, t.specialConditions,
             t.tickAttribLast.pastLimit, t.tickAttribLast.unreported) for t in ticks]


def ticks_table(tick_type: TickType, rows: list[tuple]) -> pa.Table:
    """Rows of :func:`tick_rows` as a table of the stored schema (empty: no rows)."""
    return pa.Table.from_batches([rows_to_batch(tick_type, rows)]) if rows else schema_for(tick_type).empty_table()


class _Pending:
    """One request in flight: its ticks as they arrive, IB's error, set ``done``."""

    def __init__(self) -> None:
        self.ticks: list = []
        self.error: tuple[int, str] | None = None
        self.done = threading.Event()


class _HistoryConnection(IBConnection):
    def __init__(self, session: "HistorySession"):
        super().__init__()
        self.session = session

    def error(self, reqId, errorCode, errorString, *advanced) -> None:
        self.session._on_error(int(reqId), int(errorCode), str(errorString))

    def historicalTicks(self, reqId: int, ticks: list, done: bool) -> None:
        self.session._on_ticks(reqId, ticks, done)

    def historicalTicksBidAsk(self, reqId: int, ticks: list, done: bool) -> None:
        self.session._on_ticks(reqId, ticks, done)

    def historicalTicksLast(self, reqId: int, ticks: list, done: bool) -> None:
        self.session._on_ticks(reqId, ticks, done)


class HistorySession:
    """Historical ticks from TWS / IB Gateway at ``settings.ib_host:ib_port`` over a connection of its
    own (client id :func:`backfill_client_id`); a context manager. ``stop`` (set by the recording
    process on shutdown) ends any wait at once."""

    def __init__(self, settings: Settings, *, pacer: HistoricalPacer | None = None,
                 stop: threading.Event | None = None):
        self.settings = settings
        self.pacer = pacer or HistoricalPacer.from_settings(settings)
        self.stop = stop or threading.Event()
        self.client_id = backfill_client_id(settings)
        self.requests = 0            # sent over this session, refused ones included
        self.pacing_violations = 0
        self._client: _HistoryConnection | None = None
        self._pending: dict[int, _Pending] = {}
        self._next_req_id = 0
        self._connect_error: str | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "HistorySession":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def where(self) -> str:
        return f"the gateway at {self.settings.ib_host}:{self.settings.ib_port}"

    def connect(self) -> None:
        """Open the connection (handshake and ``nextValidId`` within ``ib_connect_timeout``). A client id in
        use (326) moves to the next one, as the feed does, up to :data:`CLIENT_ID_ATTEMPTS` times."""
        for attempt in range(CLIENT_ID_ATTEMPTS):
            self._connect_error = None
            client = _HistoryConnection(self)
            if client.open(self.settings.ib_host, self.settings.ib_port, self.client_id,
                           self.settings.ib_connect_timeout.total_seconds(), self.stop):
                self._client = client
                log.info("backfill connected to %s as client %d", self.where, self.client_id)
                return
            client.disconnect()
            if self._connect_error is None or attempt == CLIENT_ID_ATTEMPTS - 1:
                break
            log.warning("client id %d is in use at %s; the backfill tries %d", self.client_id, self.where,
                        self.client_id + 1)
            self.client_id += 1
        why = f" ({self._connect_error})" if self._connect_error else ""
        raise ServerUnavailableError(
            f"cannot connect to {self.where} as client id {self.client_id} for historical data{why}; start TWS / "
            "IB Gateway with the API enabled, check IBSTREAM_IB_HOST / --ib-port, or set "
            "IBSTREAM_BACKFILL_CLIENT_ID to a free client id")

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client = None

    # -- fetching ----------------------------------------------------------------------------------

    def fetch_ticks(self, contract: ContractDetails, tick_type: TickType | str, start_us: int, end_us: int, *,
                    closes: Iterable[int] = ()) -> pa.Table:
        """IB's ticks of every second from ``floor(start_us)`` to ``floor(end_us)`` inclusive, in IB's
        order, in the stored schema with ``ts`` = ``ib_time`` (whole seconds, µs). ``closes``: the
        session closes (µs) in the span; no request crosses one.

        Raises :class:`HistoryRefused` (with the ticks of earlier pages) when IB refuses, and
        :class:`~ibstream.core.errors.ServerUnavailableError` when the connection is lost, a request
        goes unanswered or the session is stopped."""
        tick_type = TickType.parse(str(tick_type))
        what = WHAT_TO_SHOW[tick_type]
        rows: list[tuple] = []
        try:
            for first, last in session_spans(start_us // US_PER_SECOND, end_us // US_PER_SECOND, closes):
                second = first
                while second <= last:
                    page = self._page(contract, what, second)
                    kept = [t for t in page if t.time >= second]
                    if not kept:
                        break
                    rows += tick_rows(tick_type, (t for t in kept if t.time <= last))
                    newest = max(t.time for t in kept)
                    if len(page) < PAGE_TICKS or newest >= last:
                        break
                    second = newest + 1  # IB completed that second: the next page starts after it
        except HistoryRefused as refused:
            refused.ticks = ticks_table(tick_type, rows)
            raise
        return ticks_table(tick_type, rows)

    def _page(self, contract: ContractDetails, what: str, second: int) -> list:
        """One page from ``second`` on, within the pacing rules; a pacing violation is waited out and
        the same page asked for again."""
        request = HistoricalRequest(contract.contract_id, what, (second, "", PAGE_TICKS))
        backoff = 0.0
        violations = 0
        while True:
            self._wait(self.pacer.delay(request) + backoff)
            code, message, ticks = self._ask(contract, request, second)
            if code is None:
                if violations:
                    log.info("IB answered %s %s from %s after %d pacing violations", contract.contract_id, what,
                             start_text(second), violations)
                return ticks
            if _paced(code, message):
                violations += 1
                self.pacing_violations += 1
                if violations > MAX_PACING_RETRIES:
                    raise ServerUnavailableError(
                        f"IB refused {MAX_PACING_RETRIES + 1} historical requests in a row for pacing ({message}); "
                        "the gaps stay gaps until the next run. Another client of the same account may be using "
                        "up the historical request limits")
                cap = self.settings.backfill_pacing_window.total_seconds()
                backoff = min(self.settings.backfill_pacing_backoff.total_seconds() * 2 ** (violations - 1), cap)
                if violations == 1:
                    log.warning("IB %d on %s %s from %s: %s; asking for the same page again within the pacing "
                                "rules", code, contract.contract_id, what, start_text(second), message)
                continue
            raise HistoryRefused(code, message)

    def _ask(self, contract: ContractDetails, request: HistoricalRequest, second: int
             ) -> tuple[int | None, str, list]:
        """Send one request and wait for its answer: (None, '', ticks) or (IB's code, message, [])."""
        client = self._client
        if client is None or not client.isConnected():
            raise self._lost()
        pending = _Pending()
        with self._lock:
            self._next_req_id += 1
            req_id = self._next_req_id
            self._pending[req_id] = pending
        self.pacer.sent(request)
        self.requests += 1
        try:
            client.reqHistoricalTicks(req_id, ib_contract(contract), start_text(second), "", PAGE_TICKS,
                                      request.what_to_show, 0, False, [])
            deadline = time.monotonic() + self.settings.backfill_request_timeout.total_seconds()
            while not pending.done.wait(0.02):
                if self.stop.is_set():
                    raise ServerUnavailableError("the backfill was stopped; the gaps stay gaps until the next run")
                if not client.isConnected() and client.msg_queue.empty():
                    raise self._lost()
                if time.monotonic() > deadline:
                    raise ServerUnavailableError(
                        f"IB did not answer a historical request in "
                        f"{self.settings.backfill_request_timeout.total_seconds():g} s "
                        "(IBSTREAM_BACKFILL_REQUEST_TIMEOUT); the gap stays a gap until the next run")
        except OSError as exc:  # a send on a socket the gateway closed
            raise ServerUnavailableError(f"the connection to {self.where} failed: {exc}; the gap stays a gap until "
                                         "the next run") from None
        finally:
            self.pacer.finished(request)
            with self._lock:
                self._pending.pop(req_id, None)
        if pending.error is not None:
            return pending.error[0], pending.error[1], []
        return None, "", pending.ticks

    def _lost(self) -> ServerUnavailableError:
        return ServerUnavailableError(f"the connection to {self.where} was lost; the gaps it had not filled stay "
                                      "gaps until the next run")

    def _wait(self, seconds: float) -> None:
        seconds = min(seconds, self.settings.backfill_request_timeout.total_seconds())  # inf: none can be open here
        if seconds > 0 and self.stop.wait(seconds):
            raise ServerUnavailableError("the backfill was stopped; the gaps stay gaps until the next run")

    # -- IB's messages (on the message loop's thread) ----------------------------------------------

    def _on_ticks(self, req_id: int, ticks: list, done: bool) -> None:
        with self._lock:
            pending = self._pending.get(req_id)
        if pending is not None:
            pending.ticks += ticks
            if done:
                pending.done.set()

    def _on_error(self, req_id: int, code: int, message: str) -> None:
        with self._lock:
            pending = self._pending.get(req_id)
        if pending is not None and code in REFUSALS:
            pending.error = (code, message)
            pending.done.set()
        elif code == 326:
            self._connect_error = f"IB {code}: {message}"
        elif code in INFO_CODES or code in CONNECTION_CODES:
            log.debug("IB %d: %s", code, message)
        elif code == 2105:
            log.warning("IB %d: %s (historical data farm; backfill requests may go unanswered)", code, message)
        else:
            log.info("IB %d (request %d): %s", code, req_id, message)
