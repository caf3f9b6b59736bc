"""Historical ticks as IB serves them (``reqHistoricalTicks``): times, paging, sessions, pacing, frames.

The simulator answers from each stream's :class:`~ibstream.simulator.market.MarketTape`: ticks with
IB time at or after ``startDateTime`` (or at or before ``endDateTime``), at most ``numberOfTicks``
of them completed to whole seconds, never past the end of the trading session the request starts
in, never a tick not yet due. IB's pacing rules are enforced with windows a test may shorten
(:class:`HistoryPacing`). ``proto_docs/ib-wire-protocol.md`` §10 describes it all.
"""

from __future__ import annotations

import bisect
import functools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np
import pyarrow as pa
from ibapi.message import IN

from ibstream.core.times import US_PER_SECOND, now_us, to_us
from ibstream.simulator.market import MarketTape, SimContract
from ibstream.simulator.wire import frame, size_text
from ibstream.storage.schemas import TickType

MAX_TICKS = 1_000  # IB: "Max is 1000 per request"
WHAT_TO_SHOW = ("MIDPOINT", "BID_ASK", "TRADES")
PACING_VIOLATION = "Historical Market Data Service error message:Historical data request pacing violation"
NO_PERMISSIONS = "Historical Market Data Service error message:No market data permissions for CME FUT"
TOO_MANY_OPEN = "Error processing request:Only 50 simultaneous API historical data requests allowed."
_FRAME_IDS = {"MIDPOINT": IN.HISTORICAL_TICKS, "BID_ASK": IN.HISTORICAL_TICKS_BID_ASK,
              "TRADES": IN.HISTORICAL_TICKS_LAST}


class HistoryError(Exception):
    """A request IB answers with ``error(reqId, code, message)`` instead of ticks."""

    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _invalid(cause: str) -> HistoryError:
    return HistoryError(321, f"Error validating request.-'bH' : cause - {cause}")


@dataclass(frozen=True)
class HistoryPacing:
    """IB's historical pacing rules; every window in seconds (defaults = IB's)."""

    identical_seconds: float = 15.0   # an identical request within this is a violation
    burst_seconds: float = 2.0        # burst_requests or more for one contract and whatToShow within this...
    burst_requests: int = 6           # ...is a violation
    window_seconds: float = 600.0     # more than window_requests (BID_ASK counting twice) within this...
    window_requests: int = 60         # ...is a violation
    max_open: int = 50                # more open at once: error 322


@dataclass
class HistoryRequest:
    """One ``reqHistoricalTicks`` as the simulator saw it; ``code`` is the error it got (None: ticks)."""

    when: float  # time.monotonic()
    con_id: int
    what_to_show: str
    start: str
    end: str
    number: int
    code: int | None = None
    ticks: int = 0

    @property
    def key(self) -> tuple:
        return self.con_id, self.what_to_show, self.start, self.end, self.number

    @property
    def weight(self) -> int:
        return 2 if self.what_to_show == "BID_ASK" else 1


def parse_time(text: str, name: str) -> int | None:
    """An IB date-time as µs UTC: ``YYYYMMDD HH:MM:SS`` with an optional zone (`` US/Eastern``; none:
    UTC, the simulator's TWS zone) or ``YYYYMMDD-HH:MM:SS`` (UTC); ``""`` is None."""
    text = text.strip()
    if not text:
        return None
    utc_form = len(text) == 17 and text[8] == "-"
    stamp, zone_name = (text, "") if utc_form else (text[:17], text[17:].strip())
    try:
        moment = datetime.strptime(stamp, "%Y%m%d-%H:%M:%S" if utc_form else "%Y%m%d %H:%M:%S")
        zone = ZoneInfo(zone_name) if zone_name else timezone.utc
    except (ValueError, ZoneInfoNotFoundError):
        raise _invalid(f"{name} {text!r} is not 'YYYYMMDD HH:MM:SS[ zone]' or 'YYYYMMDD-HH:MM:SS'") from None
    return to_us(moment.replace(tzinfo=zone))


@functools.lru_cache(maxsize=256)
def _closes(contract: SimContract, day: date) -> tuple[int, ...]:
    """Closes of the contract's trading sessions (µs UTC) from a week before ``day`` to a week after."""
    from ibstream.storage.sessions import ContractSessions

    first = day - timedelta(days=7)
    sessions = ContractSessions.from_details(contract.details(first, days=15))
    midnight = datetime.combine(first, datetime.min.time(), timezone.utc)
    found = sessions.sessions("extended", to_us(midnight + timedelta(days=2)), to_us(midnight + timedelta(days=12)))
    return tuple(s.close_us for s in found)


def session_bounds(contract: SimContract, moment_us: int) -> tuple[int | None, int | None]:
    """(the last session close at or before ``moment_us``, the first close after it); None if not known.

    The span between two closes is one session plus the closed time before it, so a request starting
    on a weekend runs to the next session's close (the synthetic market itself never closes)."""
    day = datetime.fromtimestamp(moment_us / US_PER_SECOND, timezone.utc).date()
    closes = _closes(contract, day)
    i = bisect.bisect_right(closes, moment_us)
    return (closes[i - 1] if i else None), (closes[i] if i < len(closes) else None)


def whole_seconds(table: pa.Table, number: int, *, forward: bool) -> pa.Table:
    """The first (``forward``) or last ``number`` rows, completed so no IB second is split."""
    if table.num_rows <= number:
        return table
    seconds = table.column("ib_time").cast(pa.int64()).to_numpy()
    if forward:
        return table.slice(0, int(np.searchsorted(seconds, seconds[number - 1], side="right")))
    begin = int(np.searchsorted(seconds, seconds[table.num_rows - number], side="left"))
    return table.slice(begin)


def tick_fields(table: pa.Table, what_to_show: str) -> list[list[object]]:
    """Each tick's fields as ibapi 9.81 decodes them (``decoder.processHistoricalTicks*``)."""
    col = {name: table.column(name) for name in table.column_names}
    seconds = (table.column("ib_time").cast(pa.int64()).to_numpy() // US_PER_SECOND).tolist()
    if what_to_show == "MIDPOINT":  # time, an unused field, price, size (0)
        return [[t, "", price, 0] for t, price in zip(seconds, col["mid_point"].to_pylist())]
    if what_to_show == "BID_ASK":  # mask bit 0 askPastHigh, bit 1 bidPastLow (the reverse of tick-by-tick)
        masks = [int(high) + 2 * int(low) for high, low in zip(col["ask_past_high"].to_pylist(),
                                                               col["bid_past_low"].to_pylist())]
        return [list(row) for row in zip(seconds, masks, col["bid_price"].to_pylist(), col["ask_price"].to_pylist(),
                                          size_text(col["bid_size"]), size_text(col["ask_size"]))]
    masks = [int(past) + 2 * int(unreported) for past, unreported in zip(col["past_limit"].to_pylist(),
                                                                          col["unreported"].to_pylist())]
    return [list(row) for row in zip(seconds, masks, col["price"].to_pylist(), size_text(col["size"]),
                                     col["exchange"].to_pylist(), col["special_conditions"].to_pylist())]


def tick_frames(req_id: int, what_to_show: str, table: pa.Table, per_message: int) -> bytes:
    """The answer: messages of at most ``per_message`` ticks, ``done`` true on the last (one empty
    message when there are none)."""
    rows = tick_fields(table, what_to_show)
    pages = [rows[i:i + per_message] for i in range(0, len(rows), per_message)] or [[]]
    return b"".join(frame(_FRAME_IDS[what_to_show], req_id, len(page), *(f for row in page for f in row),
                          i == len(pages) - 1) for i, page in enumerate(pages))


class HistoryDesk:
    """Answers ``reqHistoricalTicks`` from the markets, enforcing IB's pacing; keeps every request.

    Only requests that passed validation and pacing count toward the pacing windows (a violation
    does not extend them)."""

    def __init__(self, pacing: HistoryPacing, market: Callable[[SimContract, TickType], MarketTape],
                 trades: TickType = TickType.LAST):
        self.pacing = pacing
        self.trades = trades  # the tape TRADES is served from: last or all_last
        self.requests: list[HistoryRequest] = []
        self.refusals: dict[int, tuple[int, str]] = {}
        self.forced_violations = 0
        self.open = 0
        self._market = market
        self._counted: list[HistoryRequest] = []
        self._lock = threading.Lock()

    def answer(self, contract: SimContract, start: str, end: str, number: str, what_to_show: str
               ) -> tuple[HistoryRequest, pa.Table]:
        """The ticks for one request (raises :class:`HistoryError`); the request is logged either way."""
        request = HistoryRequest(time.monotonic(), contract.con_id, what_to_show, start, end,
                                 int(number) if number.lstrip("-").isdigit() else 0)
        with self._lock:
            self.requests.append(request)
        try:
            start_us, end_us = self._validate(request, number)
            self._admit(request)
            try:
                table = self._ticks(contract, request, start_us, end_us)
            finally:
                with self._lock:
                    self.open -= 1
        except HistoryError as exc:
            request.code = exc.code
            raise
        request.ticks = table.num_rows
        return request, table

    def _validate(self, request: HistoryRequest, number: str) -> tuple[int | None, int | None]:
        if request.what_to_show not in WHAT_TO_SHOW:
            raise _invalid(f"whatToShow {request.what_to_show!r} is not one of {', '.join(WHAT_TO_SHOW)}")
        if not number.isdigit() or not 1 <= request.number <= MAX_TICKS:
            raise HistoryError(322, f"Error processing request.-'bH' : cause - numberOfTicks {number!r} must be "
                                    f"1 to {MAX_TICKS}")
        start_us, end_us = parse_time(request.start, "startDateTime"), parse_time(request.end, "endDateTime")
        if (start_us is None) == (end_us is None):
            raise _invalid("exactly one of startDateTime and endDateTime must be given, "
                           f"got start {request.start!r} and end {request.end!r}")
        return start_us, end_us

    def _admit(self, request: HistoryRequest) -> None:
        """Pacing and refusals; on success the request counts toward pacing and is open."""
        p = self.pacing
        with self._lock:
            if self.forced_violations > 0:
                self.forced_violations -= 1
                raise HistoryError(162, PACING_VIOLATION)
            now = request.when
            horizon = max(p.identical_seconds, p.burst_seconds, p.window_seconds)
            self._counted = [r for r in self._counted if now - r.when < horizon]
            recent = self._counted
            stream = (request.con_id, request.what_to_show)
            if (any(r.key == request.key and now - r.when < p.identical_seconds for r in recent)
                    or sum((r.con_id, r.what_to_show) == stream and now - r.when < p.burst_seconds
                           for r in recent) + 1 >= p.burst_requests
                    or sum(r.weight for r in recent if now - r.when < p.window_seconds) + request.weight
                    > p.window_requests):
                raise HistoryError(162, PACING_VIOLATION)
            if self.open >= p.max_open:
                raise HistoryError(322, TOO_MANY_OPEN)
            self._counted.append(request)
            if request.con_id in self.refusals:
                raise HistoryError(*self.refusals[request.con_id])
            self.open += 1

    def _ticks(self, contract: SimContract, request: HistoryRequest, start_us: int | None, end_us: int | None
               ) -> pa.Table:
        tick_type = {"MIDPOINT": TickType.MID_POINT, "BID_ASK": TickType.BID_ASK}.get(request.what_to_show,
                                                                                      self.trades)
        market = self._market(contract, tick_type)
        due_by = now_us() + 1  # nothing not yet due
        if start_us is not None:
            close = session_bounds(contract, start_us)[1]
            table = market.between(start_us, min(due_by, close) if close is not None else due_by)
            return whole_seconds(table, request.number, forward=True)
        assert end_us is not None
        opened = session_bounds(contract, end_us)[0]
        stop = min(due_by, end_us - end_us % US_PER_SECOND + US_PER_SECOND)  # ticks at or before end's second
        table = market.between(opened if opened is not None else market.origin_us, stop)
        return whole_seconds(table, request.number, forward=False)
