"""What the server does between a parsed request and its record batches, for every transport.

:class:`QueryService` is the one implementation underneath the Arrow Flight server
(:class:`~ibstream.flight_server.server.FlightServer`) and the HTTP gateway
(:mod:`ibstream.http_gateway`): validation (the pydantic :class:`~ibstream.flight_server.commands.QueryCommand`
and :class:`~ibstream.flight_server.commands.Ticket`), range resolution (start/end, rolling windows,
trading sessions, cursors), the limits (rows, spans, bars, stored contracts, stream slots and
per-token caps), the batches of ticks, bars and live streams, and the actions (``statistics``,
``sessions``, ``coverage``, ``scrub``). A transport parses its request into these models, calls
the service, and turns the answer (and our errors, :mod:`ibstream.core.errors`) into its own wire
form; :class:`ServerStats` counts the calls of both.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date

import pyarrow as pa

from ibstream.core.continuous import Continuous
from ibstream.core.errors import (
    CorruptFileError,
    IbstreamError,
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServerBusyError,
    ServerUnavailableError,
    SubscriberTooSlowError,
    shown,
)
from ibstream.core.times import FOREVER_US, MAX_US, MIN_US, duration_us, from_us, iso, now_us, to_us
from ibstream.flight_server.auth import ANONYMOUS, Authenticator, Caller, token_entries
from ibstream.flight_server.commands import (
    CoverageBody,
    QueryCommand,
    RollsBody,
    ScrubBody,
    SessionsBody,
    StatisticsBody,
    Ticket,
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
from ibstream.storage.schemas import (
    ROLLS_SCHEMA,
    SESSIONS_SCHEMA,
    SOURCE_FIELD,
    STATISTICS_SCHEMA,
    expiry_schema,
    records_table,
    schema_for,
    with_expiry,
)
from ibstream.storage.segments import StreamKey
from ibstream.storage.sessions import ContractSessions, Session
from ibstream.storage.store import Store

log = logging.getLogger(__name__)

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
    "rolls": "The recorded roll schedule of a future configured by symbol: which expiry was the front contract "
             "(ROOT.c.0) from when. Body: {\"root\": \"MNQ\"}. Result: one Arrow IPC stream (root, contract_id, "
             "local_symbol, last_trade_date, start, end; end null for the current front).",
}
ADMIN_ACTIONS = {"scrub"}


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

    ``queries`` and ``errors`` count calls by kind, over Flight and HTTP alike: ``ticks``, ``bars``,
    ``live`` (a do_get by ticket, an HTTP historical query, an SSE stream), ``flight_info``, ``schema``,
    ``list_flights`` (Flight; ``GET /v2/streams`` counts as ``list_flights``), and each action
    (``statistics``, ``sessions``, ``coverage``, ``scrub``); ``invalid`` for a ticket, action or HTTP
    request that names none of them. ``listeners`` are called with (kind, seconds) as each call is
    answered; a tick stream is timed to its end, a live stream not at all.
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


def ticket_kind(ticket: Ticket) -> str:
    """The stats kind of reading ``ticket``: ``live``, ``ticks`` or ``bars``."""
    return "live" if ticket.live else "ticks" if ticket.resolution == TICK else "bars"


@dataclass
class Answer:
    """What reading one ticket gives: its ``schema`` (with ``ibstream.contract_id`` in the metadata) and
    either ``table`` (the whole answer in memory: a cached closed range, or bars) or ``batches`` (read as
    they are sent, holding one of the server's stream slots until they end or are dropped). A live
    answer's batches are ``(batch, cursor, live)`` (see :class:`~ibstream.storage.live.LiveFeed`).

    A failure while ``batches`` are read is raised as one of our errors: :class:`ServerUnavailableError`
    (a dropped slow reader, a stopping server; retry or resume), :class:`CorruptFileError`, or an
    :class:`IbstreamError` for anything unexpected."""

    ticket: Ticket
    schema: pa.Schema
    table: pa.Table | None = None
    batches: Iterator | None = None

    @property
    def live(self) -> bool:
        return self.ticket.live


class QueryService:
    """Serves a :class:`~storage.store.Store` to any transport: plans, limits, reads and actions."""

    def __init__(self, store: Store, settings: Settings | None = None, authenticator: Authenticator | None = None):
        """``settings`` bound the queries (spans, rows, streams); by default ``Settings.of(store.settings)``."""
        self.store = store
        self.settings = settings or Settings.of(store.settings)
        self.stats = ServerStats()
        self.authenticator = authenticator or Authenticator(token_entries(self.settings))
        self.stopping = threading.Event()  # set on shutdown: live streams end, telling their readers to resume
        self._streams = threading.BoundedSemaphore(self.settings.max_streams)
        self._per_caller: dict[str, int] = {}  # streams held per token (with tokens only)
        self._per_caller_lock = threading.Lock()

    # -- planning ------------------------------------------------------------------------------

    def tickets(self, query: QueryCommand) -> list[Ticket]:
        """The query's endpoints, one per (contract, tick type), contract-major, with pinned ranges;
        refused here when a contract is not stored or a range breaks a limit."""
        now = now_us()  # one "now" for every contract of the query
        if query.continuous is not None:
            return self._continuous_tickets(query, now)
        self._check_stored(query.contracts)
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
                               live=query.live, skip=Cursor.parse(query.cursor).n if query.cursor else 0,
                               provenance=query.provenance)
                        for t in query.tick_types]
        return tickets

    def _continuous_tickets(self, query: QueryCommand, now: int) -> list[Ticket]:
        """A continuous contract's endpoints: for each piece of the roll schedule in the range (oldest first),
        one per tick type, over that piece's expiry (pieces of expiries with nothing stored are left out)."""
        continuous = Continuous.parse(query.continuous)
        start_us, end_us = self._range(query, 0, now)
        self._check_span(query.resolution, start_us, end_us)
        stored = self.store.contract_ids()
        pieces = [piece for piece in self.store.continuous_pieces(continuous, start_us, end_us) if piece[0] in stored]
        if not pieces:
            raise NotFoundError(f"{continuous} has nothing stored over [{iso(start_us)}, {iso(end_us)}): no expiry "
                                "the roll schedule names there has ticks; the rolls action lists the schedule")
        return [Ticket(contract_id=contract_id, tick_type=t, start_us=start, end_us=end, resolution=query.resolution,
                       fill=query.fill, daily_session=query.day_kind if query.resolution == DAILY else None,
                       continuous=str(continuous), provenance=query.provenance)
                for contract_id, start, end in pieces for t in query.tick_types]

    def settled(self, tickets: list[Ticket]) -> bool:
        """Whether every ticket's range is closed (:meth:`Store.is_closed`): their data changes only with a
        clear of the result cache."""
        return all(not t.live and self.store.is_closed(t.contract_id, t.tick_type, t.end_us) for t in tickets)

    def estimate(self, query: QueryCommand, tickets: list[Ticket]) -> tuple[int, int]:
        """(rows, bytes) the tickets will send, -1 where unknown; refuses a query over the row limit."""
        if not reads_raw_ticks(query.resolution):  # bars from 1m up: pre-aggregates, no tick estimate
            return -1, -1
        plans = [self.store.plan(t.contract_id, t.tick_type, t.start_us, t.end_us) for t in tickets]
        rows = self._check_rows(plans, query.resolution)
        if query.resolution != TICK:
            return -1, -1
        return rows, sum(p.estimated_bytes() for p in plans)

    def schema(self, query: QueryCommand) -> pa.Schema:
        """The schema all the query's endpoints share, or an empty schema when the tick types differ in
        shape (each endpoint's stream then carries its own schema)."""
        if query.resolution == TICK:
            schemas = [schema_for(t) for t in query.tick_types]
        elif query.live:
            schemas = [live_bar_schema(t, query.resolution) for t in query.tick_types]
        else:
            schemas = [bar_schema(t, query.resolution) for t in query.tick_types]
        schemas = [_decorated_schema(s, query.continuous is not None, query.provenance) for s in schemas]
        first = schemas[0]
        if all(s.equals(first, check_metadata=True) for s in schemas[1:]):
            return first
        return pa.schema([], metadata={"ibstream.tick_types": ",".join(t.value for t in query.tick_types)})

    def ticket_schema(self, ticket: Ticket) -> pa.Schema:
        """The schema a stored-range ticket's stream has (without reading it)."""
        base = schema_for(ticket.tick_type) if ticket.resolution == TICK else bar_schema(ticket.tick_type,
                                                                                         ticket.resolution)
        schema = with_metadata(base, {"ibstream.contract_id": str(ticket.contract_id)})
        return _decorated_schema(schema, bool(ticket.continuous), ticket.provenance)

    # -- reading -------------------------------------------------------------------------------

    def read(self, ticket: Ticket, caller: Caller = ANONYMOUS, *, cancelled: Callable[[], bool] = lambda: False,
             query: _Query | None = None, checked: bool = False) -> Answer:
        """The answer of one ticket, with the limits of planning applied to it again (a forged or edited
        ticket gets no more than its command could have) unless ``checked`` (this server issued it over
        data that has not changed since). ``cancelled`` ends a live stream early (the caller went away);
        ``query`` is the call's stats entry, finished when a stream ends."""
        if not checked:
            self.check_ticket(ticket)
        if not (ticket.continuous or ticket.provenance):
            return self._read(ticket, caller, cancelled, query, lambda data: data)
        answer = self._read(ticket, caller, cancelled, query, self._decorator(ticket))
        schema = _decorated_schema(answer.schema, bool(ticket.continuous), ticket.provenance)
        return Answer(answer.ticket, schema, table=answer.table, batches=answer.batches)

    def _read(self, ticket: Ticket, caller: Caller, cancelled: Callable[[], bool], query: _Query | None,
              decorate: Callable) -> Answer:
        metadata = {"ibstream.contract_id": str(ticket.contract_id)}
        if ticket.live:
            following = LiveFeed(self.store, StreamKey(ticket.contract_id, ticket.tick_type),
                                 Cursor(ticket.start_us, ticket.skip), ticket.end_us,
                                 max_rows=self.settings.live_queue_rows,
                                 poll_interval=self.settings.live_poll_interval.total_seconds())
            feed = following if ticket.resolution == TICK else LiveBars(following, ticket.resolution)
            stopped = lambda: cancelled() or self.stopping.is_set()  # noqa: E731
            return Answer(ticket, with_metadata(feed.schema, metadata),
                          batches=self._slot(_live(feed, stopped, self.stopping), ticket, caller, query))
        if ticket.resolution == TICK:
            schema = with_metadata(schema_for(ticket.tick_type), metadata)
            if ticket.skip:  # a cursor without live: the ticks after it, up to end
                plan = self.store.plan(ticket.contract_id, ticket.tick_type, ticket.start_us, ticket.end_us)
                self._check_rows([plan], TICK)
                batches = map(decorate, Cursor(ticket.start_us, ticket.skip).unseen(plan.batches()))
                return Answer(ticket, schema, batches=self._slot(batches, ticket, caller, query))
            ticks = self.store.ticks(ticket.contract_id, ticket.tick_type, ticket.start_us, ticket.end_us,
                                     check=lambda plan: self._check_rows([plan], TICK))
            if isinstance(ticks, pa.Table):  # a closed range, from the cache
                return Answer(ticket, schema, table=with_metadata(decorate(ticks), metadata))
            return Answer(ticket, schema, batches=self._slot(map(decorate, ticks.batches()), ticket, caller, query))
        sessions = None
        if ticket.resolution == DAILY:
            sessions = self.store.sessions(ticket.contract_id).sessions(
                ticket.daily_session or "extended", ticket.start_us, ticket.end_us)
        bars = self.store.bars(ticket.contract_id, ticket.tick_type, ticket.start_us, ticket.end_us,
                               ticket.resolution, fill=ticket.fill, sessions=sessions)
        table = with_metadata(decorate(bars), metadata)  # in batches of batch_rows rows and ~2 MiB already
        return Answer(ticket, table.schema, table=table)

    def _decorator(self, ticket: Ticket) -> Callable:
        """What a continuous or provenance ticket adds to each table or batch it reads."""
        contract = self.store.index.contract(ticket.contract_id) if ticket.continuous else None
        local_symbol = contract.local_symbol if contract is not None else None

        def decorate(data):
            if ticket.provenance:
                data = self.store.provenance(ticket.contract_id, ticket.tick_type, data)
            if ticket.continuous:
                data = with_expiry(data, ticket.contract_id, local_symbol)
            return data
        return decorate


    def check_ticket(self, ticket: Ticket) -> None:
        """The limits of planning once more, for a ticket given back to be read."""
        self._check_stored([ticket.contract_id])
        if ticket.live:
            return
        self._check_span(ticket.resolution, ticket.start_us, ticket.end_us)
        if ticket.resolution != TICK and reads_raw_ticks(ticket.resolution):  # ticks: checked on the plan they read
            self._check_rows([self.store.plan(ticket.contract_id, ticket.tick_type, ticket.start_us, ticket.end_us)],
                             ticket.resolution)

    # -- actions -------------------------------------------------------------------------------

    def action(self, name: str, body: bytes, caller: Caller = ANONYMOUS) -> pa.Table:
        """The table an action answers (the body is its JSON, as ``do_action`` carries it)."""
        if name not in ACTIONS:
            raise InvalidRequestError(f"action was {shown(name)}; use any of {', '.join(ACTIONS)} (see list_actions)")
        if name in ADMIN_ACTIONS:
            caller.require("admin", f"action {name!r}")
        return getattr(self, f"_action_{name}")(body)

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

    def _action_rolls(self, body: bytes) -> pa.Table:
        request = RollsBody.parse(body, "rolls")
        pieces = self.store.rolls(request.root)
        if not pieces:
            roots = ", ".join(self.store.index.roll_roots()) or "none yet"
            raise NotFoundError(f"no roll schedule for {request.root!r} (roots with one: {roots}); the recorder "
                                "records one for a future configured by symbol without an expiry")
        details = {c.contract_id: c for c in self.store.contracts()}
        rows = [(p.root, p.contract_id, getattr(details.get(p.contract_id), "local_symbol", None),
                 getattr(details.get(p.contract_id), "last_trade_date", None), p.start_us, p.end_us) for p in pieces]
        return pa.Table.from_pylist([dict(zip(ROLLS_SCHEMA.names, row)) for row in rows], ROLLS_SCHEMA)

    # -- limits --------------------------------------------------------------------------------

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
        missing = [c for c in contract_ids if not self.store.stores(c)]
        if missing:
            raise NotFoundError(
                f"contract_id {', '.join(map(str, missing))} is not stored; list_flights shows the stored contracts"
            )

    # -- stream slots --------------------------------------------------------------------------

    def _slot(self, batches, ticket: Ticket, caller: Caller, query: _Query | None):
        """Stream ``batches`` in one of ``max_streams`` slots (with tokens, at most ``max_streams_per_token``
        of them per token); refuse with :class:`ServerBusyError` when none is free."""
        if not self._streams.acquire(blocking=False):
            raise ServerBusyError(
                f"server busy: {self.settings.max_streams} streams are being served (IBSTREAM_MAX_STREAMS); "
                "retry shortly")
        if query is not None:
            query.deferred = True
        if ticket.live:
            self.stats._live(+1)
        if not self.authenticator.enabled:
            return _SlotStream(_streamed(batches, ticket, self.stats, query),
                               self._ended(self._streams.release, ticket, query))
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


def reads_raw_ticks(resolution: str) -> bool:
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
    """The batches of one stream holding one of the server's stream slots. The slot is given back
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

    def close(self) -> None:
        """Stop early (the reader went away): the batches are closed, the slot given back."""
        close = getattr(self._batches, "close", None)
        try:
            if close is not None:
                close()
        finally:
            self._free(False)

    def _free(self, ended: bool) -> None:
        if self._held:
            self._held = False
            self._release(ended)

    def __del__(self) -> None:
        self._free(False)


def _streamed(batches, ticket: Ticket, stats: ServerStats, query: _Query | None):
    """Batches of a stream; a failure mid-stream is raised as one of our errors: a dropped live reader
    or a stopping server as :class:`ServerUnavailableError` (slow readers counted in ``stats``), damaged
    data as :class:`CorruptFileError`, anything else as an :class:`IbstreamError` saying what failed."""

    def failed() -> None:
        if query is not None:
            query.done(False, timed=False)

    try:
        yield from batches
    except ServerUnavailableError as exc:
        if isinstance(exc, SubscriberTooSlowError):
            stats._slow_reader()
        level = logging.WARNING if isinstance(exc, SubscriberTooSlowError) else logging.INFO
        log.log(level, "reading %s/%s ended: %s", ticket.contract_id, ticket.tick_type.value, exc)
        raise
    except CorruptFileError as exc:  # stored bytes that fail their checks: say which, no traceback
        failed()
        log.error("reading %s/%s failed: %s", ticket.contract_id, ticket.tick_type.value, exc)
        raise
    except Exception as exc:
        failed()
        log.exception("reading %s/%s failed mid-stream", ticket.contract_id, ticket.tick_type.value)
        raise IbstreamError(
            f"reading {ticket.contract_id}/{ticket.tick_type.value} failed: {type(exc).__name__}: {exc}") from None


def _live(feed: LiveFeed | LiveBars, stopped: Callable[[], bool], stopping: threading.Event):
    """A live stream: ``(batch, cursor, live)`` as the feed gives them; a stopping server ends it with
    :class:`ServerUnavailableError` naming the cursor to resume from."""
    yield from feed.batches(stopped)
    if stopping.is_set():
        raise ServerUnavailableError(f"the server is shutting down; resume from cursor {feed.cursor}")


def _decorated_schema(schema: pa.Schema, continuous: bool, provenance: bool) -> pa.Schema:
    """The schema with the columns a continuous contract (its expiry, first) and provenance (source, last) add."""
    if provenance:
        schema = schema.append(SOURCE_FIELD)
    return expiry_schema(schema) if continuous else schema


def with_metadata(value, extra: dict[str, str]):
    """A schema or table with ``extra`` added to its schema metadata (no data copied)."""
    schema = value if isinstance(value, pa.Schema) else value.schema
    merged = {**(schema.metadata or {}), **{k.encode(): v.encode() for k, v in extra.items()}}
    return value.with_metadata(merged) if isinstance(value, pa.Schema) else value.replace_schema_metadata(merged)

