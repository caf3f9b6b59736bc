"""The Arrow Flight server: FlightDescriptor commands in, record batches out.

A thin adapter over :class:`~ibstream.flight_server.queries.QueryService` (the one implementation of
validation, limits, reading and actions that the HTTP gateway uses too): it turns Flight calls into
the service's models and its answers and errors into Flight's.

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
import itertools
import json
import logging
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
from cachetools import TTLCache

from ibstream.core.errors import (
    CorruptFileError,
    IbstreamError,
    InvalidConfigError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServerUnavailableError,
    UnauthenticatedError,
    tagged,
)
from ibstream.core.resolutions import TICK
from ibstream.core.times import FOREVER_US, MIN_US, to_us
from ibstream.flight_server.auth import AuthMiddlewareFactory, TokenEntry, caller_of, token_entries
from ibstream.flight_server.commands import QueryCommand, Ticket, command, parsed_command, parsed_ticket
from ibstream.flight_server.queries import (
    ACTIONS,
    ADMIN_ACTIONS,
    QueryService,
    ServerStats,
    _Query,
    ticket_kind,
)
from ibstream.settings import Settings, ShardSpec
from ibstream.storage.cache import ResultCache
from ibstream.storage.schemas import schema_for
from ibstream.storage.segments import ipc_bytes
from ibstream.storage.store import Store

__all__ = ["ACTIONS", "ADMIN_ACTIONS", "FlightServer", "QueryService", "ServerStats", "shard_pieces"]

log = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 10.0  # how long shutdown waits for calls in progress

_KINDS = {"get_flight_info": "flight_info", "get_schema": "schema", "list_flights": "list_flights"}
_calls = threading.local()  # the _Query of the call a handler thread is serving



def _kind(handler_name: str, args: tuple) -> str:
    if handler_name == "do_get":
        try:
            parsed = parsed_ticket(args[0].ticket)
        except Exception:
            return "invalid"
        return ticket_kind(parsed)
    if handler_name == "do_action":
        action = getattr(args[0], "type", None)
        return action if action in ACTIONS else "invalid"
    return _KINDS.get(handler_name, handler_name)


def _flight_error(exc: IbstreamError) -> Exception:
    """The Flight error type an error of ours reaches the caller as (module docstring)."""
    if isinstance(exc, InvalidRequestError):
        return pa.ArrowInvalid(tagged(exc))
    if isinstance(exc, NotFoundError):
        return pa.ArrowKeyError(tagged(exc))
    if isinstance(exc, ServerUnavailableError):
        return flight.FlightUnavailableError(tagged(exc))
    if isinstance(exc, UnauthenticatedError):
        return flight.FlightUnauthenticatedError(tagged(exc))
    if isinstance(exc, PermissionDeniedError):
        return flight.FlightUnauthorizedError(tagged(exc))
    return flight.FlightInternalError(tagged(exc))


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
        except (InvalidRequestError, NotFoundError, PermissionDeniedError) as exc:
            log.info("%s refused: %s", handler.__name__, exc)
            raise _flight_error(exc) from None
        except ServerUnavailableError as exc:
            log.warning("%s refused: %s", handler.__name__, exc)
            raise _flight_error(exc) from None
        except UnauthenticatedError as exc:
            raise _flight_error(exc) from None
        except flight.FlightError:
            raise
        except CorruptFileError as exc:
            log.error("%s failed: %s", handler.__name__, exc)
            raise _flight_error(exc) from None
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            raise flight.FlightInternalError(
                tagged(IbstreamError(f"{handler.__name__} failed: {type(exc).__name__}: {exc}"))) from None
        finally:
            _calls.query = None
            if not ok or not query.deferred:
                query.done(ok)

    return wrapper


class FlightServer(flight.FlightServerBase):
    """Serves a :class:`~storage.store.Store` over Arrow Flight.

    >>> server = FlightServer(store)           # binds settings.flight_location
    >>> server.serve()                         # blocks; or use it in a ``with`` block

    ``server.queries`` is the :class:`~ibstream.flight_server.queries.QueryService` it adapts; the HTTP
    gateway serves the same one (one set of limits, stream slots and stats for both).
    """

    def __init__(self, store: Store, location: str | None = None, *, settings: Settings | None = None, **kwargs):
        """``settings`` bound the queries (spans, rows, streams); by default ``Settings.of(store.settings)``."""
        self.queries = QueryService(store, settings)
        self.store = store
        self.settings = self.queries.settings
        self.stats = self.queries.stats
        self.authenticator = self.queries.authenticator
        self._stopping = self.queries.stopping
        self._planned = PlannedQueries(store.cache, self.settings.cache_ttl.total_seconds())
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
        keep = query.pinned and self.store.cache.enabled and not self.settings.shards
        if keep and (info := self._planned.info(descriptor.command)) is not None:
            return info
        generation = self.store.cache.generation
        tickets = self.queries.tickets(query)
        rows, size = self.queries.estimate(query, tickets)
        endpoints = [flight.FlightEndpoint(piece.to_bytes(), list(locations))
                     for ticket in tickets for piece, locations in self._pieces(ticket)]
        info = flight.FlightInfo(self.queries.schema(query), descriptor, endpoints, rows, size)
        if keep and self.queries.settled(tickets):
            self._planned.keep(descriptor.command, generation, info)
        return info

    @_flight_errors
    def get_schema(self, context, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(self.queries.schema(self._command(descriptor)))

    @_flight_errors
    def do_get(self, context, ticket: flight.Ticket) -> flight.FlightDataStream:
        parsed = parsed_ticket(ticket.ticket)
        self.store.require_index(parsed.index_seq)  # a read server behind catches up, or says UNAVAILABLE
        query: _Query | None = getattr(_calls, "query", None)
        answer = self.queries.read(parsed, caller_of(context), cancelled=context.is_cancelled, query=query,
                                   checked=self._planned.issued(ticket.ticket))
        if answer.table is not None:
            return flight.RecordBatchStream(answer.table)
        if answer.live:
            return flight.GeneratorStream(answer.schema, _live_messages(answer.batches))
        return flight.GeneratorStream(answer.schema, _on_the_wire(answer.batches))

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

    def list_actions(self, context):
        return list(ACTIONS.items())

    @_flight_errors
    def do_action(self, context, action: flight.Action):
        body = action.body.to_pybytes() if action.body is not None else b""
        table = self.queries.action(action.type, body, caller_of(context))
        return [flight.Result(ipc_bytes(table))]

    # -- helpers -------------------------------------------------------------------------------

    def _pieces(self, ticket: Ticket) -> list[tuple[Ticket, tuple[str, ...]]]:
        """``ticket`` cut by :func:`shard_pieces` with this store's horizon and published index."""
        if not self.settings.shards or ticket.live or ticket.resolution != TICK:
            return [(ticket, ())]
        return shard_pieces(ticket, self.store.shardable_until(ticket.contract_id, ticket.tick_type),
                            self.settings.shards, self.store.published_seq)

    def _command(self, descriptor: flight.FlightDescriptor) -> QueryCommand:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise InvalidRequestError(
                "descriptor must be a command (FlightDescriptor.for_command with a JSON query); "
                "path descriptors are not served"
            )
        return parsed_command(descriptor.command)


class PlannedQueries:
    """The FlightInfos of pinned queries over closed ranges (:attr:`QueryCommand.pinned`,
    :meth:`QueryService.settled`) by command bytes, and the tickets they issued: what a repeated query
    gets without planning again, and tickets that need no second check of the limits at ``do_get``.

    They hold while the store's result cache keeps its generation (a clear: backfill, retention,
    compaction, a new index on a read server) and for its TTL, as the results they lead to do.
    """

    def __init__(self, cache: ResultCache, ttl_seconds: float):
        self._cache = cache
        self._infos: TTLCache = TTLCache(maxsize=256, ttl=ttl_seconds)  # command -> (generation, FlightInfo)
        self._tickets: TTLCache = TTLCache(maxsize=1024, ttl=ttl_seconds)  # ticket bytes -> generation
        self._lock = threading.Lock()

    def info(self, command: bytes) -> flight.FlightInfo | None:
        with self._lock:
            kept = self._infos.get(command)
        return kept[1] if kept is not None and kept[0] == self._cache.generation else None

    def issued(self, ticket: bytes) -> bool:
        generation = self._cache.generation
        with self._lock:
            return self._tickets.get(ticket) == generation

    def keep(self, command: bytes, generation: int, info: flight.FlightInfo) -> None:
        """Keep ``info``, planned when the cache's generation was ``generation``."""
        with self._lock:
            self._infos[command] = (generation, info)
            for endpoint in info.endpoints:
                self._tickets[endpoint.ticket.ticket] = generation


def shard_pieces(ticket: Ticket, horizon_us: int | None, shards: Sequence[ShardSpec],
                 index_seq: int | None) -> list[tuple[Ticket, tuple[str, ...]]]:
    """A tick ticket cut into ``(ticket, locations)`` pieces in time order, covering its range exactly.

    The range is cut at ``horizon_us`` (up to when the read servers can serve the stream exactly,
    :meth:`~ibstream.storage.store.Store.shardable_until`; None: nothing) and at the start and end of
    every shard rule that names the ticket's contract (or every contract). A piece before the horizon
    that rules cover gets their locations, in rule order without repeats, and ``index_seq``; any
    other piece gets no locations (this server serves it). Neighbours with the same locations are
    one piece. Only the first piece keeps the ticket's ``skip`` (ticks at its start already sent)."""
    rules = [(rule, to_us(rule.start) if rule.start is not None else MIN_US,
              to_us(rule.end) if rule.end is not None else FOREVER_US)
             for rule in shards if rule.contract_ids is None or ticket.contract_id in rule.contract_ids]
    edges = [horizon_us] if horizon_us is not None else []
    edges += [edge for _, start, end in rules for edge in (start, end)]
    cuts = sorted({ticket.start_us, ticket.end_us} | {e for e in edges if ticket.start_us < e < ticket.end_us})
    pieces: list[tuple[int, int, tuple[str, ...]]] = []
    for start, end in itertools.pairwise(cuts):
        located = horizon_us is not None and end <= horizon_us
        covering = [rule for rule, first, last in rules if located and first <= start and end <= last]
        locations = tuple(dict.fromkeys(location for rule in covering for location in rule.locations))
        if pieces and pieces[-1][2] == locations:
            pieces[-1] = (pieces[-1][0], end, locations)
        else:
            pieces.append((start, end, locations))
    return [(ticket.model_copy(update={"start_us": start, "end_us": end, "skip": ticket.skip if i == 0 else 0,
                                       "index_seq": index_seq if locations else None}), locations)
            for i, (start, end, locations) in enumerate(pieces)]


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


def _on_the_wire(batches):
    """A stream's batches, a failure mid-stream reaching the caller as its Flight error: a dropped live
    reader or a stopping server as UNAVAILABLE, damaged data or anything else as INTERNAL."""
    try:
        yield from batches
    except IbstreamError as exc:
        raise _flight_error(exc) from None


def _live_messages(batches):
    """A live stream: each batch with its cursor in app_metadata (proto_docs §live)."""
    for batch, cursor, live in _on_the_wire(batches):
        yield batch, pa.py_buffer(json.dumps({"cursor": str(cursor), "live": live}).encode())
