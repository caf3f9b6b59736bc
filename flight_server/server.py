"""The Arrow Flight server: FlightDescriptor commands in, record batches out.

RPCs: ``get_flight_info`` / ``get_schema`` plan a :class:`~flight_server.commands.QueryCommand`
into one endpoint per contract and tick type; ``do_get`` streams an endpoint's ticket (ticks,
or bars); ``list_flights`` lists what is stored; ``do_action`` answers ``statistics``,
``sessions`` and ``coverage`` with one Arrow IPC stream each (``list_actions`` describes them).
Errors reach the caller as the matching Arrow/Flight error type:

=============================  =======================  ==================
ibstream error                 raised as                gRPC status
=============================  =======================  ==================
InvalidRequestError            ``pa.ArrowInvalid``      INVALID_ARGUMENT
RequestTooLargeError           ``pa.ArrowInvalid``      INVALID_ARGUMENT
NotFoundError                  ``pa.ArrowKeyError``     NOT_FOUND
CorruptFileError (damaged      ``FlightInternalError``  INTERNAL, the message names the file, the hour
data, a damaged index)                                    and what to do (``ibstream verify``)
anything unexpected            ``FlightInternalError``  INTERNAL
=============================  =======================  ==================
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from ibstream.core.errors import (
    CorruptFileError,
    IbstreamError,
    InvalidConfigError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    ServerBusyError,
    ServerUnavailableError,
    SubscriberTooSlowError,
    UnauthenticatedError,
    shown,
    tagged,
)
from ibstream.core.times import FOREVER_US, MAX_US, MIN_US, duration_us, from_us, iso, now_us, to_us
from ibstream.flight_server.auth import (
    Authenticator,
    AuthMiddlewareFactory,
    Caller,
    TokenEntry,
    caller_of,
    token_entries,
)
from ibstream.flight_server.commands import (
    CoverageBody,
    QueryCommand,
    ScrubBody,
    SessionsBody,
    StatisticsBody,
    Ticket,
    command,
)
from ibstream.settings import Settings
from ibstream.storage.bars import (
    BAR_RESOLUTIONS,
    DAILY,
    PREAGGREGATE_US,
    TICK,
    bar_schema,
    parse_window,
    partial_step_us,
)
from ibstream.storage.live import Cursor, LiveBars, LiveFeed, live_bar_schema
from ibstream.storage.planner import Plan
from ibstream.storage.schemas import SESSIONS_SCHEMA, STATISTICS_SCHEMA, records_table, schema_for
from ibstream.storage.segments import StreamKey, ipc_bytes
from ibstream.storage.sessions import ContractSessions, Session
from ibstream.storage.store import Store

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 2 * 1024 * 1024  # bar batches: well under gRPC's default 4 MiB message limit
SHUTDOWN_SECONDS = 10.0  # how long shutdown waits for calls in progress


class _Query:
    """One call being served: counted when it starts; its duration goes to the stats' listeners once,
    when it is answered (or, for a stream the server reads as it sends, when the stream ends)."""

    def __init__(self, stats: "ServerStats", kind: str):
        self.stats = stats
        self.kind = kind
        self.started = time.perf_counter()
        self.deferred = False  # the stream reports its own end
        self._done = False

    def done(self, ok: bool, *, timed: bool = True) -> None:
        if self._done:
            return
        self._done = True
        self.stats._finished(self.kind, time.perf_counter() - self.started if timed else None, ok)


class ServerStats:
    """What the server has been asked and how it went, for monitoring (:mod:`ibstream.monitoring` reads it).

    ``queries`` and ``errors`` count calls by kind: ``ticks``, ``bars``, ``live`` (do_get by ticket),
    ``flight_info``, ``schema``, ``list_flights``, and each action (``statistics``, ``sessions``,
    ``coverage``, ``scrub``); ``invalid`` for a ticket or action that names none of them. ``listeners``
    are called with (kind, seconds) as each call is answered; a tick stream is timed to its end, a
    live stream not at all.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.queries: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.live_subscribers = 0
        self.slow_readers_dropped = 0
        self.listeners: list[Callable[[str, float], None]] = []

    def start(self, kind: str) -> _Query:
        with self._lock:
            self.queries[kind] = self.queries.get(kind, 0) + 1
        return _Query(self, kind)

    def _finished(self, kind: str, seconds: float | None, ok: bool) -> None:
        if not ok:
            with self._lock:
                self.errors[kind] = self.errors.get(kind, 0) + 1
        if seconds is not None:
            for listener in self.listeners:
                listener(kind, seconds)

    def _live(self, delta: int) -> None:
        with self._lock:
            self.live_subscribers += delta

    def _slow_reader(self) -> None:
        with self._lock:
            self.slow_readers_dropped += 1


_KINDS = {"get_flight_info": "flight_info", "get_schema": "schema", "list_flights": "list_flights"}
_calls = threading.local()  # the _Query of the call a handler thread is serving


def _kind(handler_name: str, args: tuple) -> str:
    if handler_name == "do_get":
        try:
            parsed = Ticket.parse(args[0].ticket)
        except Exception:
            return "invalid"
        return "live" if parsed.live else "ticks" if parsed.resolution == TICK else "bars"
    if handler_name == "do_action":
        action = getattr(args[0], "type", None)
        return action if action in ACTIONS else "invalid"
    return _KINDS.get(handler_name, handler_name)


def _flight_errors(handler: Callable) -> Callable:
    """Turn our errors into Flight's types; keep the server serving whatever happens."""

    @functools.wraps(handler)
    def wrapper(self, context, *args):
        query = self.stats.start(_kind(handler.__name__, args))
        _calls.query = query
        ok = False
        try:
            result = handler(self, context, *args)
            ok = True
            return result
        except InvalidRequestError as exc:
            log.info("%s refused: %s", handler.__name__, exc)
            raise pa.ArrowInvalid(tagged(exc)) from None
        except NotFoundError as exc:
            log.info("%s refused: %s", handler.__name__, exc)
            raise pa.ArrowKeyError(tagged(exc)) from None
        except ServerUnavailableError as exc:
            log.warning("%s refused: %s", handler.__name__, exc)
            raise flight.FlightUnavailableError(tagged(exc)) from None
        except UnauthenticatedError as exc:
            raise flight.FlightUnauthenticatedError(tagged(exc)) from None
        except PermissionDeniedError as exc:
            log.info("%s refused: %s", handler.__name__, exc)
            raise flight.FlightUnauthorizedError(tagged(exc)) from None
        except flight.FlightError:
            raise
        except CorruptFileError as exc:
            log.error("%s failed: %s", handler.__name__, exc)
            raise flight.FlightInternalError(tagged(exc)) from None
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            raise flight.FlightInternalError(
                tagged(IbstreamError(f"{handler.__name__} failed: {type(exc).__name__}: {exc}"))) from None
        finally:
            _calls.query = None
            if not ok or not query.deferred:
                query.done(ok)

    return wrapper


ACTIONS = {
    "statistics": "Daily statistics of a contract from the index (data_statistics), one row per tick type and "
                  "UTC date. Body: {\"contract_id\": int, \"tick_type\": optional}. Result: one Arrow IPC stream.",
    "sessions": "Trading sessions of a contract on a trading date, one row per kind (regular, extended, "
                "pre_market, after_hours, full_day). Body: {\"contract_id\": int, \"date\": \"YYYY-MM-DD\" | "
                "\"current\" | \"previous\"}. Result: one Arrow IPC stream.",
    "coverage": "When a stream was recorded and when not (and why). Body: {\"contract_id\": int, \"tick_type\": str, "
                "\"start\": ISO time, \"end\": optional ISO time}. Result: one Arrow IPC stream.",
    "scrub": "Role admin: check the next archive files now (page CRCs, counts, ts order), quarantining damage, as "
             "the recorder's scrub job does. Body: {\"files\": int (default 10)}. Result: one Arrow IPC stream of "
             "the problems found (none: no rows). Only on a recording server.",
}
ADMIN_ACTIONS = {"scrub"}


class FlightServer(flight.FlightServerBase):
    """Serves a :class:`~storage.store.Store` over Arrow Flight.

    >>> server = FlightServer(store)           # binds settings.flight_location
    >>> server.serve()                         # blocks; or use it in a ``with`` block
    """

    def __init__(self, store: Store, location: str | None = None, *, settings: Settings | None = None, **kwargs):
        """``settings`` bound the queries (spans, rows, streams); by default ``Settings.of(store.settings)``."""
        self.store = store
        self.settings = settings or Settings.of(store.settings)
        self._streams = threading.BoundedSemaphore(self.settings.max_streams)
        self._per_caller: dict[str, int] = {}  # streams held per token (with tokens only)
        self._per_caller_lock = threading.Lock()
        self._stopping = threading.Event()
        self.stats = ServerStats()
        self.authenticator = Authenticator(_token_entries(self.settings))
        tls = _tls_options(self.settings)
        location = location or self.settings.flight_location
        if tls and location.startswith("grpc://"):
            location = "grpc+tls://" + location.removeprefix("grpc://")
        if not self.settings.loopback and not self.settings.allow_insecure and not (tls and self.authenticator.enabled):
            raise InvalidConfigError(f"flight_host {self.settings.flight_host} is not a loopback address and no usable "
                                     "token is configured (the token file is empty?) or TLS is off; add a token "
                                     "(`ibstream token`) or set IBSTREAM_ALLOW_INSECURE=true")
        middleware = {"auth": AuthMiddlewareFactory(self.authenticator)} if self.authenticator.enabled else {}
        try:
            super().__init__(location, middleware=middleware, **tls, **kwargs)
        except (pa.ArrowException, OSError) as exc:
            raise ServerUnavailableError(
                f"the Flight server cannot listen on {location} ({_message(exc)}); is another server using the "
                "port? Pick another with --flight-port (0: any free port)") from None
        if not self.settings.loopback and not (tls and self.authenticator.enabled):
            log.warning("serving %s without %s (IBSTREAM_ALLOW_INSECURE): anyone who reaches this address can read "
                        "every tick", location, " and ".join(
                            part for part, on in (("TLS", bool(tls)), ("tokens", self.authenticator.enabled)) if not on))
        store.warm_in_background()

    # -- RPCs ----------------------------------------------------------------------------------

    @_flight_errors
    def get_flight_info(self, context, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        query = self._command(descriptor)
        tickets = self._tickets(query)
        if not _reads_raw_ticks(query.resolution):  # bars from 1m up: pre-aggregates, no tick estimate
            return flight.FlightInfo(_info_schema(query), descriptor, _endpoints(tickets), -1, -1)
        plans = [self.store.plan(t.contract_id, t.tick_type, t.start_us, t.end_us) for t in tickets]
        rows = self._check_rows(plans, query.resolution)
        if query.resolution != TICK:
            return flight.FlightInfo(_info_schema(query), descriptor, _endpoints(tickets), -1, -1)
        return flight.FlightInfo(
            _info_schema(query), descriptor, _endpoints(tickets), rows, sum(p.estimated_bytes() for p in plans)
        )

    @_flight_errors
    def get_schema(self, context, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(_info_schema(self._command(descriptor)))

    @_flight_errors
    def do_get(self, context, ticket: flight.Ticket) -> flight.FlightDataStream:
        parsed = Ticket.parse(ticket.ticket)
        self._check_ticket(parsed)
        metadata = {"ibstream.contract_id": str(parsed.contract_id)}
        caller = caller_of(context)
        if parsed.live:
            return self._live_stream(context, parsed, metadata, caller)
        if parsed.resolution == TICK:
            return self._tick_stream(parsed, metadata, caller)
        return self._bar_stream(parsed, metadata)

    def _live_stream(self, context, parsed: Ticket, metadata: dict[str, str], caller: Caller) -> flight.FlightDataStream:
        ticks = LiveFeed(self.store, StreamKey(parsed.contract_id, parsed.tick_type),
                         Cursor(parsed.start_us, parsed.skip), parsed.end_us, max_rows=self.settings.live_queue_rows,
                         poll_interval=self.settings.live_poll_interval.total_seconds())
        feed = ticks if parsed.resolution == TICK else LiveBars(ticks, parsed.resolution)
        stopped = lambda: context.is_cancelled() or self._stopping.is_set()  # noqa: E731
        schema = _with_metadata(feed.schema, metadata)
        return flight.GeneratorStream(schema, self._slot(_live(feed, stopped, self._stopping), parsed, caller))

    def _tick_stream(self, parsed: Ticket, metadata: dict[str, str], caller: Caller) -> flight.FlightDataStream:
        schema = _with_metadata(schema_for(parsed.tick_type), metadata)
        if parsed.skip:  # a cursor without live: the ticks after it, up to end
            plan = self.store.plan(parsed.contract_id, parsed.tick_type, parsed.start_us, parsed.end_us)
            self._check_rows([plan], TICK)
            batches = Cursor(parsed.start_us, parsed.skip).unseen(plan.batches())
            return flight.GeneratorStream(schema, self._slot(batches, parsed, caller))
        ticks = self.store.ticks(parsed.contract_id, parsed.tick_type, parsed.start_us, parsed.end_us,
                                 check=lambda plan: self._check_rows([plan], TICK))
        if isinstance(ticks, pa.Table):  # a closed range, from the cache
            return flight.RecordBatchStream(_with_metadata(ticks, metadata))
        return flight.GeneratorStream(schema, self._slot(ticks.batches(), parsed, caller))

    def _bar_stream(self, parsed: Ticket, metadata: dict[str, str]) -> flight.FlightDataStream:
        sessions = None
        if parsed.resolution == DAILY:
            sessions = self.store.sessions(parsed.contract_id).sessions(
                parsed.daily_session or "extended", parsed.start_us, parsed.end_us)
        bars = self.store.bars(parsed.contract_id, parsed.tick_type, parsed.start_us, parsed.end_us,
                               parsed.resolution, fill=parsed.fill, sessions=sessions)
        return flight.RecordBatchStream(_with_metadata(_chunked(bars, self.settings.batch_rows), metadata))

    @_flight_errors
    def list_flights(self, context, criteria: bytes):
        for info in self.store.streams():
            if info.first is None or info.last is None:
                continue
            descriptor = flight.FlightDescriptor.for_command(
                command(info.contract_id, info.tick_type.value, info.first, info.last + timedelta(microseconds=1)))
            ticket = Ticket(
                contract_id=info.contract_id, tick_type=info.tick_type,
                start_us=to_us(info.first), end_us=to_us(info.last) + 1,
            )
            yield flight.FlightInfo(
                schema_for(info.tick_type), descriptor, [flight.FlightEndpoint(ticket.to_bytes(), [])],
                info.tick_count, -1,
            )

    def shutdown(self) -> None:
        """Stop serving: live streams end (their readers resume elsewhere or later from their
        cursor), then the server waits up to ``SHUTDOWN_SECONDS`` for the calls in progress (a
        client that stopped reading would otherwise hold it forever)."""
        self._stopping.set()
        stopping = threading.Thread(target=super().shutdown, name="flight-shutdown", daemon=True)
        stopping.start()
        stopping.join(SHUTDOWN_SECONDS)
        if stopping.is_alive():
            log.warning("the Flight server did not stop within %.0f s (a client is not reading its stream); "
                        "going on without waiting for it", SHUTDOWN_SECONDS)

    def _slot(self, batches, ticket: Ticket, caller: Caller):
        """Stream ``batches`` in one of ``max_streams`` slots (with tokens, at most ``max_streams_per_token``
        of them per token); refuse with UNAVAILABLE when none is free."""
        if not self._streams.acquire(blocking=False):
            raise ServerBusyError(
                f"server busy: {self.settings.max_streams} streams are being served (IBSTREAM_MAX_STREAMS); "
                "retry shortly")
        query: _Query | None = getattr(_calls, "query", None)
        if query is not None:
            query.deferred = True
        if ticket.live:
            self.stats._live(+1)
        if not self.authenticator.enabled:
            return _SlotStream(_streamed(batches, ticket, self.stats, query), self._ended(self._streams.release,
                                                                                       ticket, query))
        cap = self.settings.max_streams_per_token
        with self._per_caller_lock:
            held = self._per_caller.get(caller.name, 0)
            if held < cap:
                self._per_caller[caller.name] = held + 1
        if held >= cap:  # refused: the call's handler counts it as an error
            self._streams.release()
            if ticket.live:
                self.stats._live(-1)
            if query is not None:
                query.deferred = False
            raise ServerBusyError(f"server busy for token {caller.name!r}: it holds {cap} streams "
                                  "(IBSTREAM_MAX_STREAMS_PER_TOKEN); close one or retry shortly")

        def release() -> None:
            with self._per_caller_lock:
                self._per_caller[caller.name] -= 1
            self._streams.release()

        return _SlotStream(_streamed(batches, ticket, self.stats, query), self._ended(release, ticket, query))

    def _ended(self, release: Callable[[], None], ticket: Ticket, query: "_Query | None") -> Callable[[bool], None]:
        """What a stream does when it ends (``ok``: it ran to its end): give back its slot, count it."""

        def ended(ok: bool) -> None:
            release()
            if ticket.live:
                self.stats._live(-1)
            if query is not None:  # a failure mid-stream was counted where it happened
                query.done(True, timed=not ticket.live and ok)

        return ended

    def list_actions(self, context):
        return list(ACTIONS.items())

    @_flight_errors
    def do_action(self, context, action: flight.Action):
        if action.type not in ACTIONS:
            raise InvalidRequestError(f"action was {shown(action.type)}; use any of {', '.join(ACTIONS)} (see list_actions)")
        if action.type in ADMIN_ACTIONS:
            caller_of(context).require("admin", f"action {action.type!r}")
        body = action.body.to_pybytes() if action.body is not None else b""
        table = getattr(self, f"_action_{action.type}")(body)
        return [flight.Result(ipc_bytes(table))]

    # -- actions -------------------------------------------------------------------------------

    def _action_statistics(self, body: bytes) -> pa.Table:
        request = StatisticsBody.parse(body, "statistics")
        self._check_known(request.contract_id)
        rows = self.store.statistics(request.contract_id, request.tick_type and request.tick_type.value)
        return records_table(rows, STATISTICS_SCHEMA)

    def _action_sessions(self, body: bytes) -> pa.Table:
        request = SessionsBody.parse(body, "sessions")
        self._check_known(request.contract_id)
        sessions = self.store.sessions(request.contract_id)
        trading_date = _trading_date(sessions, "extended", request.date)  # the trading day that has opened
        return records_table(sessions.day(trading_date), SESSIONS_SCHEMA, {"open": "open_us", "close": "close_us"})

    def _action_scrub(self, body: bytes) -> pa.Table:
        request = ScrubBody.parse(body, "scrub")
        if self.store.read_only:
            raise InvalidRequestError("this server's store is read-only (ibstream serve); scrubbing runs in the "
                                      "recording process (ibstream record, every IBSTREAM_SCRUB_INTERVAL), or run "
                                      "`ibstream verify`")
        problems = self.store.scrub(request.files)
        return pa.table({"problem": pa.array(problems, pa.string())})

    def _action_coverage(self, body: bytes) -> pa.Table:
        request = CoverageBody.parse(body, "coverage")
        self._check_known(request.contract_id)
        end = request.end or from_us(now_us())
        if end <= request.start:
            raise InvalidRequestError(f"range is empty or inverted: start {request.start.isoformat()} is not before "
                                      f"end {end.isoformat()}; the range is [start, end)")
        return self.store.coverage(request.contract_id, request.tick_type, request.start, end)

    # -- helpers -------------------------------------------------------------------------------

    def _command(self, descriptor: flight.FlightDescriptor) -> QueryCommand:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise InvalidRequestError(
                "descriptor must be a command (FlightDescriptor.for_command with a JSON query); "
                "path descriptors are not served"
            )
        return QueryCommand.parse(descriptor.command)

    def _tickets(self, query: QueryCommand) -> list[Ticket]:
        self._check_stored(query.contracts)
        now = now_us()  # one "now" for every contract of the query
        tickets = []
        for contract_id in query.contracts:
            start_us, end_us = self._range(query, contract_id, now)
            if not query.live:  # a live stream is never held in memory: only the row limit applies
                self._check_span(query.resolution, start_us, end_us)
            if query.resolution == DAILY:
                self.store.sessions(contract_id)  # refuse a contract without trading hours now, not at do_get
            if not query.live and not (MIN_US <= start_us < end_us <= MAX_US):
                raise InvalidRequestError(f"the range [{start_us} µs, {end_us} µs) of contract {contract_id} reaches "
                                          "outside 1970-01-01 .. 2200-01-01; ask for a date inside it")
            tickets += [Ticket(contract_id=contract_id, tick_type=t, start_us=start_us, end_us=end_us,
                               resolution=query.resolution, fill=query.fill,
                               daily_session=query.day_kind if query.resolution == DAILY else None,
                               live=query.live, skip=Cursor.parse(query.cursor).n if query.cursor else 0)
                        for t in query.tick_types]
        return tickets

    def _range(self, query: QueryCommand, contract_id: int, now: int) -> tuple[int, int]:
        """[start_us, end_us) of the query for one contract (sessions differ per contract)."""
        open_end = FOREVER_US if query.live else now  # live: follow new ticks until the end, if any
        if query.window is not None:
            return now - parse_window(query.window), open_end
        if query.session is not None:
            sessions = self.store.sessions(contract_id)
            session = _session(sessions, query.session, query.session_date or "current", now)
            return session.open_us, session.close_us
        if query.cursor:
            start_us = Cursor.parse(query.cursor).ts
        else:
            assert query.start is not None  # the command model asks for a start, a window, a session or a cursor
            start_us = to_us(query.start, name="start")
        end_us = open_end if query.end is None else to_us(query.end, name="end")
        if end_us <= start_us:
            raise InvalidRequestError(f"range is empty: start {iso(start_us)} is not before now ({iso(end_us)})")
        return start_us, end_us

    def _check_ticket(self, ticket: Ticket) -> None:
        """The limits of ``get_flight_info`` once more, for the ticket ``do_get`` was given: a forged
        or edited ticket gets no more than its command could have."""
        self._check_stored([ticket.contract_id])
        if ticket.live:
            return
        self._check_span(ticket.resolution, ticket.start_us, ticket.end_us)
        if ticket.resolution != TICK and _reads_raw_ticks(ticket.resolution):  # ticks: checked on the plan they read
            self._check_rows([self.store.plan(ticket.contract_id, ticket.tick_type, ticket.start_us, ticket.end_us)],
                             ticket.resolution)

    def _check_rows(self, plans: list[Plan], resolution: str) -> int:
        rows = sum(p.estimated_rows() for p in plans)
        if rows > self.settings.max_query_rows:
            raise RequestTooLargeError(
                f"request too large: about {rows:,} ticks, over the limit of {self.settings.max_query_rows:,} "
                "(IBSTREAM_MAX_QUERY_ROWS); split the range" + ("" if resolution == TICK else
                                                                " or use a resolution of 1m or more")
            )
        return rows

    def _check_span(self, resolution: str, start_us: int, end_us: int) -> None:
        limit = self.settings.max_query_span if resolution == TICK else self.settings.max_bar_span
        if end_us - start_us > duration_us(limit):
            setting = "IBSTREAM_MAX_QUERY_SPAN" if resolution == TICK else "IBSTREAM_MAX_BAR_SPAN"
            raise RequestTooLargeError(
                f"request too large: range [{iso(start_us)}, {iso(end_us)}) spans more than {limit} ({setting}); "
                "split the range" + (" or ask for bars (resolution)" if resolution == TICK else "")
            )
        if resolution not in (TICK, DAILY):
            step = BAR_RESOLUTIONS[resolution]
            bars = -(-(end_us - (start_us - start_us % step)) // step)  # bar starts in the range, as fill makes them
            if bars > self.settings.max_bars:
                raise RequestTooLargeError(
                    f"request too large: about {bars:,} bars of {resolution}, over the limit of "
                    f"{self.settings.max_bars:,} (IBSTREAM_MAX_BARS); use a coarser resolution or split the range")

    def _check_known(self, contract_id: int) -> None:
        """For actions: the contract has ticks, details or coverage (the recorder has seen it)."""
        if contract_id not in self.store.known_contract_ids():
            raise NotFoundError(f"contract_id {contract_id} is unknown here: no ticks, contract details or coverage "
                                "are stored for it; list_flights shows the stored contracts")

    def _check_stored(self, contract_ids: list[int]) -> None:
        stored = self.store.contract_ids()
        missing = [c for c in contract_ids if c not in stored]
        if missing:
            raise NotFoundError(
                f"contract_id {', '.join(map(str, missing))} is not stored; list_flights shows the stored contracts"
            )


def _token_entries(settings: Settings) -> list[TokenEntry]:
    return token_entries(settings)


def _tls_options(settings: Settings) -> dict:
    """FlightServerBase's TLS arguments from the settings' PEM files ({} without TLS)."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return {}

    def pem(path: Path, setting: str) -> bytes:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidConfigError(f"{setting} {path} cannot be read ({exc.strerror}); give a PEM file") from None
        if b"-----BEGIN " not in data:
            raise InvalidConfigError(f"{setting} {path} is not PEM (no '-----BEGIN' line); give a PEM file")
        return data

    options: dict = {"tls_certificates": [flight.CertKeyPair(pem(settings.tls_cert_file, "IBSTREAM_TLS_CERT_FILE"),
                                                             pem(settings.tls_key_file, "IBSTREAM_TLS_KEY_FILE"))]}
    if settings.tls_client_ca_file is not None:
        options |= {"verify_client": True,
                    "root_certificates": pem(settings.tls_client_ca_file, "IBSTREAM_TLS_CLIENT_CA_FILE")}
    return options


def _message(exc: BaseException) -> str:
    return str(exc).split(". Detail:", 1)[0].strip()


def _endpoints(tickets: list[Ticket]) -> list[flight.FlightEndpoint]:
    return [flight.FlightEndpoint(t.to_bytes(), []) for t in tickets]


def _reads_raw_ticks(resolution: str) -> bool:
    """Whether a query at ``resolution`` reads every raw tick of its range (ticks and sub-minute bars)."""
    return resolution == TICK or partial_step_us(resolution) < PREAGGREGATE_US


def _session(sessions: ContractSessions, kind: str, when: str, now: int) -> Session:
    if when == "current":
        return sessions.current(kind, now)
    if when == "previous":
        return sessions.previous(kind, now)
    return sessions.session(kind, date.fromisoformat(when))


def _trading_date(sessions: ContractSessions, kind: str, when: str) -> date:
    return _session(sessions, kind, when, now_us()).trading_date if when in ("current", "previous") \
        else date.fromisoformat(when)


class _SlotStream:
    """The batches of one do_get holding one of the server's stream slots. The slot is given back
    once, when the stream ends or fails, or when it is dropped (a cancelled call, even one whose
    stream never started: a plain generator's ``finally`` would not run then)."""

    def __init__(self, batches, release: Callable[[bool], None]):
        self._batches = batches
        self._release = release  # called with whether the stream ran to its end
        self._held = True

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._batches)
        except StopIteration:
            self._free(True)
            raise
        except BaseException:
            self._free(False)
            raise

    def _free(self, ended: bool) -> None:
        if self._held:
            self._held = False
            self._release(ended)

    def __del__(self) -> None:
        self._free(False)


def _streamed(batches, ticket: Ticket, stats: ServerStats, query: _Query | None):
    """Batches of a do_get; a failure mid-stream (say, a corrupt file) reaches the caller as INTERNAL,
    a dropped live reader or a stopping server as UNAVAILABLE (counted in ``stats``)."""

    def failed() -> None:
        if query is not None:
            query.done(False, timed=False)

    try:
        yield from batches
    except ServerUnavailableError as exc:
        if isinstance(exc, SubscriberTooSlowError):
            stats._slow_reader()
        level = logging.WARNING if isinstance(exc, SubscriberTooSlowError) else logging.INFO
        log.log(level, "do_get of %s/%s ended: %s", ticket.contract_id, ticket.tick_type.value, exc)
        raise flight.FlightUnavailableError(tagged(exc)) from None
    except CorruptFileError as exc:  # stored bytes that fail their checks: say which, no traceback
        failed()
        log.error("do_get of %s/%s failed: %s", ticket.contract_id, ticket.tick_type.value, exc)
        raise flight.FlightInternalError(tagged(exc)) from None
    except Exception as exc:
        failed()
        log.exception("do_get of %s/%s failed mid-stream", ticket.contract_id, ticket.tick_type.value)
        raise flight.FlightInternalError(tagged(IbstreamError(
            f"reading {ticket.contract_id}/{ticket.tick_type.value} failed: {type(exc).__name__}: {exc}"))) from None


def _live(feed: LiveFeed | LiveBars, stopped: Callable[[], bool], stopping: threading.Event):
    """A live stream: each batch with its cursor in app_metadata (proto_docs §live)."""
    for batch, cursor, live in feed.batches(stopped):
        yield batch, pa.py_buffer(json.dumps({"cursor": str(cursor), "live": live}).encode())
    if stopping.is_set():
        raise ServerUnavailableError(f"the server is shutting down; resume from cursor {feed.cursor}")


def _with_metadata(value, extra: dict[str, str]):
    """A schema or table with ``extra`` added to its schema metadata (no data copied)."""
    schema = value if isinstance(value, pa.Schema) else value.schema
    merged = {**(schema.metadata or {}), **{k.encode(): v.encode() for k, v in extra.items()}}
    return value.with_metadata(merged) if isinstance(value, pa.Schema) else value.replace_schema_metadata(merged)


def _chunked(table: pa.Table, batch_rows: int) -> pa.Table:
    """``table`` in batches of at most ``batch_rows`` rows and about 2 MiB (under gRPC's 4 MiB)."""
    if table.num_rows == 0:
        return table
    rows = max(1, min(batch_rows, int(MAX_BATCH_BYTES * table.num_rows / max(table.nbytes, 1))))
    return pa.Table.from_batches(table.to_batches(max_chunksize=rows), schema=table.schema)


def _info_schema(query: QueryCommand) -> pa.Schema:
    """The schema all endpoints share, or an empty schema when the tick types differ in shape
    (each endpoint's stream then carries its own schema)."""
    if query.resolution == TICK:
        schemas = [schema_for(t) for t in query.tick_types]
    elif query.live:
        schemas = [live_bar_schema(t, query.resolution) for t in query.tick_types]
    else:
        schemas = [bar_schema(t, query.resolution) for t in query.tick_types]
    first = schemas[0]
    if all(s.equals(first, check_metadata=True) for s in schemas[1:]):
        return first
    return pa.schema([], metadata={"ibstream.tick_types": ",".join(t.value for t in query.tick_types)})
