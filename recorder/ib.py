"""The IB feed: tick-by-tick data from TWS / IB Gateway through the official ``ibapi`` client.

:class:`IBFeed` is a :class:`~recorder.feed.TickFeed`. One supervisor thread owns the
connection: connect (with a timeout), wait for ``nextValidId``, resolve each configured
contract with ``reqContractDetails`` (its details go to the index), subscribe each stream with
``reqTickByTickData``, then watch: a quiet gateway is asked for its time and, if still silent,
dropped and reconnected. Disconnects are retried with exponential backoff; every reconnect
subscribes each stream once, on a fresh request id. ``ibapi``'s decoder runs on our own
message loop so that a malformed message is logged and skipped instead of ending the session.

IB's status messages and what the feed does (see ``proto_docs/ib-wire-protocol.md``):

====== ==========================================================================
1100   connectivity to IB lost: every stream becomes a gap until 1101/1102
1101   restored, data lost: IB dropped the subscriptions; resubscribe all
1102   restored, data kept: the subscriptions carry on, streams are recorded again
2103   market data farm broken: every stream becomes a gap
2104   market data farm OK: after a 2103, resubscribe all (a flapped feed stays silent)
2105   historical data farm broken: logged only (tick-by-tick is unaffected)
2106-8 farm OK / inactive: logged at info
10190  tick-by-tick subscription limit: that stream is a gap, retried after ``ib_limit_retry``
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
from ibapi.common import MAX_MSG_LEN, TickAttribBidAsk, TickAttribLast
from ibapi.contract import Contract
from ibapi.contract import ContractDetails as IBContractDetails
from ibapi.reader import EReader
from ibapi.wrapper import EWrapper

from ibstream.core.framing import FrameTooLargeError, split_frames
from ibstream.core.times import now_us
from ibstream.recorder.feed import TickSink
from ibstream.settings import ContractSpec, Settings
from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import TickType

log = logging.getLogger(__name__)

INFO_CODES = {2104, 2106, 2107, 2108, 2119, 2158}
CONNECTION_CODES = {502, 504, 509}  # ibapi's own: cannot connect / not connected / socket error
MAX_QUEUED_MESSAGES = 200_000  # received, not yet decoded; when full the socket stops being read
DRAIN_SECONDS = 5.0  # on our own disconnect, decode what was already received for up to this long


class _Reader(EReader):
    """``ibapi``'s socket reader with linear-time framing.

    ibapi 9.81's EReader concatenates ``bytes`` per 4 KiB read and re-slices the whole rest of
    the buffer for every message, which turns quadratic once the recorder falls behind (bench:
    9k ticks/s acknowledged when 150k/s were offered). This one reads up to 1 MiB at a time into
    a bytearray and cuts frames by offset. The queue is bounded, so a recorder that cannot keep
    up stops reading and TCP pushes back on the gateway instead of memory growing.
    """

    def run(self) -> None:
        buffer = bytearray()
        try:
            while self.conn.isConnected():
                sock = self.conn.socket
                try:
                    data = sock.recv(1 << 20) if sock is not None else b""
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
                for message in messages:
                    self.msg_queue.put(message)
        except Exception:
            log.exception("the IB socket reader failed; the connection will be re-established")


_CONNECTING = threading.Lock()  # EClient.connect reads the reader class from ibapi.client's module namespace


@dataclass
class _TickStream:
    spec: ContractSpec
    tick_type: TickType
    req_id: int | None = None
    retry_at: float = 0.0          # monotonic time before which it is not (re)requested
    last_request: float = float("-inf")
    refused: str | None = None     # reason it is skipped until the next connection
    recording: bool = False
    state: str = "waiting"         # 'recording' or why not (the coverage gap's reason)

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


class _Connection(EWrapper, EClient):
    """One connection: ``ibapi``'s client, its callbacks forwarded to the feed."""

    def __init__(self, feed: "IBFeed"):
        EClient.__init__(self, self)
        self.reader_class = feed.reader_class
        self.msg_queue: queue.Queue[bytes] = queue.Queue(maxsize=MAX_QUEUED_MESSAGES)
        self.feed = feed
        self.ready = threading.Event()
        self.last_message = time.monotonic()
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

    def pump(self) -> None:
        """The message loop (instead of ``EClient.run``): one bad message never ends the session."""
        messages = self.msg_queue
        while (self.isConnected() or not messages.empty()) and not self.abandon:
            try:
                text = messages.get(timeout=0.2)
            except queue.Empty:
                continue
            self.last_message = time.monotonic()
            try:
                self.decoder.interpret(comm.read_fields(text))
            except Exception as exc:  # ibapi raises ValueError, BadMessage, IndexError... on bad input
                self.malformed += 1
                log.warning("skipped a malformed message from the gateway (%s: %s): %r",
                            type(exc).__name__, exc, text[:120])

    # -- EWrapper ----------------------------------------------------------------------------------

    def nextValidId(self, orderId: int) -> None:
        self.ready.set()

    def error(self, reqId, errorCode, errorString, *advanced) -> None:
        self.feed._on_error(self, int(reqId), int(errorCode), str(errorString))

    def contractDetails(self, reqId: int, contractDetails: IBContractDetails) -> None:
        self.feed._on_contract_details(reqId, contractDetails)

    def contractDetailsEnd(self, reqId: int) -> None:
        self.feed._on_contract_details_end(self, reqId)

    def tickByTickBidAsk(self, reqId: int, time: int, bidPrice: float, askPrice: float, bidSize, askSize,
                         tickAttribBidAsk: TickAttribBidAsk) -> None:
        stream = self.feed._by_request.get(reqId)
        if stream is not None:
            self.feed.sink.on_bid_ask(stream.contract_id, time, bidPrice, askPrice, bidSize, askSize,
                                      tickAttribBidAsk.bidPastLow, tickAttribBidAsk.askPastHigh)

    def tickByTickAllLast(self, reqId: int, tickType: int, time: int, price: float, size,
                          tickAttribLast: TickAttribLast, exchange: str, specialConditions: str) -> None:
        stream = self.feed._by_request.get(reqId)
        if stream is not None:
            self.feed.sink.on_trade(stream.contract_id, stream.tick_type, time, price, size, exchange,
                                    specialConditions, tickAttribLast.pastLimit, tickAttribLast.unreported)

    def tickByTickMidPoint(self, reqId: int, time: int, midPoint: float) -> None:
        stream = self.feed._by_request.get(reqId)
        if stream is not None:
            self.feed.sink.on_mid_point(stream.contract_id, time, midPoint)


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
        self._by_request: dict[int, _TickStream] = {}
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
        """Per (contract, tick type): 'recording', 'waiting' or why it is skipped."""
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
        backoff = self.settings.ib_reconnect_initial.total_seconds()
        while not self._stop.is_set():
            session = _Connection(self)
            self._session = session
            connected_at = time.monotonic()
            reason = "disconnected"
            try:
                if self._connect(session):
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
            if time.monotonic() - connected_at > 60:
                backoff = self.settings.ib_reconnect_initial.total_seconds()
            log.warning("no connection to the gateway at %s:%d (%s); retrying in %.1f s", self.settings.ib_host,
                        self.settings.ib_port, reason, backoff)
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self.settings.ib_reconnect_max.total_seconds())

    def _connect(self, session: _Connection) -> bool:
        timeout = self.settings.ib_connect_timeout.total_seconds()
        deadline = time.monotonic() + timeout  # one budget for the handshake and nextValidId
        watchdog = threading.Timer(timeout, lambda: session.conn and session.conn.disconnect())
        watchdog.start()
        try:
            session.connect(self.settings.ib_host, self.settings.ib_port, self.client_id)
        finally:
            watchdog.cancel()
        if not session.isConnected():
            return False
        session.pump_thread.start()
        while not session.ready.wait(0.05):
            if not session.isConnected() or time.monotonic() > deadline or self._stop.is_set():
                return False
        return True

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
                self._subscribe_due(session)
            self._stop.wait(0.02)
        return "recorder stopped"

    def _disconnect(self, session: _Connection, reason: str) -> None:
        with self._lock:
            if session.isConnected():
                try:
                    for stream in self._streams:
                        if stream.req_id is not None:
                            session.cancelTickByTickData(stream.req_id)
                except OSError as exc:  # the gateway went first; nothing is left to cancel
                    log.info("could not cancel subscriptions on a closed socket: %s", exc)
                session.disconnect()
        if session.pump_thread.is_alive():  # decode what was received before the socket closed
            session.pump_thread.join(DRAIN_SECONDS)
            if session.pump_thread.is_alive():
                session.abandon = True
                log.error("discarded %d received messages not decoded within %.0f s of disconnecting "
                          "(the recorder was behind the gateway)", session.msg_queue.qsize(), DRAIN_SECONDS)
        with self._lock:
            gap = ("recorder_stopped" if self._stop.is_set()
                   else "gateway_silent" if reason == "gateway silent" else "disconnected")
            for stream in self._streams:
                self._end(stream, gap)
                stream.refused = None
            for resolution in self._resolutions.values():
                resolution.req_id = None
                if resolution.failed:
                    resolution.failed = None  # retried on the next connection
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
            con_ids = sorted({d.contract.conId for d in resolution.details})
            if len(con_ids) != 1:
                candidates = ", ".join(f"{d.contract.localSymbol} {d.contract.exchange} conId {d.contract.conId}"
                                       for d in resolution.details[:5])
                self._refuse_contract(spec, "ambiguous_contract" if con_ids else "no_security_definition",
                                      f"{len(con_ids)} contracts match ({candidates}); add expiry, exchange or "
                                      "con_id" if con_ids else "IB returned no contract")
                return
            details = resolution.details[0]
            contract = details.contract
            if spec.exchange:
                contract.exchange = spec.exchange
            resolution.contract = contract
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

    # -- subscriptions -----------------------------------------------------------------------------

    def _new_request(self) -> int:
        self._next_req_id += 1
        return self._next_req_id

    def _subscribe_due(self, session: _Connection) -> None:
        now = time.monotonic()
        pause = self.settings.ib_resubscribe_pause.total_seconds()
        for stream in self._streams:
            contract = self._resolutions[stream.spec].contract
            if (contract is None or self._resolutions[stream.spec].failed or stream.req_id is not None
                    or stream.refused or now < stream.retry_at
                    or now - stream.last_request < pause):
                continue
            stream.req_id = self._new_request()
            stream.last_request = now
            self._by_request[stream.req_id] = stream
            session.reqTickByTickData(stream.req_id, contract, stream.tick_type.ib_name, 0, False)
            self._begin(stream)

    def _begin(self, stream: _TickStream) -> None:
        stream.state = "recording"
        if not stream.recording:
            stream.recording = True
            self.sink.on_stream_state(stream.contract_id, stream.tick_type, True, "subscribed")

    def _end(self, stream: _TickStream, reason: str, *, keep_request: bool = False) -> None:
        """The stream is no longer received (its request dropped unless ``keep_request``)."""
        if not keep_request and stream.req_id is not None:
            self._by_request.pop(stream.req_id, None)
            stream.req_id = None
        if stream.spec.con_id is not None and (stream.recording or not keep_request):
            self.sink.on_stream_state(stream.contract_id, stream.tick_type, False, reason)
        stream.recording = False
        stream.state = reason

    def _resubscribe_all(self, session: _Connection, reason: str, *, cancel: bool) -> None:
        for stream in self._streams:
            if stream.req_id is not None:
                if cancel:
                    session.cancelTickByTickData(stream.req_id)
                self._end(stream, reason)

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
                    if s.req_id is not None:
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
            elif code == 10190 and stream is not None:
                retry = self.settings.ib_limit_retry.total_seconds()
                (log.debug if stream.state == "tick_by_tick_limit" else log.error)("IB %d on %s %s: %s IB limits simultaneous tick-by-tick subscriptions (3 on a base "
                          "account); retrying in %.0f s. Record fewer streams or add market data lines.",
                          code, stream.spec.describe(), stream.tick_type.value, message, retry)
                self._end(stream, "tick_by_tick_limit")
                stream.retry_at = time.monotonic() + retry
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


def _details_record(details: IBContractDetails) -> ContractDetails:
    c = details.contract
    return ContractDetails(
        contract_id=c.conId, symbol=c.symbol, sec_type=c.secType, exchange=c.exchange,
        primary_exchange=c.primaryExchange, currency=c.currency, local_symbol=c.localSymbol,
        trading_class=c.tradingClass, last_trade_date=c.lastTradeDateOrContractMonth, multiplier=c.multiplier,
        min_tick=details.minTick, long_name=details.longName, time_zone=details.timeZoneId,
        trading_hours=details.tradingHours, liquid_hours=details.liquidHours, updated_at_us=now_us())
