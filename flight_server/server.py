"""The Arrow Flight server: FlightDescriptor commands in, record batches out.

RPCs: ``get_flight_info`` / ``get_schema`` plan a :class:`~flight_server.commands.TicksCommand`
into one endpoint per tick type; ``do_get`` streams an endpoint's ticket; ``list_flights``
lists what is stored. Errors reach the caller as the matching Arrow/Flight error type:

=============================  =======================  ==================
ibstream error                 raised as                gRPC status
=============================  =======================  ==================
InvalidRequestError            ``pa.ArrowInvalid``      INVALID_ARGUMENT
RequestTooLargeError           ``pa.ArrowInvalid``      INVALID_ARGUMENT
NotFoundError                  ``pa.ArrowKeyError``     NOT_FOUND
anything unexpected            ``FlightInternalError``  INTERNAL
=============================  =======================  ==================
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable

import pyarrow as pa
import pyarrow.flight as flight

from flight_server.commands import Ticket, TicksCommand
from ibstream.errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from ibstream.settings import Settings
from storage.schemas import schema_for
from storage.store import Store
from storage.times import duration_us, iso, to_us

log = logging.getLogger(__name__)


def _flight_errors(handler: Callable) -> Callable:
    """Turn our errors into Flight's types; keep the server serving whatever happens."""

    @functools.wraps(handler)
    def wrapper(self, context, *args):
        try:
            return handler(self, context, *args)
        except InvalidRequestError as exc:
            log.info("%s refused: %s", handler.__name__, exc)
            raise pa.ArrowInvalid(str(exc)) from None
        except NotFoundError as exc:
            log.info("%s refused: %s", handler.__name__, exc)
            raise pa.ArrowKeyError(str(exc)) from None
        except flight.FlightError:
            raise
        except Exception as exc:
            log.exception("%s failed", handler.__name__)
            raise flight.FlightInternalError(f"{handler.__name__} failed: {type(exc).__name__}: {exc}") from None

    return wrapper


class FlightServer(flight.FlightServerBase):
    """Serves a :class:`~storage.store.Store` over Arrow Flight.

    >>> server = FlightServer(store)           # binds settings.flight_location
    >>> server.serve()                         # blocks; or use it in a ``with`` block
    """

    def __init__(self, store: Store, location: str | None = None, **kwargs):
        self.store = store
        self.settings: Settings = store.settings
        super().__init__(location or self.settings.flight_location, **kwargs)

    # -- RPCs ----------------------------------------------------------------------------------

    @_flight_errors
    def get_flight_info(self, context, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        query = self._command(descriptor)
        tickets = self._tickets(query)
        plans = [self.store.plan(t.contract_id, t.tick_type, t.start_us, t.end_us) for t in tickets]
        rows = sum(p.estimated_rows() for p in plans)
        if rows > self.settings.max_query_rows:
            raise RequestTooLargeError(
                f"request too large: about {rows:,} ticks, over the limit of {self.settings.max_query_rows:,} "
                "(IBSTREAM_MAX_QUERY_ROWS); split the range"
            )
        endpoints = [flight.FlightEndpoint(t.to_bytes(), []) for t in tickets]
        return flight.FlightInfo(
            _info_schema(query), descriptor, endpoints, rows, sum(p.estimated_bytes() for p in plans)
        )

    @_flight_errors
    def get_schema(self, context, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(_info_schema(self._command(descriptor)))

    @_flight_errors
    def do_get(self, context, ticket: flight.Ticket) -> flight.FlightDataStream:
        parsed = Ticket.parse(ticket.ticket)
        plan = self.store.plan(parsed.contract_id, parsed.tick_type, parsed.start_us, parsed.end_us)
        return flight.GeneratorStream(plan.schema, _streamed(plan.batches(), parsed))

    @_flight_errors
    def list_flights(self, context, criteria: bytes):
        for info in self.store.streams():
            if info.first is None:
                continue
            descriptor = flight.FlightDescriptor.for_command(
                json.dumps({
                    "version": 1, "contract_id": info.contract_id, "tick_types": [info.tick_type.value],
                    "start": iso(to_us(info.first)), "end": iso(to_us(info.last) + 1),
                }).encode()
            )
            ticket = Ticket(
                contract_id=info.contract_id, tick_type=info.tick_type,
                start_us=to_us(info.first), end_us=to_us(info.last) + 1,
            )
            yield flight.FlightInfo(
                schema_for(info.tick_type), descriptor, [flight.FlightEndpoint(ticket.to_bytes(), [])],
                info.tick_count, -1,
            )

    # -- helpers -------------------------------------------------------------------------------

    def _command(self, descriptor: flight.FlightDescriptor) -> TicksCommand:
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise InvalidRequestError(
                "descriptor must be a command (FlightDescriptor.for_command with a JSON query); "
                "path descriptors are not served"
            )
        return TicksCommand.parse(descriptor.command)

    def _tickets(self, query: TicksCommand) -> list[Ticket]:
        start_us, end_us = query.range_us()
        if end_us <= start_us:
            raise InvalidRequestError(f"range is empty: start {iso(start_us)} is not before now ({iso(end_us)})")
        span = duration_us(self.settings.max_query_span)
        if end_us - start_us > span:
            raise RequestTooLargeError(
                f"request too large: range [{iso(start_us)}, {iso(end_us)}) spans more than "
                f"{self.settings.max_query_span} (IBSTREAM_MAX_QUERY_SPAN); split the range"
            )
        if query.contract_id not in self.store.contract_ids():
            raise NotFoundError(
                f"contract_id {query.contract_id} is not stored; list_flights shows the stored contracts"
            )
        return [
            Ticket(contract_id=query.contract_id, tick_type=t, start_us=start_us, end_us=end_us)
            for t in query.tick_types
        ]


def _streamed(batches, ticket: Ticket):
    """Batches of a do_get; a failure mid-stream (say, a corrupt file) reaches the caller as INTERNAL."""
    try:
        yield from batches
    except Exception as exc:
        log.exception("do_get of %s/%s failed mid-stream", ticket.contract_id, ticket.tick_type.value)
        raise flight.FlightInternalError(f"reading {ticket.contract_id}/{ticket.tick_type.value} failed: "
                                         f"{type(exc).__name__}: {exc}") from None


def _info_schema(query: TicksCommand) -> pa.Schema:
    """The schema all endpoints share, or an empty schema when the tick types differ in shape
    (each endpoint's stream then carries its own schema)."""
    schemas = [schema_for(t) for t in query.tick_types]
    first = schemas[0]
    if all(s.equals(first, check_metadata=True) for s in schemas[1:]):
        return first
    return pa.schema([], metadata={"ibstream.tick_types": ",".join(t.value for t in query.tick_types)})

