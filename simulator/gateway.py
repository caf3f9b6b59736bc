"""The gateway simulator: a TCP server speaking the IB API wire protocol to the real ``ibapi`` client.

It implements the handshake (``API\\0``, version negotiation, ``startApi``), ``nextValidId``,
``managedAccounts``, farm status messages, ``reqContractDetails``, ``reqTickByTickData`` /
``cancelTickByTickData``, ``reqHistoricalTicks`` (with IB's pacing), ``reqMktData`` /
``cancelMktData`` (throttled top-of-book snapshots), ``reqCurrentTime`` and ``error`` messages.
By default it plays a fresh tape per subscription (synthetic or replayed from our archive); with
``market_clock=True`` every stream has one market on the wall clock that subscriptions join
(:meth:`GatewaySimulator.market`). History always comes from that market. Tests drive faults through the public
methods: :meth:`GatewaySimulator.drop_connections`, :meth:`~GatewaySimulator.stall`,
:meth:`~GatewaySimulator.send_error`, :meth:`~GatewaySimulator.refuse`,
:meth:`~GatewaySimulator.connectivity_lost` / ``connectivity_restored``,
:meth:`~GatewaySimulator.farm_broken` / ``farm_restored`` and :meth:`~GatewaySimulator.send_raw`.

Every tick written to a socket is logged per (contract, tick type) so a test can compare what
was sent with what the Flight server serves (:meth:`GatewaySimulator.sent`,
:meth:`GatewaySimulator.mkt_data_sent`).
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from ibapi.message import IN, OUT
from ibapi.server_versions import (
    MIN_SERVER_VER_AGG_GROUP,
    MIN_SERVER_VER_MARKET_RULES,
    MIN_SERVER_VER_MD_SIZE_MULTIPLIER,
    MIN_SERVER_VER_REAL_EXPIRATION_DATE,
    MIN_SERVER_VER_STOCK_TYPE,
    MIN_SERVER_VER_TICK_BY_TICK_IGNORE_SIZE,
    MIN_SERVER_VER_UNDERLYING_INFO,
)

from ibstream.core.framing import frame as length_prefixed
from ibstream.core.times import now_us, to_us
from ibstream.simulator.history import (
    NO_PERMISSIONS,
    HistoryDesk,
    HistoryError,
    HistoryPacing,
    HistoryRequest,
    tick_frames,
)
from ibstream.simulator.market import SIM_CONTRACTS, Chunk, MarketTape, SimContract, Tape, synthetic_tape
from ibstream.simulator.wire import (
    HANDSHAKE_PREFIX,
    FrameReader,
    WireError,
    fields_of,
    frame,
    parse_version_range,
    size_text,
)
from ibstream.storage.schemas import TIMESTAMP, TickType

log = logging.getLogger(__name__)

SERVER_VERSION = 157  # the highest version ibapi 9.81 speaks; newer clients are negotiated down to it
ACCOUNT = "DU1234567"


MESSAGES = {
    101: "Max number of tickers has been reached.",
    102: "Duplicate ticker ID.",
    200: "No security definition has been found for the request",
    321: "Error validating request.-'bX' : cause - Invalid tick type",
    326: "Unable to connect as the client id is already in use. Retry with a unique client id.",
    354: "Requested market data is not subscribed. Check API status by selecting the Account menu then under "
         "Management choose Market Data Subscription Manager and/or check the API settings.",
    1100: "Connectivity between IB and Trader Workstation has been lost.",
    1101: "Connectivity between IB and Trader Workstation has been restored - data lost.",
    1102: "Connectivity between IB and Trader Workstation has been restored - data maintained.",
    2103: "Market data farm connection is broken:usfarm",
    2104: "Market data farm connection is OK:usfarm",
    2105: "HMDS data farm connection is broken:ushmds",
    2106: "HMDS data farm connection is OK:ushmds",
    2107: "HMDS data farm connection is inactive but should be available upon demand.ushmds",
    2108: "Market data farm connection is inactive but should be available upon demand.usfarm",
    2158: "Sec-def data farm connection is OK:secdefnj",
    10190: "Max number of tick-by-tick requests has been reached.",
}

# Frames that break ibapi 9.81's decoder in the ways a confused gateway or a bad proxy would.
MALFORMED_FRAMES = (
    frame("abc", "1"),                                   # message id is not a number
    frame(IN.TICK_BY_TICK, 1, 3, 1_700_000_000, 1.0),    # tick-by-tick bid/ask cut short
    frame(IN.TICK_BY_TICK, "x", 3, "y", "z", "", "", "", ""),  # garbage in numeric fields
    frame(IN.CONTRACT_DATA, 8),                          # contract details with no body
    frame(987, 1, "unknown message id"),                 # a message ibapi does not know
)

TapeFactory = Callable[[SimContract, TickType, int], Tape]  # n = 0: the market tape, 1, 2, ...: subscriptions

# reqMktData tick types (ibapi.ticktype.TickTypeEnum)
BID_SIZE, BID, ASK, ASK_SIZE, LAST, LAST_SIZE = 0, 1, 2, 3, 4, 5
SIZE_OF = {BID: BID_SIZE, ASK: ASK_SIZE, LAST: LAST_SIZE}
MKT_DATA_SCHEMA = pa.schema([("ts", TIMESTAMP), ("req_id", pa.int64()), ("tick_type", pa.int64()),
                             ("price", pa.float64()), ("size", pa.int64()), ("mask", pa.int64())])


def _row_tails(table: pa.Table, tick_type: TickType) -> list[str]:
    """The fields after the time of each tick-by-tick message, NUL-terminated, one string per row."""
    col = {name: table.column(name) for name in table.column_names}
    rows: Iterable[tuple]
    if tick_type is TickType.BID_ASK:
        mask = pc.add(pc.cast(col["bid_past_low"], pa.int8()), pc.multiply(pc.cast(col["ask_past_high"], pa.int8()), 2))
        rows = zip(col["bid_price"].to_pylist(), col["ask_price"].to_pylist(), size_text(col["bid_size"]),
                   size_text(col["ask_size"]), mask.to_pylist())
    elif tick_type is TickType.MID_POINT:
        rows = zip(col["mid_point"].to_pylist())
    else:
        mask = pc.add(pc.cast(col["past_limit"], pa.int8()), pc.multiply(pc.cast(col["unreported"], pa.int8()), 2))
        rows = zip(col["price"].to_pylist(), size_text(col["size"]), mask.to_pylist(),
                   col["exchange"].to_pylist(), col["special_conditions"].to_pylist())
    return ["".join(f"{value}\0" for value in row) for row in rows]


class _Chunks(Protocol):
    def chunk(self, index: int) -> Chunk | None: ...


class _PrivateTape:
    """A tape only one subscriber reads (default mode): chunks are made as it reaches them, never kept."""

    def __init__(self, tape: Tape):
        self._tape = tape
        self._index = -1
        self._current: Chunk | None = None

    def chunk(self, index: int) -> Chunk | None:
        while self._index < index:
            table = next(self._tape, None)
            if table is None:
                return None
            self._current, self._index = Chunk(table, table.column("ts").to_numpy()), self._index + 1
        return self._current


class _Cursor:
    """A subscriber's place on a tape: the rows due by its clock (µs on the tape's clock), chunk by chunk."""

    def __init__(self, chunks: _Chunks, clock: Callable[[], float], position: tuple[int, int] = (0, 0)):
        self.chunks = chunks
        self.clock = clock
        self.index, self.row = position
        self._tails: list[str] | None = None  # message tails of the current chunk, made once

    def due(self, tick_type: TickType | None = None, now: float | None = None
            ) -> tuple[pa.Table, list[str], np.ndarray] | None:
        """The rows due by ``now`` (default: the clock's now), their tick-by-tick message tails (with
        ``tick_type``) and due times; advances past them."""
        now = self.clock() if now is None else now
        pieces, tails, dues = [], [], []
        while (chunk := self.chunks.chunk(self.index)) is not None:
            stop = int(np.searchsorted(chunk.due, now, side="right"))
            if stop > self.row:
                if tick_type is not None:
                    if self._tails is None:
                        self._tails = _row_tails(chunk.table, tick_type)
                    tails.extend(self._tails[self.row:stop])
                pieces.append(chunk.table.slice(self.row, stop - self.row))
                dues.append(chunk.due[self.row:stop])
                self.row = stop
            if self.row < len(chunk.due):
                break
            self.index, self.row, self._tails = self.index + 1, 0, None
        if not pieces:
            return None
        return pa.concat_tables(pieces), tails, np.concatenate(dues)


@dataclass
class _Subscription:
    req_id: int
    contract: SimContract
    tick_type: TickType
    cursor: _Cursor
    on_market: bool = False  # market-clock mode: rows carry their IB time
    alive: bool = True  # False after a farm flap: IB keeps the request but sends nothing more


@dataclass
class _Quote:
    price: float | None = None
    size: int | None = None


@dataclass
class _MktData:
    """A ``reqMktData`` line: every ``interval`` the latest quote and the last trade since, as changes."""

    req_id: int
    contract: SimContract
    quotes: _Cursor
    trades: _Cursor
    next_at: float
    snapshot: bool
    quote: pa.Table | None = None  # the latest bid/ask row known
    trade: pa.Table | None = None  # a trade since the previous snapshot
    sent: dict[int, _Quote] = field(default_factory=lambda: {BID: _Quote(), ASK: _Quote(), LAST: _Quote()})
    alive: bool = True

    def advance(self, now: float | None = None) -> None:
        """Take in the latest quote and trade due by ``now`` (default: each tape's own now)."""
        for cursor, name in ((self.quotes, "quote"), (self.trades, "trade")):
            if (due := cursor.due(now=now)) is not None:
                setattr(self, name, due[0].slice(due[0].num_rows - 1))

    def changes(self) -> list[tuple[int, float | None, int, int]]:
        """(tick type, price or None for a size tick, size, attribute mask) of what changed since the
        values last sent; they count as sent from now on."""
        sides = []
        if self.quote is not None:
            q = self.quote.to_pylist()[0]
            sides += [(BID, BID_SIZE, q["bid_price"], size_text(self.quote.column("bid_size"))[0],
                       1 | 2 * q["bid_past_low"]),
                      (ASK, ASK_SIZE, q["ask_price"], size_text(self.quote.column("ask_size"))[0],
                       1 | 2 * q["ask_past_high"])]
        if self.trade is not None:
            t = self.trade.to_pylist()[0]
            sides.append((LAST, LAST_SIZE, t["price"], size_text(self.trade.column("size"))[0], 2 * t["past_limit"]))
            self.trade = None
        out: list[tuple[int, float | None, int, int]] = []
        for price_type, size_type, price, size, mask in sides:
            sent = self.sent[price_type]
            if price != sent.price:
                out.append((price_type, price, size, mask))
            elif size != sent.size:
                out.append((size_type, None, size, 0))
            sent.price, sent.size = price, size
        return out


class _ClientConnection:
    """One client connection: a reader thread for requests, a sender thread for ticks."""

    def __init__(self, sim: "GatewaySimulator", sock: socket.socket, address):
        self.sim = sim
        self.sock = sock
        self.address = address
        self.version = 0
        self.client_id: int | None = None
        self.subscriptions: dict[int, _Subscription] = {}
        self.mkt_data: dict[int, _MktData] = {}
        self.closed = threading.Event()
        self._send_lock = threading.Lock()
        self._subs_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read_loop, name=f"gateway-read-{address[1]}", daemon=True)
        self._sender = threading.Thread(target=self._send_loop, name=f"gateway-send-{address[1]}", daemon=True)

    def start(self) -> None:
        self._reader.start()

    # -- output ----------------------------------------------------------------------------------

    def send(self, data: bytes) -> bool:
        with self._send_lock:
            if self.closed.is_set():
                return False
            try:
                self.sock.sendall(data)
                return True
            except OSError:
                self._close_locked()
                return False

    def error(self, req_id: int, code: int, message: str | None = None) -> None:
        self.send(frame(IN.ERR_MSG, 2, req_id, code, message or MESSAGES.get(code, f"error {code}")))

    def peer_gone(self) -> bool:
        """Whether the client has closed its end, even with requests still unread (POLLRDHUP)."""
        try:
            poller = select.poll()
            poller.register(self.sock, select.POLLRDHUP)
            return any(events & (select.POLLRDHUP | select.POLLHUP | select.POLLERR)
                       for _, events in poller.poll(0))
        except (OSError, ValueError):
            return True

    def drop(self) -> None:
        """Server-side disconnect: everything already written is delivered, then EOF."""
        with self._send_lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.sim._forget(self)

    # -- input -----------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        reader = FrameReader()
        buffer = b""
        try:
            while len(buffer) < len(HANDSHAKE_PREFIX):
                data = self.sock.recv(65536)
                if not data:
                    return
                buffer += data
            if not buffer.startswith(HANDSHAKE_PREFIX):
                log.warning("%s: not an IB API client (no API\\0 prefix); closing", self.address)
                return
            pending = reader.feed(buffer[len(HANDSHAKE_PREFIX):])
            while not self.closed.is_set():
                for payload in pending:
                    self.sim._wait_while_stalled(self)
                    if self.closed.is_set():
                        return
                    self._handle(payload)
                data = self.sock.recv(65536)
                if not data:
                    return
                pending = reader.feed(data)
        except (OSError, WireError, ValueError, IndexError) as exc:
            if not self.closed.is_set():
                log.warning("%s: closing after a bad request: %s", self.address, exc)
        finally:
            self.drop()

    def _handle(self, payload: bytes) -> None:
        if not self.version:
            low, high = parse_version_range(payload.decode("ascii"))
            self.version = min(high, SERVER_VERSION)
            if self.version < max(low, MIN_SERVER_VER_TICK_BY_TICK_IGNORE_SIZE):
                raise WireError(f"client speaks v{low}..{high}; the simulator needs {MIN_SERVER_VER_TICK_BY_TICK_IGNORE_SIZE}+")
            stamp = datetime.now(timezone.utc).strftime("%Y%m%d %H:%M:%S UTC")
            self.send(frame(self.version, stamp))
            return
        fields = fields_of(payload)
        message = int(fields[0])
        if message == OUT.START_API:
            self._start_api(int(fields[2]))
        elif message == OUT.REQ_CONTRACT_DATA:
            self._contract_details(fields)
        elif message == OUT.REQ_TICK_BY_TICK_DATA:
            self._subscribe(fields)
        elif message == OUT.CANCEL_TICK_BY_TICK_DATA:
            with self._subs_lock:
                self.subscriptions.pop(int(fields[1]), None)
        elif message == OUT.REQ_HISTORICAL_TICKS:
            self._historical_ticks(fields)
        elif message == OUT.REQ_MKT_DATA:
            self._req_mkt_data(fields)
        elif message == OUT.CANCEL_MKT_DATA:
            with self._subs_lock:
                self.mkt_data.pop(int(fields[2]), None)
        elif message == OUT.REQ_CURRENT_TIME:
            self.send(frame(IN.CURRENT_TIME, 1, int(time.time())))
        elif message == OUT.REQ_IDS:
            self.send(frame(IN.NEXT_VALID_ID, 1, 1))
        else:
            log.debug("%s: ignoring request %s", self.address, fields[0])

    def _start_api(self, client_id: int) -> None:
        if not self.sim._claim_client_id(self, client_id):
            self.error(-1, 326)
            self.drop()
            return
        self.send(frame(IN.NEXT_VALID_ID, 1, 1) + frame(IN.MANAGED_ACCTS, 1, ACCOUNT))
        for code in (2104, 2106, 2158):
            self.error(-1, code)
        self._sender.start()

    def _contract_details(self, fields: list[str]) -> None:
        req_id, con_id, symbol, sec_type, expiry = int(fields[2]), int(fields[3] or 0), fields[4], fields[5], fields[6]
        exchange, currency, include_expired = fields[10], fields[12], fields[15] == "1"
        today = f"{datetime.now(timezone.utc):%Y%m%d}"
        matches = [c for c in self.sim.contracts if c.matches(con_id, symbol, sec_type, expiry, exchange, currency)
                   and (con_id or include_expired or c.sec_type != "FUT" or c.expiry >= today)]
        if not matches or any(self.sim.refusals.get(c.con_id) == 200 for c in matches):
            self.error(req_id, 200)
            return
        self.send(b"".join(self._details_frame(req_id, c) for c in matches) + frame(IN.CONTRACT_DATA_END, 1, req_id))

    def _details_frame(self, req_id: int, c: SimContract) -> bytes:
        trading, liquid = c.hours(datetime.now(timezone.utc).date())
        v = self.version
        fields: list[object] = [IN.CONTRACT_DATA, 8, req_id, c.symbol, c.sec_type, c.expiry, 0.0, "", c.exchange,
                                c.currency, c.local_symbol, c.market_name, c.trading_class, c.con_id,
                                c.market.tick_size]
        if v >= MIN_SERVER_VER_MD_SIZE_MULTIPLIER:
            fields.append(c.md_size_multiplier)
        fields += [c.multiplier, c.order_types, c.valid_exchanges, 1, c.under_con_id, c.long_name,
                   c.primary_exchange, c.expiry[:6], c.industry, c.category, c.subcategory, c.time_zone,
                   trading, liquid, "", 0, 0]
        if v >= MIN_SERVER_VER_AGG_GROUP:
            fields.append(1)
        if v >= MIN_SERVER_VER_UNDERLYING_INFO:
            fields += [c.under_symbol, c.under_sec_type]
        if v >= MIN_SERVER_VER_MARKET_RULES:
            fields.append(c.market_rule_ids)
        if v >= MIN_SERVER_VER_REAL_EXPIRATION_DATE:
            fields.append(c.expiry)
        if v >= MIN_SERVER_VER_STOCK_TYPE:
            fields.append(c.stock_type)
        return frame(*fields)

    def _contract(self, req_id: int, con_id: str, symbol: str, sec_type: str, expiry: str, currency: str
                  ) -> SimContract | None:
        """The one contract a request names (exchange not matched), or None after answering 200."""
        matches = [c for c in self.sim.contracts if c.matches(int(con_id or 0), symbol, sec_type, expiry, "", currency)]
        if len(matches) != 1:
            self.error(req_id, 200)
            return None
        return matches[0]

    def _subscribe(self, fields: list[str]) -> None:
        req_id, exchange, wire_type = int(fields[1]), fields[9], fields[14]
        contract = self._contract(req_id, fields[2], fields[3], fields[4], fields[5], fields[11])
        if contract is None:
            return
        tick_type = TickType.from_ib_name(wire_type)
        refusal = self.sim.refusals.get(contract.con_id)
        with self._subs_lock:
            if refusal:
                self.error(req_id, refusal)
            elif tick_type is None:
                self.error(req_id, 321, MESSAGES[321].replace("bX", wire_type))
            elif req_id in self.subscriptions:
                self.error(req_id, 102)
            elif self.sim.tick_by_tick_limit is not None and self.sim.active_count() >= self.sim.tick_by_tick_limit:
                self.error(req_id, 10190)
            else:
                self.subscriptions[req_id] = _Subscription(req_id, contract, tick_type, self.sim._cursor(
                    contract, tick_type, self.sim.tick_by_tick_start), on_market=self.sim.market_clock)
        log.debug("%s: subscribed %s %s on %s as request %d", self.address, contract.symbol, wire_type, exchange, req_id)

    def _historical_ticks(self, fields: list[str]) -> None:
        """``reqHistoricalTicks``: fields 2-13 the contract, 15 start, 16 end, 17 numberOfTicks, 18 whatToShow,
        19 useRth and 20 ignoreSize (both ignored: the synthetic market has no sessions of its own)."""
        req_id = int(fields[1])
        contract = self._contract(req_id, fields[2], fields[3], fields[4], fields[5], fields[11])
        if contract is None:
            return
        if self.sim.refusals.get(contract.con_id) == 200:
            self.error(req_id, 200)
            return
        try:
            _, table = self.sim.history.answer(contract, fields[15], fields[16], fields[17], fields[18])
        except HistoryError as exc:
            self.error(req_id, exc.code, exc.message)
            return
        self.send(tick_frames(req_id, fields[18], table, self.sim.history_message_ticks))

    def _req_mkt_data(self, fields: list[str]) -> None:
        """``reqMktData`` (version 11): fields 3-14 the contract, then (BAG) combo legs, the delta-neutral
        flag (+3 fields), genericTickList, snapshot, regulatorySnapshot, mktDataOptions."""
        req_id, sec_type = int(fields[2]), fields[5]
        i = 15 + (1 + 4 * int(fields[15] or 0) if sec_type == "BAG" else 0)
        i += 1 + (3 if fields[i] == "1" else 0)
        snapshot = fields[i + 1] == "1"
        contract = self._contract(req_id, fields[3], fields[4], sec_type, fields[6], fields[12])
        if contract is None:
            return
        refusal = self.sim.refusals.get(contract.con_id)
        with self._subs_lock:
            if refusal:
                self.error(req_id, refusal)
            elif req_id in self.mkt_data:
                self.error(req_id, 102)
            elif self.sim.mkt_data_limit is not None and self.sim.mkt_data_count() >= self.sim.mkt_data_limit:
                self.error(req_id, 101)
            else:
                line = _MktData(req_id, contract, self.sim._cursor(contract, TickType.BID_ASK),
                                self.sim._cursor(contract, TickType.LAST),
                                time.monotonic() + self.sim.mkt_data_interval, snapshot)
                if self.sim.market_clock:  # the market is already trading: its current quote and last trade
                    line.quote = self.sim._row_before(line.quotes, contract, TickType.BID_ASK)
                    line.trade = self.sim._row_before(line.trades, contract, TickType.LAST)
                self.mkt_data[req_id] = line
                self.send(frame(IN.MARKET_DATA_TYPE, 1, req_id, 1))  # 1 = real time

    # -- ticks -----------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while not self.closed.wait(self.sim.send_interval):
            with self.sim.market_lock:  # a status change (1100, 1101, ...) never lands mid-round
                if not self._send_round():
                    return

    def _send_round(self) -> bool:
        """Send what each subscription has due; False once the client hung up."""
        now = time.monotonic()
        silent = self.sim.data_paused or now < self.sim.stalled_until
        with self._subs_lock:
            subscriptions = list(self.subscriptions.values())
            lines = [line for line in self.mkt_data.values() if now >= line.next_at]
        seconds = int(time.time())
        if (subscriptions or lines) and self.peer_gone():
            self.drop()  # never log ticks as sent to a client that already hung up
            return False
        for sub in subscriptions:
            due = sub.cursor.due(sub.tick_type)
            if due is None or silent or not sub.alive:
                continue
            rows, tails, due_us = due
            head = f"{IN.TICK_BY_TICK}\0{sub.req_id}\0{sub.tick_type.ib_code}\0"
            if sub.on_market:  # each tick's own IB second
                payloads = [f"{head}{second}\0{tail}".encode("ascii")
                            for second, tail in zip((due_us // 1_000_000).tolist(), tails)]
            else:
                payloads = [f"{head}{seconds}\0{tail}".encode("ascii") for tail in tails]
            data = b"".join(length_prefixed(p) for p in payloads)
            if self.send(data):
                self.sim._log_sent(sub, rows, None if sub.on_market else seconds)
        for line in lines:
            self._send_snapshot(line, now, silent)
        return True

    def _send_snapshot(self, line: _MktData, now: float, silent: bool) -> None:
        line.next_at = max(line.next_at + self.sim.mkt_data_interval, now)
        as_of = now_us()
        line.advance(as_of if self.sim.market_clock else None)  # market clock: exactly the market as of then
        if silent or not line.alive:
            return
        changes = line.changes()
        data = b""
        for tick_type, price, size, mask in changes:
            if price is None:
                data += frame(IN.TICK_SIZE, 6, line.req_id, tick_type, size)
            else:
                data += frame(IN.TICK_PRICE, 6, line.req_id, tick_type, price, size, mask)
                if self.sim.mkt_data_echo_sizes:  # TWS's habit: the size again in its own message
                    data += frame(IN.TICK_SIZE, 6, line.req_id, SIZE_OF[tick_type], size)
        if line.snapshot:
            data += frame(IN.TICK_SNAPSHOT_END, 1, line.req_id)
            with self._subs_lock:
                self.mkt_data.pop(line.req_id, None)
        if data and self.send(data):
            self.sim._log_mkt_data(line, changes, as_of)


class GatewaySimulator:
    """A TCP server on ``host:port`` (0 picks a free port) that ``ibapi`` takes for TWS / IB Gateway."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, contracts: tuple[SimContract, ...] = SIM_CONTRACTS,
                 seed: int = 0, speed: float = 1.0, tapes: TapeFactory | None = None, record_sent: bool = True,
                 send_interval: float = 0.002, market_clock: bool = False, market_start: datetime | None = None,
                 history_pacing: HistoryPacing = HistoryPacing(), history_trades: TickType | str = TickType.LAST,
                 mkt_data_interval: float = 0.25):
        """``market_clock``: one market per stream on the wall clock from ``market_start`` (default: now;
        earlier means history exists at once) that subscriptions join, instead of a fresh tape each.
        ``history_pacing``: IB's historical pacing windows; ``history_trades``: the tape ``TRADES``
        history is served from (``last`` or ``all_last``); ``mkt_data_interval``: seconds between
        ``reqMktData`` snapshots."""
        self.contracts = contracts
        self.seed = seed
        self.speed = speed
        self.tapes = tapes
        self.record_sent = record_sent
        self.send_interval = send_interval
        self.refusals: dict[int, int] = {}
        self.tick_by_tick_limit: int | None = None
        self.tick_by_tick_start = 0.0  # s IB takes to start a subscription (market clock): ticks due meanwhile reach no one
        self.market_clock = market_clock
        self.market_start = market_start or datetime.now(timezone.utc)
        self.history = HistoryDesk(history_pacing, self._market, TickType(history_trades))
        self.history_message_ticks = 1_000  # ticks per HISTORICAL_TICKS* message (done=True on the last)
        self.mkt_data_interval = mkt_data_interval
        self.mkt_data_limit: int | None = None  # market-data lines over all sessions; beyond: error 101
        self.mkt_data_echo_sizes = False  # also send each TICK_PRICE's size as its own TICK_SIZE, as TWS may
        self.data_paused = False
        self.stalled_until = 0.0
        self.market_lock = threading.RLock()  # held by each send round and by every market status change
        self.connections = 0
        self._sessions: list[_ClientConnection] = []
        self._lock = threading.Lock()
        self._sent: dict[tuple[int, TickType], list[pa.Table]] = {}
        self._tape_count: dict[tuple[int, TickType], int] = {}
        self._markets: dict[tuple[int, TickType], MarketTape] = {}
        self._mkt_data_sent: dict[int, list[tuple]] = {}
        self._listener = socket.create_server((host, port), reuse_port=False)
        self.host, self.port = self._listener.getsockname()[:2]
        self._accept_thread = threading.Thread(target=self._accept_loop, name="gateway-accept", daemon=True)
        self._closed = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "GatewaySimulator":
        self._accept_thread.start()
        log.info("gateway simulator listening on %s:%d", self.host, self.port)
        return self

    def stop(self) -> None:
        self._closed.set()
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (close alone does not)
        except OSError:
            pass
        self._listener.close()
        self._accept_thread.join(timeout=5)
        self.drop_connections()

    def __enter__(self) -> "GatewaySimulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                sock, address = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _ClientConnection(self, sock, address)
            with self._lock:
                self._sessions.append(session)
                self.connections += 1
            session.start()

    def _forget(self, session: _ClientConnection) -> None:
        with self._lock:
            if session in self._sessions:
                self._sessions.remove(session)

    def _claim_client_id(self, session: _ClientConnection, client_id: int) -> bool:
        with self._lock:
            if any(s.client_id == client_id for s in self._sessions if s is not session):
                return False
            session.client_id = client_id
            return True

    def _tape(self, contract: SimContract, tick_type: TickType, n: int | None = None) -> Tape:
        """Tape ``n`` of a stream: 0 is its market's, and by default each call makes the next one."""
        if n is None:
            key = (contract.con_id, tick_type)
            with self._lock:
                n = self._tape_count[key] = self._tape_count.get(key, 0) + 1
        if self.tapes is not None:
            return self.tapes(contract, tick_type, n)
        return synthetic_tape(contract, tick_type, seed=self.seed * 1_000 + n, speed=self.speed)

    def _market(self, contract: SimContract, tick_type: TickType) -> MarketTape:
        """The stream's one market on the wall clock, made on first use (it is the same whenever made)."""
        key = (contract.con_id, tick_type)
        with self._lock:
            if key not in self._markets:
                self._markets[key] = MarketTape(self._tape(contract, tick_type, 0), tick_type, to_us(self.market_start))
            return self._markets[key]

    def _cursor(self, contract: SimContract, tick_type: TickType, delay: float = 0.0) -> _Cursor:
        """Where a new subscriber starts: the ticks of the market due from ``delay`` seconds from now on
        (market clock), or a fresh tape timed from now."""
        if self.market_clock:
            market = self._market(contract, tick_type)
            return _Cursor(market, lambda: time.time_ns() // 1_000, market.position_after(now_us() + round(delay * 1e6)))
        started = time.monotonic()
        return _Cursor(_PrivateTape(self._tape(contract, tick_type)), lambda: (time.monotonic() - started) * 1e6)

    def _row_before(self, cursor: _Cursor, contract: SimContract, tick_type: TickType) -> pa.Table | None:
        return self._market(contract, tick_type).row_before(cursor.index, cursor.row)

    def _log_sent(self, sub: _Subscription, rows: pa.Table, seconds: int | None) -> None:
        """Log rows written; ``seconds`` is the wire time of a default-mode round (market rows carry theirs)."""
        if not self.record_sent:
            return
        if seconds is not None:
            rows = self._with_ib_time(rows, seconds)
        with self._lock:
            self._sent.setdefault((sub.contract.con_id, sub.tick_type), []).append(rows)

    def _log_mkt_data(self, line: _MktData, changes: list[tuple[int, float | None, int, int]], stamp: int) -> None:
        if not self.record_sent:
            return
        with self._lock:
            self._mkt_data_sent.setdefault(line.contract.con_id, []).extend(
                (stamp, line.req_id, tick_type, price, size, mask) for tick_type, price, size, mask in changes)

    @staticmethod
    def _with_ib_time(rows: pa.Table, seconds: int) -> pa.Table:
        ib_time = pa.array(np.full(rows.num_rows, seconds * 1_000_000, dtype=np.int64)).cast(rows.schema.field("ib_time").type)
        return rows.set_column(1, rows.schema.field("ib_time"), ib_time)

    def _wait_while_stalled(self, session: _ClientConnection) -> None:
        while time.monotonic() < self.stalled_until and not session.closed.is_set():
            if session.peer_gone():
                session.drop()  # the client gave up on us meanwhile: nothing more is sent to it
                return
            time.sleep(0.01)

    def _each_session(self) -> list[_ClientConnection]:
        with self._lock:
            return list(self._sessions)

    # -- what tests look at ----------------------------------------------------------------------

    def sent(self, contract_id: int, tick_type: TickType | str) -> pa.Table:
        """Every tick of one stream written to any client so far, ``ib_time`` = the wire time (``ts``: the
        tape's offset, or with ``market_clock`` the due wall time as in :meth:`market`)."""
        with self._lock:
            pieces = list(self._sent.get((contract_id, TickType(tick_type)), []))
        return pa.concat_tables(pieces) if pieces else None

    def market(self, contract_id: int, tick_type: TickType | str, start: datetime | None = None,
               end: datetime | None = None) -> pa.Table:
        """Every tick the stream's market made with due time in ``[start, end)`` (default: from its start /
        up to now) that is already due, in the stored tick schema: ``ts`` the due wall time, ``ib_time``
        its whole second. The market exists in both modes; without ``market_clock`` only history uses it."""
        contract = next((c for c in self.contracts if c.con_id == contract_id), None)
        if contract is None:
            raise ValueError(f"the simulator has no contract {contract_id}; it has "
                             f"{', '.join(str(c.con_id) for c in self.contracts)}")
        due_by = now_us() + 1
        return self._market(contract, TickType(tick_type)).between(
            to_us(start, name="start") if start is not None else to_us(self.market_start),
            min(due_by, to_us(end, name="end")) if end is not None else due_by)

    @property
    def history_requests(self) -> list[HistoryRequest]:
        """Every ``reqHistoricalTicks`` so far, answered or not (``code`` None: ticks were sent)."""
        return list(self.history.requests)

    def pacing_violations(self, n: int) -> None:
        """Answer the next ``n`` historical requests with error 162 pacing violation."""
        self.history.forced_violations += n

    def refuse_history(self, con_id: int, code: int = 162, message: str = NO_PERMISSIONS) -> None:
        """Answer historical requests for a contract with ``error(code, message)`` (no permissions by default)."""
        self.history.refusals[con_id] = (code, message)

    def mkt_data_sent(self, contract_id: int) -> pa.Table:
        """Every ``reqMktData`` price/size tick written for a contract: ``ts`` the snapshot's time (with
        ``market_clock``: it shows the market's ticks due by then), ``req_id``,
        ``tick_type`` (1 bid, 2 ask, 4 last: a TICK_PRICE carrying ``size`` and the attribute ``mask``
        too; 0, 3, 5: a TICK_SIZE, ``price`` null, ``mask`` 0). An echoed size is not listed."""
        with self._lock:
            rows = list(self._mkt_data_sent.get(contract_id, []))
        return pa.Table.from_pydict({f.name: [row[i] for row in rows] for i, f in enumerate(MKT_DATA_SCHEMA)},
                                    schema=MKT_DATA_SCHEMA)

    def mkt_data_count(self) -> int:
        """Open ``reqMktData`` lines over all sessions."""
        return sum(len(session.mkt_data) for session in self._each_session())

    def sent_count(self) -> int:
        with self._lock:
            return sum(t.num_rows for pieces in self._sent.values() for t in pieces)

    def subscriptions(self) -> list[tuple[int, TickType]]:
        """Active tick-by-tick subscriptions over all sessions (duplicates show up twice)."""
        return [(s.contract.con_id, s.tick_type) for session in self._each_session()
                for s in list(session.subscriptions.values())]

    def active_count(self) -> int:
        return len(self.subscriptions())

    def session_count(self) -> int:
        return len(self._each_session())

    # -- faults ----------------------------------------------------------------------------------

    def drop_connections(self) -> None:
        """Close every client connection from the gateway's side (like a TWS restart)."""
        for session in self._each_session():
            session.drop()

    def stall(self, seconds: float) -> None:
        """Go silent for ``seconds``: no ticks, no answers, sockets left open."""
        self.stalled_until = time.monotonic() + seconds

    def send_error(self, code: int, req_id: int = -1, message: str | None = None) -> None:
        for session in self._each_session():
            session.error(req_id, code, message)

    def send_raw(self, data: bytes) -> None:
        """Write bytes as they are to every client (malformed frames, see MALFORMED_FRAMES)."""
        for session in self._each_session():
            session.send(data)

    def refuse(self, contract_id: int, code: int = 354) -> None:
        """Answer requests for a contract with an error: 200 (no definition) or 354 (no permissions)."""
        self.refusals[contract_id] = code

    def pause(self) -> None:
        """Stop sending ticks (answers still flow); ticks due meanwhile are skipped, not sent later."""
        with self.market_lock:
            self.data_paused = True

    def resume(self) -> None:
        self.data_paused = False

    def connectivity_lost(self) -> None:
        """IB's servers unreachable from the gateway: error 1100, no data until restored."""
        with self.market_lock:
            self.data_paused = True
            self.send_error(1100)

    def connectivity_restored(self, data_lost: bool) -> None:
        """1101 (subscriptions are gone, the client must resubscribe) or 1102 (they carry on)."""
        with self.market_lock:
            if data_lost:
                for session in self._each_session():
                    with session._subs_lock:
                        session.subscriptions.clear()
                        session.mkt_data.clear()
            self.data_paused = False
            self.send_error(1101 if data_lost else 1102)

    def farm_broken(self) -> None:
        """2103: the market data farm is down; current subscriptions stay silent even after 2104."""
        with self.market_lock:
            for session in self._each_session():
                lines: list[_Subscription | _MktData] = [*session.subscriptions.values(), *session.mkt_data.values()]
                for line in lines:
                    line.alive = False
            self.send_error(2103)

    def farm_restored(self) -> None:
        self.send_error(2104)
