"""The gateway simulator: a TCP server speaking the IB API wire protocol to the real ``ibapi`` client.

It implements the handshake (``API\\0``, version negotiation, ``startApi``), ``nextValidId``,
``managedAccounts``, farm status messages, ``reqContractDetails``, ``reqTickByTickData`` /
``cancelTickByTickData``, ``reqCurrentTime`` and ``error`` messages, and plays a tape per
subscription (synthetic or replayed from our archive). Tests drive faults through the public
methods: :meth:`GatewaySimulator.drop_connections`, :meth:`~GatewaySimulator.stall`,
:meth:`~GatewaySimulator.send_error`, :meth:`~GatewaySimulator.refuse`,
:meth:`~GatewaySimulator.connectivity_lost` / ``connectivity_restored``,
:meth:`~GatewaySimulator.farm_broken` / ``farm_restored`` and :meth:`~GatewaySimulator.send_raw`.

Every tick written to a socket is logged per (contract, tick type) so a test can compare what
was sent with what the Flight server serves (:meth:`GatewaySimulator.sent`).
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
from ibstream.simulator.market import SIM_CONTRACTS, SimContract, Tape, synthetic_tape
from ibstream.simulator.wire import HANDSHAKE_PREFIX, FrameReader, WireError, fields_of, frame, parse_version_range
from ibstream.storage.schemas import TickType

log = logging.getLogger(__name__)

SERVER_VERSION = 157  # the highest version ibapi 9.81 speaks; newer clients are negotiated down to it
ACCOUNT = "DU1234567"


MESSAGES = {
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

TapeFactory = Callable[[SimContract, TickType, int], Tape]


def _size_text(column: pa.ChunkedArray | pa.Array) -> list:
    """Sizes as integers when whole. Fractional sizes go out as plain decimals, which only API 163+
    clients decode (ibapi 9.81 reads sizes with int() and skips such a message as malformed)."""
    try:
        return pc.cast(column, pa.int64()).to_pylist()
    except pa.ArrowInvalid:
        return [format(value.normalize(), "f") for value in column.to_pylist()]


def _row_tails(table: pa.Table, tick_type: TickType) -> list[str]:
    """The fields after the time of each tick-by-tick message, NUL-terminated, one string per row."""
    col = {name: table.column(name) for name in table.column_names}
    rows: Iterable[tuple]
    if tick_type is TickType.BID_ASK:
        mask = pc.add(pc.cast(col["bid_past_low"], pa.int8()), pc.multiply(pc.cast(col["ask_past_high"], pa.int8()), 2))
        rows = zip(col["bid_price"].to_pylist(), col["ask_price"].to_pylist(), _size_text(col["bid_size"]),
                   _size_text(col["ask_size"]), mask.to_pylist())
    elif tick_type is TickType.MID_POINT:
        rows = zip(col["mid_point"].to_pylist())
    else:
        mask = pc.add(pc.cast(col["past_limit"], pa.int8()), pc.multiply(pc.cast(col["unreported"], pa.int8()), 2))
        rows = zip(col["price"].to_pylist(), _size_text(col["size"]), mask.to_pylist(),
                   col["exchange"].to_pylist(), col["special_conditions"].to_pylist())
    return ["".join(f"{value}\0" for value in row) for row in rows]


@dataclass
class _Subscription:
    req_id: int
    contract: SimContract
    tick_type: TickType
    tape: Tape
    started: float = field(default_factory=time.monotonic)
    alive: bool = True  # False after a farm flap: IB keeps the request but sends nothing more
    chunk: pa.Table | None = None
    offsets: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    tails: list[str] | None = None
    position: int = 0
    exhausted: bool = False

    def due(self, now: float) -> tuple[pa.Table, list[str]] | None:
        """The rows due by ``now`` (and their message tails), advancing past them."""
        elapsed_us = (now - self.started) * 1e6
        pieces, tails = [], []
        while not self.exhausted:
            if self.chunk is None or self.position >= self.chunk.num_rows:
                try:
                    self.chunk = next(self.tape)
                except StopIteration:
                    self.exhausted = True
                    break
                self.offsets = self.chunk.column("ts").to_numpy()
                self.tails = None
                self.position = 0
            stop = int(np.searchsorted(self.offsets, elapsed_us, side="right"))
            if stop <= self.position:
                break
            if self.tails is None:
                self.tails = _row_tails(self.chunk, self.tick_type)
            pieces.append(self.chunk.slice(self.position, stop - self.position))
            tails.extend(self.tails[self.position:stop])
            self.position = stop
        if not pieces:
            return None
        return pa.concat_tables(pieces), tails


class _ClientConnection:
    """One client connection: a reader thread for requests, a sender thread for ticks."""

    def __init__(self, sim: "GatewaySimulator", sock: socket.socket, address):
        self.sim = sim
        self.sock = sock
        self.address = address
        self.version = 0
        self.client_id: int | None = None
        self.subscriptions: dict[int, _Subscription] = {}
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
        exchange, currency = fields[10], fields[12]
        matches = [c for c in self.sim.contracts if c.matches(con_id, symbol, sec_type, expiry, exchange, currency)]
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

    def _subscribe(self, fields: list[str]) -> None:
        req_id, con_id, symbol, sec_type, expiry = int(fields[1]), int(fields[2] or 0), fields[3], fields[4], fields[5]
        exchange, currency, wire_type = fields[9], fields[11], fields[14]
        matches = [c for c in self.sim.contracts if c.matches(con_id, symbol, sec_type, expiry, "", currency)]
        if len(matches) != 1:
            self.error(req_id, 200)
            return
        contract = matches[0]
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
                tape = self.sim._tape(contract, tick_type)
                self.subscriptions[req_id] = _Subscription(req_id, contract, tick_type, tape)
        log.debug("%s: subscribed %s %s on %s as request %d", self.address, contract.symbol, wire_type, exchange, req_id)

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
        seconds = int(time.time())
        if subscriptions and self.peer_gone():
            self.drop()  # never log ticks as sent to a client that already hung up
            return False
        for sub in subscriptions:
            due = sub.due(now)
            if due is None or silent or not sub.alive:
                continue
            rows, tails = due
            prefix = f"{IN.TICK_BY_TICK}\0{sub.req_id}\0{sub.tick_type.ib_code}\0{seconds}\0"
            payloads = [(prefix + tail).encode("ascii") for tail in tails]
            data = b"".join(length_prefixed(p) for p in payloads)
            if self.send(data):
                self.sim._log_sent(sub, rows, seconds)
        return True


class GatewaySimulator:
    """A TCP server on ``host:port`` (0 picks a free port) that ``ibapi`` takes for TWS / IB Gateway."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, contracts: tuple[SimContract, ...] = SIM_CONTRACTS,
                 seed: int = 0, speed: float = 1.0, tapes: TapeFactory | None = None, record_sent: bool = True,
                 send_interval: float = 0.002):
        self.contracts = contracts
        self.seed = seed
        self.speed = speed
        self.tapes = tapes
        self.record_sent = record_sent
        self.send_interval = send_interval
        self.refusals: dict[int, int] = {}
        self.tick_by_tick_limit: int | None = None
        self.data_paused = False
        self.stalled_until = 0.0
        self.market_lock = threading.RLock()  # held by each send round and by every market status change
        self.connections = 0
        self._sessions: list[_ClientConnection] = []
        self._lock = threading.Lock()
        self._sent: dict[tuple[int, TickType], list[pa.Table]] = {}
        self._tape_count: dict[tuple[int, TickType], int] = {}
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

    def _tape(self, contract: SimContract, tick_type: TickType) -> Tape:
        key = (contract.con_id, tick_type)
        with self._lock:
            n = self._tape_count[key] = self._tape_count.get(key, 0) + 1
        if self.tapes is not None:
            return self.tapes(contract, tick_type, n)
        return synthetic_tape(contract, tick_type, seed=self.seed * 1_000 + n, speed=self.speed)

    def _log_sent(self, sub: _Subscription, rows: pa.Table, seconds: int) -> None:
        if not self.record_sent:
            return
        ib_time = pa.array(np.full(rows.num_rows, seconds * 1_000_000, dtype=np.int64)).cast(rows.schema.field("ib_time").type)
        rows = rows.set_column(1, rows.schema.field("ib_time"), ib_time)
        with self._lock:
            self._sent.setdefault((sub.contract.con_id, sub.tick_type), []).append(rows)

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
        """Every tick of one stream written to any client so far (``ts`` is the tape's offset)."""
        with self._lock:
            pieces = list(self._sent.get((contract_id, TickType(tick_type)), []))
        return pa.concat_tables(pieces) if pieces else None

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
            self.data_paused = False
            self.send_error(1101 if data_lost else 1102)

    def farm_broken(self) -> None:
        """2103: the market data farm is down; current subscriptions stay silent even after 2104."""
        with self.market_lock:
            for session in self._each_session():
                for sub in list(session.subscriptions.values()):
                    sub.alive = False
            self.send_error(2103)

    def farm_restored(self) -> None:
        self.send_error(2104)
