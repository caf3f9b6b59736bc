"""The IB feed: tick-by-tick data from TWS / IB Gateway through the official ``ibapi`` client.

:class:`IBFeed` is a :class:`~recorder.feed.TickFeed`. One supervisor thread owns the
connection: connect (with a timeout), wait for ``nextValidId``, resolve each configured
contract with ``reqContractDetails`` (its details go to the index), subscribe each stream with
``reqTickByTickData``, then watch: a quiet gateway is asked for its time and, if still silent,
dropped and reconnected. A connection that was up drops: the first attempt is at once
(``ib_reconnect_delay``), failed ones back off exponentially; every reconnect subscribes each
stream once, on a fresh request id, as soon as IB's 15 s rule allows (counted from that
stream's previous request). A future given by symbol without expiry is recorded as its front
contract and rolled (``ibstream.core.rolls``, ``proto_docs/futures-rolls.md``). ``ibapi``'s decoder runs on our own
message loop so that a malformed message is logged and skipped instead of ending the session;
well-formed tick-by-tick frames, the hot path, take a one-pass decoder that decodes them exactly
as ``ibapi`` does (``recorder/tick_messages.py``).

IB's status messages and what the feed does (see ``proto_docs/ib-wire-protocol.md``):

====== ==========================================================================
1100   connectivity to IB lost: every stream becomes a gap until 1101/1102
1101   restored, data lost: IB dropped the subscriptions; resubscribe all
1102   restored, data kept: the subscriptions carry on, streams are recorded again
2103   market data farm broken: every stream becomes a gap
2104   market data farm OK: after a 2103, resubscribe all (a flapped feed stays silent)
2105   historical data farm broken: logged only (tick-by-tick is unaffected)
2106-8 farm OK / inactive: logged at info
10190  tick-by-tick subscription limit (also 322 when its text says so): one error line names
       the streams left out; each is retried every ``ib_limit_retry``, meanwhile a gap
       (tick_by_tick_limit) or, with ``market_data_fallback``, recorded from ``reqMktData``
200    no security definition: that contract is skipped until the next connection
354    no market data permissions: that stream is skipped until the next connection
326    client id in use: the next attempt uses the next client id
====== ==========================================================================
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import types
from dataclasses import dataclass, field

import ibapi.client
from ibapi import comm
from ibapi.client import EClient
from ibapi.common import MAX_MSG_LEN, TickAttrib, TickAttribBidAsk, TickAttribLast
from ibapi.contract import Contract
from ibapi.contract import ContractDetails as IBContractDetails
from ibapi.reader import EReader
from ibapi.wrapper import EWrapper

from ibstream.core import rolls
from ibstream.core.errors import InvalidConfigError
from ibstream.core.framing import FrameTooLargeError, split_frames
from ibstream.core.times import from_us, now_us
from ibstream.recorder.feed import Size, TickSink
from ibstream.recorder.tick_messages import BID_ASK, HEAD, MID_POINT, decode_tick_by_tick
from ibstream.settings import ContractSpec, Settings
from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import TickType

log = logging.getLogger(__name__)

INFO_CODES = {2104, 2106, 2107, 2108, 2119, 2158}
CONNECTION_CODES = {502, 504, 509}  # ibapi's own: cannot connect / not connected / socket error
READ_BYTES = 1 << 18  # one socket read: ~4,000 tick messages
MAX_QUEUED_READS = 32  # reads (<= 8 MiB, ~130k messages) received, not yet decoded; when full the socket stops
#                        being read and TCP holds the gateway back
DRAIN_SECONDS = 5.0  # on our own disconnect, decode what was already received for up to this long
LIMITED = ("tick_by_tick_limit", "market_data_fallback")  # states of a stream IB refused tick-by-tick
LIMIT_SETTLE = 0.25  # s without a new refusal before the limit's error line names every stream refused
BID, ASK, LAST, BID_SIZE, ASK_SIZE, LAST_SIZE = 1, 2, 4, 0, 3, 5  # reqMktData tick types (ibapi TickTypeEnum)


class _Reader(EReader):
    """``ibapi``'s socket reader with linear-time framing.

    ibapi 9.81's EReader concatenates ``bytes`` per 4 KiB read and re-slices the whole rest of
    the buffer for every message, which turns quadratic once the recorder falls behind (bench:
    9k ticks/s acknowledged when 150k/s were offered). This one reads up to 256 KiB at a time into
    a bytearray and cuts frames by offset, and queues the frames of each read as one list (one
    queue hand-over per read, not per message). The queue is bounded, so a recorder that cannot
    keep up stops reading and TCP pushes back on the gateway instead of memory growing.
    """

    def run(self) -> None:
        buffer = bytearray()
        try:
            while self.conn.isConnected():
                sock = self.conn.socket
                try:
                    data = sock.recv(READ_BYTES) if sock is not None else b""
                except socket.timeout:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.conn.disconnect()
                    break
                buffer += data
                try:
                    messages = split_frames(buffer, MAX_MSG_LEN)
                except FrameTooLargeError as exc:
                    log.error("the gateway sent a %s: the stream is out of step; reconnecting", exc)
                    self.conn.disconnect()
                    return
                if messages:
                    self.msg_queue.put(messages)
        except Exception:
            log.exception("the IB socket reader failed; the connection will be re-established")


_CONNECTING = threading.Lock()  # EClient.connect reads the reader class from ibapi.client's module namespace


@dataclass(eq=False)
class _TickStream:
    spec: ContractSpec
    tick_type: TickType
    chain: ContractSpec | None = None  # the rolling future this expiry's stream belongs to
    req_id: int | None = None
    retry_at: float = 0.0          # monotonic time before which it is not (re)requested
    last_request: float = float("-inf")
    refused: str | None = None     # reason it is skipped until the next connection
    recording: bool = False
    recorded_as: str = ""          # reason of the open 'recorded' coverage: subscribed or market_data_fallback
    fallback: bool = False         # recorded from reqMktData while IB refuses it tick-by-tick
    unconfirmed: bool = False      # re-requested after the limit: recorded tick-by-tick from its first tick
    state: str = "waiting"         # 'recording', 'market_data_fallback' or why not (the coverage gap's reason)

    @property
    def contract_id(self) -> int:
        """IB's conId: configured, or since the contract was resolved (a stream is requested only then)."""
        return self.spec.con_id or 0


@dataclass
class _Resolution:
    contract: Contract | None = None
    req_id: int | None = None
    details: list[IBContractDetails] = field(default_factory=list)
    failed: str | None = None


class IBConnection(EWrapper, EClient):
    """One ``ibapi`` connection on our reader and message loop, opened by :meth:`open`. Subclasses add
    the callbacks they need: the feed's :class:`_Connection`, the backfill's (``recorder/history.py``)."""

    def __init__(self, reader_class: type = _Reader):
        EClient.__init__(self, self)
        self.reader_class = reader_class
        self.msg_queue: queue.Queue[list[bytes] | bytes] = queue.Queue(maxsize=MAX_QUEUED_READS)  # ibapi's reader: bytes
        self.ready = threading.Event()
        self.last_message = time.monotonic()  # after the last message was handled
        self.malformed = 0
        self.abandon = False
        self.pump_thread = threading.Thread(target=self.pump, name="ib-messages", daemon=True)

    def connect(self, host: str, port: int, clientId: int) -> None:
        """``EClient.connect`` with our reader: ibapi builds ``ibapi.client.reader.EReader`` inside it,
        so that name points at ours for the duration of the call only (ibapi itself is left as it is)."""
        with _CONNECTING:
            stock = ibapi.client.reader
            ibapi.client.reader = types.SimpleNamespace(EReader=self.reader_class)
            try:
                super().connect(host, port, clientId)
            finally:
                ibapi.client.reader = stock

    def open(self, host: str, port: int, client_id: int, timeout: float, stop: threading.Event) -> bool:
        """Connect, start the message loop and wait for ``nextValidId``, all within ``timeout`` seconds
        (or until ``stop`` is set); whether the connection is ready."""
        deadline = time.monotonic() + timeout  # one budget for the handshake and nextValidId
        watchdog = threading.Timer(timeout, lambda: self.conn and self.conn.disconnect())
        watchdog.start()
        try:
            self.connect(host, port, client_id)
        finally:
            watchdog.cancel()
        if not self.isConnected():
            return False
        self.pump_thread.start()
        while not self.ready.wait(0.05):
            if not self.isConnected() or time.monotonic() > deadline or stop.is_set():
                return False
        return True

    def pump(self) -> None:
        """The message loop (instead of ``EClient.run``): one bad message never ends the session."""
        messages, interpret, read_fields, clock = self.msg_queue, self.decoder.interpret, comm.read_fields, time.monotonic
        while (self.isConnected() or not messages.empty()) and not self.abandon:
            try:
                read = messages.get(timeout=0.02)  # short: a disconnect waits for this loop to drain
            except queue.Empty:
                continue
            for text in (read,) if isinstance(read, bytes) else read:
                if self.abandon:
                    break
                try:
                    if not (text.startswith(HEAD) and self.tick_by_tick(text)):
                        interpret(read_fields(text))
                except Exception as exc:  # ibapi raises ValueError, BadMessage, IndexError... on bad input
                    self.malformed += 1
                    log.warning("skipped a malformed message from the gateway (%s: %s): %r",
                                type(exc).__name__, exc, text[:120])
                self.last_message = clock()

    def queued_messages(self) -> int:
        """Messages received and not yet decoded."""
        with self.msg_queue.mutex:
            return sum(1 if isinstance(read, bytes) else len(read) for read in self.msg_queue.queue)

    def tick_by_tick(self, text: bytes) -> bool:
        """Handle a TICK_BY_TICK frame without ``ibapi``'s decoder; False leaves it to ``ibapi``."""
        return False

    # -- EWrapper ----------------------------------------------------------------------------------

    def nextValidId(self, orderId: int) -> None:
        self.ready.set()


@dataclass
class _Chain:
    """A future recorded as its front contract: its expiries and the ones being recorded."""

    spec: ContractSpec
    expiries: list[rolls.Expiry] = field(default_factory=list)
    details: dict[int, IBContractDetails] = field(default_factory=dict)
    children: dict[int, ContractSpec] = field(default_factory=dict)  # conId -> the spec its streams carry
    announced: set[tuple[int, int]] = field(default_factory=set)  # (conId, active from) sent to the sink
    started_us: int | None = None


@dataclass(eq=False)
class _MarketData:
    """One ``reqMktData`` line of a contract whose streams fall back from tick-by-tick: the quote so far."""

    req_id: int
    contract_id: int
    streams: list[_TickStream] = field(default_factory=list)
    bid: float | None = None
    ask: float | None = None
    bid_size: Size | None = None
    ask_size: Size | None = None
    bid_past_low: bool = False
    ask_past_high: bool = False
    mid: float | None = None
    quoted: tuple | None = None  # the quote of the last bid_ask row
    last: float | None = None
    last_size: Size | None = None
    last_past_limit: bool = False
    trade_pending: bool = False  # a last price whose size (the tickSize ibapi decodes from the same message) is due


class _Connection(IBConnection):
    """One connection of the feed: its callbacks forwarded to the feed."""

    def __init__(self, feed: "IBFeed"):
        super().__init__(feed.reader_class)
        self.feed = feed

    def error(self, reqId, errorCode, errorString, *advanced) -> None:
        self.feed._on_error(self, int(reqId), int(errorCode), str(errorString))

    def contractDetails(self, reqId: int, contractDetails: IBContractDetails) -> None:
        self.feed._on_contract_details(reqId, contractDetails)

    def contractDetailsEnd(self, reqId: int) -> None:
        self.feed._on_contract_details_end(self, reqId)

    def tick_by_tick(self, text: bytes) -> bool:
        """The recorder's hot path: a well-formed tick-by-tick frame decoded in one pass, as ``ibapi`` would
        (``recorder/tick_messages.py``), straight to the sink."""
        decoded = decode_tick_by_tick(text)
        if decoded is None:
            return False
        self._deliver(*decoded)
        return True

    def _deliver(self, req_id: int, kind: int, time: int, values: tuple) -> None:
        """A tick-by-tick tick (``values`` in the sink's order) to its stream's sink method."""
        stream = self.feed._tick_stream(self, req_id)
        if stream is None:
            return
        if kind == BID_ASK:
            self.feed.sink.on_bid_ask(stream.contract_id, time, *values)
        elif kind == MID_POINT:
            self.feed.sink.on_mid_point(stream.contract_id, time, *values)
        else:
            self.feed.sink.on_trade(stream.contract_id, stream.tick_type, time, *values)

    def tickByTickBidAsk(self, reqId: int, time: int, bidPrice: float, askPrice: float, bidSize, askSize,
                         tickAttribBidAsk: TickAttribBidAsk) -> None:
        self._deliver(reqId, BID_ASK, time, (bidPrice, askPrice, bidSize, askSize, tickAttribBidAsk.bidPastLow,
                                             tickAttribBidAsk.askPastHigh))

    def tickByTickAllLast(self, reqId: int, tickType: int, time: int, price: float, size,
                          tickAttribLast: TickAttribLast, exchange: str, specialConditions: str) -> None:
        self._deliver(reqId, tickType, time, (price, size, exchange, specialConditions, tickAttribLast.pastLimit,
                                              tickAttribLast.unreported))

    def tickByTickMidPoint(self, reqId: int, time: int, midPoint: float) -> None:
        self._deliver(reqId, MID_POINT, time, (midPoint,))

    def tickPrice(self, reqId: int, tickType: int, price: float, attrib: TickAttrib) -> None:
        self.feed._on_market_price(reqId, tickType, price, attrib.pastLimit)

    def tickSize(self, reqId: int, tickType: int, size) -> None:
        self.feed._on_market_size(reqId, tickType, size)


class IBFeed:
    """Records the configured contracts from TWS / IB Gateway at ``settings.ib_host:ib_port``."""

    def __init__(self, settings: Settings, *, reader_class: type = _Reader):
        """``reader_class``: the socket reader (ours, linear-time; the bench passes ibapi's stock one)."""
        logging.getLogger("ibapi").setLevel(logging.WARNING)  # ibapi logs every request and message at INFO
        self.settings = settings
        self.reader_class = reader_class
        self.sink: TickSink  # set by start(), before any connection
        self.client_id = settings.ib_client_id
        self.connections = 0
        self._resolutions = {spec: _Resolution() for spec in settings.contracts}
        self._streams = [_TickStream(spec, TickType(t)) for spec in settings.contracts for t in spec.tick_types]
        self._chains = {spec: _Chain(spec) for spec in settings.contracts if spec.rolls}
        self._by_request: dict[int, _TickStream] = {}
        self._market_data: dict[int, _MarketData] = {}  # reqMktData request id -> line
        self._limited_logged: set[str] = set()  # streams the last limit line named
        self._limit_message = ""
        self._newly_limited_at = 0.0  # monotonic time IB last refused a stream not already limited
        self._next_req_id = 1_000
        self._farm_broken = False
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._session: _Connection | None = None
        self._down_since: float | None = time.monotonic()  # monotonic; None while connected

    # -- TickFeed ----------------------------------------------------------------------------------

    def start(self, sink: TickSink) -> None:
        self.sink = sink
        self._stop.clear()
        self._thread = threading.Thread(target=self._supervise, name="ib-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Cancel the subscriptions, disconnect, and close every stream's coverage."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- what operators and tests look at ----------------------------------------------------------

    def status(self) -> dict[tuple[str, str], str]:
        """Per (contract, tick type): 'recording', 'market_data_fallback', 'waiting' or why it is not recorded
        (e.g. 'tick_by_tick_limit'). A rolling future's own entries say 'rolling'; its expiries are listed by conId."""
        with self._lock:
            return {(s.spec.describe(), s.tick_type.value): s.state for s in self._streams}

    @property
    def connected(self) -> bool:
        """Connected to the gateway and past the handshake (``nextValidId``)."""
        return self._down_since is None

    def disconnected_for(self) -> float:
        """Seconds since the connection was last lost (or since the feed was made); 0 while connected."""
        since = self._down_since
        return 0.0 if since is None else max(time.monotonic() - since, 0.0)

    def last_message_age(self) -> float | None:
        """Seconds since the gateway last sent anything on the current connection (None before one)."""
        session = self._session
        if session is None or not self.connected:
            return None
        return max(time.monotonic() - session.last_message, 0.0)

    @property
    def farm_ok(self) -> bool:
        """False between IB's 2103 (market data farm broken) and the 2104 that follows."""
        return not self._farm_broken

    def streams(self) -> list[tuple[int, TickType]]:
        """The configured streams whose contract id is known (configured or resolved)."""
        with self._lock:
            return [(s.contract_id, s.tick_type) for s in self._streams if s.contract_id]

    @property
    def malformed(self) -> int:
        session = self._session
        return session.malformed if session is not None else 0

    # -- the connection ----------------------------------------------------------------------------

    def _supervise(self) -> None:
        initial = self.settings.ib_reconnect_initial.total_seconds()
        backoff, logged = initial, ""
        while not self._stop.is_set():
            session = _Connection(self)
            self._session = session
            up_since: float | None = None
            reason = "disconnected"
            try:
                if self._connect(session):
                    up_since = time.monotonic()
                    self.connections += 1
                    self._down_since = None
                    log.info("connected to %s:%d as client %d (server version %d)", self.settings.ib_host,
                             self.settings.ib_port, self.client_id, session.serverVersion())
                    reason = self._watch(session)
            except OSError as exc:  # a send on a socket the gateway closed: reconnect like any drop
                reason = f"socket error: {exc}"
            except Exception:  # never let the supervisor die: the recorder would stop for good
                log.exception("the IB session failed unexpectedly; reconnecting")
                reason = "unexpected error"
            if self._down_since is None:
                self._down_since = time.monotonic()
            self._disconnect(session, reason)
            if self._stop.is_set():
                break
            if up_since is not None and time.monotonic() - up_since >= self.settings.ib_reconnect_stable.total_seconds():
                wait, backoff = self.settings.ib_reconnect_delay.total_seconds(), initial  # a good connection dropped
            else:  # a failed attempt, or a connection that dropped at once: back off
                wait, backoff = backoff, min(backoff * 2, self.settings.ib_reconnect_max.total_seconds())
            (log.warning if reason != logged else log.debug)(
                "no connection to the gateway at %s:%d (%s); retrying in %.1f s", self.settings.ib_host,
                self.settings.ib_port, reason, wait)
            logged = "" if up_since is not None else reason
            self._stop.wait(wait)

    def _connect(self, session: _Connection) -> bool:
        return session.open(self.settings.ib_host, self.settings.ib_port, self.client_id,
                            self.settings.ib_connect_timeout.total_seconds(), self._stop)

    def _watch(self, session: _Connection) -> str:
        """Resolve, subscribe and supervise until the session ends; returns why it ended."""
        heartbeat = self.settings.ib_heartbeat.total_seconds()
        asked_time = False
        while not self._stop.is_set():
            if not session.isConnected():
                return "the gateway closed the connection"
            quiet = time.monotonic() - session.last_message
            if quiet > 3 * heartbeat:
                log.error("the gateway sent nothing for %.1f s (not even the time); reconnecting", quiet)
                return "gateway silent"
            if quiet > heartbeat and not asked_time:
                session.reqCurrentTime()
                asked_time = True
            elif quiet <= heartbeat:
                asked_time = False
            with self._lock:
                self._resolve(session)
                self._roll_due(session)
                self._subscribe_due(session)
                self._report_limits()
            self._stop.wait(0.02)
        return "recorder stopped"

    def _disconnect(self, session: _Connection, reason: str) -> None:
        with self._lock:
            if session.isConnected():
                try:
                    for stream in self._streams:
                        if stream.req_id is not None:
                            session.cancelTickByTickData(stream.req_id)
                    for req_id in self._market_data:
                        session.cancelMktData(req_id)
                except OSError as exc:  # the gateway went first; nothing is left to cancel
                    log.info("could not cancel subscriptions on a closed socket: %s", exc)
                session.disconnect()
        if session.pump_thread.is_alive():  # decode what was received before the socket closed
            session.pump_thread.join(DRAIN_SECONDS)
            if session.pump_thread.is_alive():
                session.abandon = True
                log.error("discarded %d received messages not decoded within %.0f s of disconnecting "
                          "(the recorder was behind the gateway)", session.queued_messages(), DRAIN_SECONDS)
        last_message_us = now_us() - int((time.monotonic() - session.last_message) * 1e6)
        with self._lock:
            gap = ("recorder_stopped" if self._stop.is_set()
                   else "gateway_silent" if reason == "gateway silent" else "disconnected")
            self._market_data.clear()
            for stream in self._streams:  # nothing came after the last message handled: the gap starts there
                stream.fallback = False
                self._end(stream, gap, at_us=last_message_us)
                stream.refused = None
            self._by_request.clear()  # and those of expiries rolled off
            for spec, resolution in self._resolutions.items():
                resolution.req_id = None
                if resolution.failed:
                    resolution.failed = None  # retried on the next connection
                if spec.rolls:
                    resolution.contract = None  # a chain is resolved again on every connection
            self._farm_broken = False

    # -- contracts ---------------------------------------------------------------------------------

    def _resolve(self, session: _Connection) -> None:
        """Ask IB for the details of each contract not yet resolved (once per connection)."""
        for spec, resolution in self._resolutions.items():
            if resolution.contract is not None or resolution.failed or resolution.req_id is not None:
                continue
            resolution.req_id = self._new_request()
            resolution.details = []
            session.reqContractDetails(resolution.req_id, self._request_contract(spec))

    @staticmethod
    def _request_contract(spec: ContractSpec) -> Contract:
        contract = Contract()
        if spec.con_id is not None:
            contract.conId = spec.con_id
            contract.exchange = spec.exchange
            return contract
        contract.symbol, contract.secType, contract.exchange = spec.symbol, spec.sec_type, spec.exchange
        contract.currency, contract.lastTradeDateOrContractMonth = spec.currency, spec.expiry
        return contract

    def _resolution_for(self, req_id: int) -> tuple[ContractSpec, _Resolution] | None:
        return next(((spec, r) for spec, r in self._resolutions.items() if r.req_id == req_id), None)

    def _on_contract_details(self, req_id: int, details: IBContractDetails) -> None:
        with self._lock:
            found = self._resolution_for(req_id)
            if found is not None:
                found[1].details.append(details)

    def _on_contract_details_end(self, session: _Connection, req_id: int) -> None:
        with self._lock:
            found = self._resolution_for(req_id)
            if found is None:
                return
            spec, resolution = found
            if spec.rolls and resolution.details:
                self._chain_resolved(spec, resolution.details)
                return
            con_ids = sorted({d.contract.conId for d in resolution.details})
            if len(con_ids) != 1:
                candidates = ", ".join(f"{d.contract.localSymbol} {d.contract.exchange} conId {d.contract.conId}"
                                       for d in resolution.details[:5])
                self._refuse_contract(spec, "ambiguous_contract" if con_ids else "no_security_definition",
                                      f"{len(con_ids)} contracts match ({candidates}); add expiry, exchange or "
                                      "con_id" if con_ids else "IB returned no contract")
                return
            self._resolved(spec, resolution.details[0])

    def _resolved(self, spec: ContractSpec, details: IBContractDetails) -> None:
        """``spec`` is the contract of ``details``: kept for its streams, its details sent to the index."""
        contract = details.contract
        if spec.exchange:
            contract.exchange = spec.exchange
        self._resolutions[spec].contract = contract
        if spec.con_id is None:  # from now on streams carry the resolved id
            self._rebind(spec, spec.model_copy(update={"con_id": contract.conId}))
        self.sink.on_contract_details(_details_record(details))
        log.info("resolved %s: %s %s %s (%s), hours in %s", spec.describe(), contract.localSymbol,
                 contract.secType, contract.exchange, details.longName, details.timeZoneId)

    def _rebind(self, spec: ContractSpec, resolved: ContractSpec) -> None:
        self._resolutions[resolved] = self._resolutions.pop(spec)
        for stream in self._streams:
            if stream.spec == spec:
                stream.spec = resolved

    def _refuse_contract(self, spec: ContractSpec, reason: str, detail: str) -> None:
        self._resolutions[spec].failed = reason
        log.error("cannot record %s: %s (%s); its streams are skipped until the next connection",
                  spec.describe(), reason.replace("_", " "), detail)
        for stream in self._streams:
            if stream.spec == spec:
                self._end(stream, reason)

    # -- futures rolls -----------------------------------------------------------------------------

    def _chain_resolved(self, spec: ContractSpec, found: list[IBContractDetails]) -> None:
        """IB listed the expiries of a rolling future: its roll schedule, from the exchange's zone."""
        chain = self._chains[spec]
        try:
            zone = rolls.exchange_zone(found[0].timeZoneId)
            dated = [(d.contract.conId, rolls.last_trade_date(d.contract.lastTradeDateOrContractMonth)) for d in found]
        except InvalidConfigError as exc:
            self._refuse_contract(spec, "bad_contract_details", str(exc))
            return
        days = spec.roll_days_before_expiry
        expiries = rolls.schedule(dated, zone, self.settings.roll_days_before_expiry if days is None else days,
                                  spec.roll_time or self.settings.roll_time)
        chain.details = {d.contract.conId: d for d in found}
        self._resolutions[spec].contract = found[0].contract  # resolved on this connection
        for stream in self._streams:
            if stream.spec == spec:
                stream.state = "rolling"
        for child in chain.children.values():  # the expiries being recorded: their details refreshed
            if (details := chain.details.get(child.con_id or 0)) is not None:
                self.sink.on_contract_details(_details_record(details))
        if expiries != chain.expiries:
            current = rolls.front(expiries, now_us())
            log.info("%s: %d expiries; front %s, rolling %d calendar days before its last trade date at %s %s",
                     spec.describe(), len(expiries), "none" if current is None else
                     f"conId {current.contract_id} (last trade {current.last_trade_date}, rolls "
                     f"{from_us(current.roll_us).astimezone(zone):%Y-%m-%d %H:%M:%S})",
                     self.settings.roll_days_before_expiry if days is None else days,
                     spec.roll_time or self.settings.roll_time, zone.key)
        chain.expiries = expiries

    def _roll_due(self, session: _Connection) -> None:
        """Record each chain's front (and its neighbour across a roll's overlap); drop the expiries rolled off."""
        now = now_us()
        overlap = int(self.settings.roll_overlap.total_seconds() * 1_000_000)
        for chain in self._chains.values():
            if not chain.expiries:
                continue
            wanted = rolls.wanted(chain.expiries, now, overlap)
            keep = {e.contract_id for e in wanted}
            for contract_id in [c for c in chain.children if c not in keep]:
                self._retire(session, chain, contract_id)
            for expiry in wanted:
                if expiry.contract_id not in chain.children:
                    self._enlist(chain, expiry, now)
            self._announce(chain, now)

    def _enlist(self, chain: _Chain, expiry: rolls.Expiry, now: int) -> None:
        child = ContractSpec(con_id=expiry.contract_id, exchange=chain.spec.exchange, tick_types=chain.spec.tick_types)
        chain.children[expiry.contract_id] = child
        self._resolutions[child] = _Resolution()
        self._resolved(child, chain.details[expiry.contract_id])
        self._streams += [_TickStream(child, TickType(t), chain=chain.spec) for t in child.tick_types]
        if chain.started_us is None:
            chain.started_us = now
        log.info("%s: recording conId %d (last trade %s; it is the front until %s UTC)", chain.spec.describe(),
                 expiry.contract_id, expiry.last_trade_date, f"{from_us(expiry.roll_us):%Y-%m-%d %H:%M:%S}")

    def _retire(self, session: _Connection, chain: _Chain, contract_id: int) -> None:
        child = chain.children.pop(contract_id)
        for stream in [s for s in self._streams if s.spec == child]:
            req_id = stream.req_id
            if req_id is not None:
                session.cancelTickByTickData(req_id)
            if stream.fallback:
                self._stop_fallback(session, stream)
            self._end(stream, "rolled")
            self._streams.remove(stream)
            if req_id is not None:  # ticks already on their way when the cancel went out are still kept
                self._by_request[req_id] = stream
        del self._resolutions[child]
        self._resolutions[chain.spec].contract = None  # the chain is resolved again after a roll
        log.info("%s: stopped recording conId %d: rolled to the next expiry", chain.spec.describe(), contract_id)

    def _announce(self, chain: _Chain, now: int) -> None:
        """Tell the sink the roll schedule as soon as it is known: the front from when it became the front
        (the previous expiry's roll instant, else when recording it began), the next one from its roll instant."""
        current = rolls.front(chain.expiries, now)
        if current is None:
            return
        _, following = rolls.neighbours(chain.expiries, current)
        pieces = []
        if not any(cid == current.contract_id for cid, _ in chain.announced):
            start = rolls.active_from_us(chain.expiries, current)
            pieces.append((current.contract_id, start if start is not None else chain.started_us or now))
        if following is not None:
            pieces.append((following.contract_id, current.roll_us))
        for piece in pieces:
            if piece not in chain.announced:
                chain.announced.add(piece)
                self.sink.on_roll(chain.spec.symbol or "", *piece)

    # -- subscriptions -----------------------------------------------------------------------------

    def _new_request(self) -> int:
        self._next_req_id += 1
        return self._next_req_id

    def _subscribe_due(self, session: _Connection) -> None:
        now = time.monotonic()
        pause = self.settings.ib_resubscribe_pause.total_seconds()
        for stream in self._streams:
            contract = self._resolutions[stream.spec].contract
            if (contract is None or stream.spec.rolls or self._resolutions[stream.spec].failed
                    or stream.req_id is not None or stream.refused or now < stream.retry_at
                    or now - stream.last_request < pause):
                continue
            stream.req_id = self._new_request()
            stream.last_request = now
            self._by_request[stream.req_id] = stream
            session.reqTickByTickData(stream.req_id, contract, stream.tick_type.ib_name, 0, False)
            stream.unconfirmed = stream.state in LIMITED  # a retry after the limit: IB confirms with a tick
            if not stream.unconfirmed:
                self._begin(stream)

    def _tick_stream(self, session: _Connection, req_id: int) -> _TickStream | None:
        """The stream of a tick-by-tick answer. The first tick of a retry after the limit makes it recorded
        tick-by-tick again (and ends its market-data fallback)."""
        stream = self._by_request.get(req_id)
        if stream is not None and stream.unconfirmed:
            with self._lock:
                if stream.unconfirmed:
                    stream.unconfirmed = False
                    if stream.fallback:
                        self._stop_fallback(session, stream)
                    self._begin(stream)
        return stream

    def _begin(self, stream: _TickStream) -> None:
        reason = "market_data_fallback" if stream.fallback else "subscribed"
        stream.state = "market_data_fallback" if stream.fallback else "recording"
        if not stream.recording or stream.recorded_as != reason:
            stream.recording, stream.recorded_as = True, reason
            self.sink.on_stream_state(stream.contract_id, stream.tick_type, True, reason)

    def _end(self, stream: _TickStream, reason: str, *, keep_request: bool = False, at_us: int | None = None) -> None:
        """The stream is no longer received (its request dropped unless ``keep_request``), since ``at_us``
        (default: now)."""
        if not keep_request and stream.req_id is not None:
            self._by_request.pop(stream.req_id, None)
            stream.req_id = None
            stream.unconfirmed = False
        if stream.spec.con_id is not None and (stream.recording or not keep_request):
            self.sink.on_stream_state(stream.contract_id, stream.tick_type, False, reason, at_us)
        stream.recording = False
        stream.state = reason

    def _resubscribe_all(self, session: _Connection, reason: str, *, cancel: bool) -> None:
        for stream in self._streams:
            fell_back = stream.fallback
            if fell_back:  # its market data line is gone too: tick-by-tick is tried again first
                self._stop_fallback(session, stream, cancel=cancel)
                stream.retry_at = 0.0
            if stream.req_id is not None or fell_back:
                if cancel and stream.req_id is not None:
                    session.cancelTickByTickData(stream.req_id)
                self._end(stream, reason)

    # -- the tick-by-tick limit and the market-data fallback ---------------------------------------

    def _limited(self, session: _Connection, stream: _TickStream, code: int, message: str) -> None:
        """IB refused ``stream`` tick-by-tick (its limit): a gap, or recorded from market data; retried later."""
        self._limit_message = f"IB {code}: {message.strip()}"
        stream.retry_at = time.monotonic() + max(self.settings.ib_limit_retry.total_seconds(),
                                                 self.settings.ib_resubscribe_pause.total_seconds())
        if stream.fallback:  # a retry refused again: the market data line carries on
            log.debug("IB %d on %s %s: still at the tick-by-tick limit", code, stream.spec.describe(),
                      stream.tick_type.value)
            self._by_request.pop(stream.req_id or 0, None)
            stream.req_id, stream.unconfirmed = None, False
            return
        if stream.state not in LIMITED:
            self._newly_limited_at = time.monotonic()
        self._end(stream, "tick_by_tick_limit")
        if self.settings.market_data_fallback:
            self._start_fallback(session, stream)

    def _start_fallback(self, session: _Connection, stream: _TickStream) -> None:
        line = next((m for m in self._market_data.values() if m.contract_id == stream.contract_id), None)
        if line is None:
            line = _MarketData(self._new_request(), stream.contract_id)
            self._market_data[line.req_id] = line
            session.reqMktData(line.req_id, self._resolutions[stream.spec].contract, "", False, False, [])
        line.streams.append(stream)
        stream.fallback = True
        self._begin(stream)

    def _stop_fallback(self, session: _Connection, stream: _TickStream, *, cancel: bool = True) -> None:
        stream.fallback = False
        for req_id, line in list(self._market_data.items()):
            if stream in line.streams:
                line.streams.remove(stream)
                if not line.streams:
                    del self._market_data[req_id]
                    if cancel:
                        session.cancelMktData(req_id)

    def _report_limits(self) -> None:
        """One error line when streams are newly left out by the tick-by-tick limit (once IB's refusals of one
        round of requests have settled: each request is refused in a message of its own), one info line when
        they are recorded tick-by-tick again."""
        limited = {f"{s.spec.describe()} {s.tick_type.value}" for s in self._streams if s.state in LIMITED}
        back = {f"{s.spec.describe()} {s.tick_type.value}" for s in self._streams if s.state == "recording"}
        back &= self._limited_logged
        if limited - self._limited_logged and time.monotonic() - self._newly_limited_at >= LIMIT_SETTLE:
            rolling = sorted({s.chain.describe() for s in self._streams if s.chain is not None and s.state in LIMITED})
            log.error("not recorded tick-by-tick: %s (%s). IB limits simultaneous tick-by-tick subscriptions (3 on a "
                      "base account, 1 per 100 market data lines, at most 60)%s; %s; retrying every %g s. Record "
                      "fewer streams or add market data lines.", ", ".join(sorted(limited)), self._limit_message,
                      f"; a roll's overlap counts both expiries of {', '.join(rolling)}" if rolling else "",
                      "recording them from market data (reqMktData) meanwhile" if self.settings.market_data_fallback
                      else "they are gaps in coverage (tick_by_tick_limit)",
                      self.settings.ib_limit_retry.total_seconds())
            self._limited_logged |= limited
        if back:
            log.info("recorded tick-by-tick again: %s", ", ".join(sorted(back)))
        self._limited_logged -= back

    def _on_market_price(self, req_id: int, tick: int, price: float, past_limit: bool) -> None:
        line = self._market_data.get(req_id)
        if line is None:
            return
        if tick == BID:
            line.bid, line.bid_past_low = price, past_limit
        elif tick == ASK:
            line.ask, line.ask_past_high = price, past_limit
        elif tick == LAST:
            line.last, line.last_past_limit, line.trade_pending = price, past_limit, True

    def _on_market_size(self, req_id: int, tick: int, size) -> None:
        """Rows from a market data line (ibapi reports each price message's size as a tickSize right after it):
        a bid_ask row per size tick that changes the quote, a mid_point row per new (bid + ask) / 2, a trade per
        last price with its size and per size alone that differs from the last one (a new trade at the same
        price; TWS also repeats a size in a message of its own, which changes nothing)."""
        line = self._market_data.get(req_id)
        if line is None:
            return
        ib_time = int(time.time())  # market data carries no time: the second it arrived
        cid = line.contract_id
        if tick in (BID_SIZE, ASK_SIZE):
            if tick == BID_SIZE:
                line.bid_size = size
            else:
                line.ask_size = size
            bid, ask, bid_size, ask_size = line.bid, line.ask, line.bid_size, line.ask_size
            if bid is None or ask is None or bid_size is None or ask_size is None:
                return
            quote = (bid, ask, bid_size, ask_size, line.bid_past_low, line.ask_past_high)
            if quote == line.quoted:
                return
            line.quoted = quote
            mid = (bid + ask) / 2 if bid > 0 and ask > 0 else None
            new_mid = mid is not None and mid != line.mid
            line.mid = mid if mid is not None else line.mid
            for stream in list(line.streams):
                if stream.tick_type is TickType.BID_ASK:
                    self.sink.on_bid_ask(cid, ib_time, bid, ask, bid_size, ask_size, line.bid_past_low,
                                         line.ask_past_high)
                elif stream.tick_type is TickType.MID_POINT and new_mid and mid is not None:
                    self.sink.on_mid_point(cid, ib_time, mid)
        elif tick == LAST_SIZE and line.last is not None and (line.trade_pending or size != line.last_size):
            line.trade_pending, line.last_size = False, size
            for stream in list(line.streams):
                if stream.tick_type in (TickType.LAST, TickType.ALL_LAST):
                    self.sink.on_trade(cid, stream.tick_type, ib_time, line.last, size, "", "",
                                       line.last_past_limit, False)

    # -- IB's messages -----------------------------------------------------------------------------

    def _on_error(self, session: _Connection, req_id: int, code: int, message: str) -> None:
        with self._lock:
            stream = self._by_request.get(req_id)
            resolution = self._resolution_for(req_id)
            if code == 1100:
                log.error("IB %d: %s; streams are gaps until connectivity returns", code, message)
                for s in self._streams:
                    if s.recording:
                        self._end(s, "ib_connectivity_lost", keep_request=True)
            elif code == 1101:
                log.warning("IB %d: %s; resubscribing every stream", code, message)
                self._resubscribe_all(session, "ib_connectivity_lost", cancel=False)
            elif code == 1102:
                log.warning("IB %d: %s; streams carry on", code, message)
                for s in self._streams:
                    if (s.req_id is not None and not s.unconfirmed) or s.fallback:
                        self._begin(s)
            elif code == 2103:
                log.error("IB %d: %s; streams are gaps until the farm is back", code, message)
                self._farm_broken = True
                for s in self._streams:
                    if s.recording:
                        self._end(s, "market_data_farm_broken", keep_request=True)
            elif code == 2104 and self._farm_broken:
                log.warning("IB %d: %s; resubscribing every stream (a flapped feed stays silent otherwise)",
                            code, message)
                self._farm_broken = False
                self._resubscribe_all(session, "market_data_farm_broken", cancel=True)
            elif code == 2105:
                log.warning("IB %d: %s (historical data only; tick-by-tick recording is unaffected)", code, message)
            elif code in INFO_CODES:
                log.info("IB %d: %s", code, message)
            elif code == 326:
                log.error("IB %d: client id %d is in use by another API client; the next attempt uses %d",
                          code, self.client_id, self.client_id + 1)
                self.client_id += 1
            elif stream is not None and (code == 10190 or code == 322 and _says_tick_by_tick_limit(message)):
                self._limited(session, stream, code, message)
            elif code == 354 and stream is not None:
                log.error("IB %d on %s %s: %s; skipped until the next connection. Check the account's market data "
                          "subscriptions.", code, stream.spec.describe(), stream.tick_type.value, message)
                self._end(stream, "no_market_data_permissions")
                stream.refused = "no_market_data_permissions"
            elif code == 200 and (spec := resolution[0] if resolution is not None
                                  else stream.spec if stream is not None else None) is not None:
                self._refuse_contract(spec, "no_security_definition", f"IB {code}: {message}")
            elif code in CONNECTION_CODES:
                log.debug("ibapi %d: %s", code, message)
            elif stream is not None:
                log.warning("IB %d on %s %s: %s", code, stream.spec.describe(), stream.tick_type.value, message)
            else:
                log.warning("IB %d (request %d): %s", code, req_id, message)


def _says_tick_by_tick_limit(message: str) -> bool:
    """IB's 322 ("Error processing request") is the tick-by-tick limit when its text says so, e.g. "... cause -
    Max number of tick-by-tick requests has been reached"."""
    text = message.lower().replace("tick by tick", "tick-by-tick")
    return "tick-by-tick" in text and "max" in text


def _details_record(details: IBContractDetails) -> ContractDetails:
    c = details.contract
    return ContractDetails(
        contract_id=c.conId, symbol=c.symbol, sec_type=c.secType, exchange=c.exchange,
        primary_exchange=c.primaryExchange, currency=c.currency, local_symbol=c.localSymbol,
        trading_class=c.tradingClass, last_trade_date=c.lastTradeDateOrContractMonth, multiplier=c.multiplier,
        min_tick=details.minTick, long_name=details.longName, time_zone=details.timeZoneId,
        trading_hours=details.tradingHours, liquid_hours=details.liquidHours, updated_at_us=now_us())
