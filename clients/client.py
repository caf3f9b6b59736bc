"""The Flight client IB-Studies uses: ticks as polars (or pandas) DataFrames."""

from __future__ import annotations

import ipaddress
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.flight as flight

from ibstream.clients.errors import translated
from ibstream.clients.live import LiveFrame, LiveStream
from ibstream.core.errors import InvalidRequestError
from ibstream.flight_server.commands import QueryCommand, action_body, command, iso_time

DEFAULT_LOCATION = "grpc://127.0.0.1:8815"

log = logging.getLogger(__name__)


class _Bearer(flight.ClientMiddleware):
    def __init__(self, header: str):
        super().__init__()
        self._header = header

    def sending_headers(self):
        return {"authorization": self._header}


def _plaintext_remote(location: str) -> bool:
    """Whether ``location`` is plain gRPC (``grpc://`` or ``grpc+tcp://``) to a host that is not loopback."""
    scheme, _, rest = location.partition("://")
    if scheme not in ("grpc", "grpc+tcp"):
        return False
    host = rest.rsplit(":", 1)[0].strip("[]") if ":" in rest else rest
    if host in ("localhost", ""):
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve anywhere


class _BearerFactory(flight.ClientMiddlewareFactory):
    """Adds ``authorization: Bearer <token>`` to every call, live streams' reconnects included."""

    def __init__(self, token: str):
        super().__init__()
        self._header = f"Bearer {token}"

    def start_call(self, info):
        return _Bearer(self._header)


def _pem(path: str | os.PathLike, name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequestError(f"{name} {path} cannot be read ({exc.strerror}); give the path of a PEM file") from None


def _frames(tables: dict[str, pa.Table], tick_types: TickTypes, as_pandas: bool):
    frames = {name: (t.to_pandas() if as_pandas else pl.from_arrow(t, rechunk=False)) for name, t in tables.items()}
    return frames[tick_types] if isinstance(tick_types, str) else frames


Contracts = int | str | Sequence[int]
TickTypes = str | Sequence[str]


class Client:
    """Reads ticks and bars from an ibstream Flight server.

    Every query names one contract (``711280073``) or several (``[711280073, 265598]``: the
    result then has a ``contract_id`` column first, contracts in the order given, each in ``ts``
    order) or a continuous future (``"MNQ.c.0"``: the front expiry by the recorded roll schedule,
    unadjusted, with ``contract_id`` and ``local_symbol`` columns first naming each row's expiry;
    bars are cut at a roll, so the bar of the roll instant comes once per expiry), one tick type (a string: one DataFrame) or several (a list: ``{tick_type:
    DataFrame}``), and a range given exactly one way: ``start`` (tz-aware) with an optional
    ``end`` (``None``: now), a rolling ``window`` ending now (``"15m"``, ``"24h"``, ``"7d"``), or
    a trading ``session`` (``"regular"``, ``"extended"``, ``"pre_market"``, ``"after_hours"``,
    ``"full_day"``) on ``session_date`` (a date, ``"current"`` or ``"previous"``).

    A server that coordinates read servers (``Settings.shards``) names them in its endpoints'
    locations: the client reads each endpoint from its first location that answers, and from the
    next one when a server is gone, before or during the stream (:func:`read_endpoint`), with the
    same token and TLS options.

    Parameters
    ----------
    location
        The server, e.g. ``"grpc://127.0.0.1:8815"`` (``"grpc+tls://host:8815"`` for TLS).
    token
        The bearer token the server gave you (default: ``IBSTREAM_TOKEN``); sent on every call
        as ``authorization: Bearer <token>``.
    tls_root_certs
        Path of the PEM root certificates that signed the server's certificate (default:
        ``IBSTREAM_TLS_ROOT_CERTS``; without it, the system's roots).
    tls_client_cert, tls_client_key
        Paths of this client's PEM certificate and key, for a server that asks for one (mutual TLS).

    Examples
    --------
    >>> client = Client("grpc://127.0.0.1:8815")
    >>> quotes = client.ticks(711280073, "bid_ask", start=datetime(2025, 1, 10, 14, tzinfo=UTC))
    >>> bars = client.bars(711280073, "last", "1m", window="7d")
    >>> today = client.session_ticks(265598, "current", kind="regular", tick_types="last")
    """

    def __init__(self, location: str = DEFAULT_LOCATION, *, token: str | None = None,
                 tls_root_certs: str | os.PathLike | None = None, tls_client_cert: str | os.PathLike | None = None,
                 tls_client_key: str | os.PathLike | None = None, **kwargs):
        self.location = location
        token = token if token is not None else os.environ.get("IBSTREAM_TOKEN")
        roots = tls_root_certs if tls_root_certs is not None else os.environ.get("IBSTREAM_TLS_ROOT_CERTS")
        if roots:
            kwargs["tls_root_certs"] = _pem(roots, "tls_root_certs")
        if (tls_client_cert is None) != (tls_client_key is None):
            raise InvalidRequestError("mutual TLS needs both tls_client_cert and tls_client_key (PEM paths)")
        if tls_client_cert is not None and tls_client_key is not None:
            kwargs |= {"cert_chain": _pem(tls_client_cert, "tls_client_cert"),
                       "private_key": _pem(tls_client_key, "tls_client_key")}
        if token:
            kwargs["middleware"] = [*kwargs.get("middleware", []), _BearerFactory(token)]
            if _plaintext_remote(location):
                warnings.warn(f"sending a token to {location} without TLS: anyone on the path can read it; use "
                              "grpc+tls:// (the server's TLS_CERT_FILE) or a loopback address", stacklevel=2)
        self._flight = flight.connect(location, **kwargs)
        self._options = kwargs  # the same token and TLS for the servers endpoints name (locations)
        self._connections: dict[str, flight.FlightClient] = {}

    def ticks(self, contract_id: Contracts, tick_types: TickTypes, start: datetime | None = None,
              end: datetime | None = None, *, window: str | None = None, session: str | None = None,
              session_date: str | date | None = None, provenance: bool = False, as_pandas: bool = False):
        """Ticks with ``start <= ts < end`` (or of the window or session).

        Columns and dtypes are those of :mod:`storage.schemas` (``ts``/``ib_time`` are
        ``Datetime("us", "UTC")``, prices ``Float64``, sizes ``Decimal(18, 8)``). An empty range
        gives an empty DataFrame with those columns. ``provenance`` adds a last column ``source``:
        ``live`` (tick-by-tick as it happened), ``backfill`` (from IB's history, whole-second times)
        or ``fallback`` (reqMktData while the tick-by-tick lines were taken).
        """
        tables = self.tables(contract_id, tick_types, start, end, window=window, session=session,
                             session_date=session_date, provenance=provenance)
        return _frames(tables, tick_types, as_pandas)

    def bars(self, contract_id: Contracts, tick_types: TickTypes, resolution: str, start: datetime | None = None,
             end: datetime | None = None, *, window: str | None = None, session: str | None = None,
             session_date: str | date | None = None, fill: bool = False, daily_session: str | None = None,
             as_pandas: bool = False):
        """Bars at ``resolution`` (``1s 5s 10s 30s 1m 5m 15m 30m 1h 1d``), labelled by their start.

        Trades (``last``, ``all_last``): ``ts open high low close volume vwap trade_count``;
        quotes (``bid_ask``): ``ts open high low close`` of the mid price, closing ``bid ask
        bid_size ask_size``, ``mean_spread`` (per quote), ``quote_count``; ``mid_point``: ``ts open
        high low close tick_count``. Prices ``Float64``, ``volume`` ``Decimal(38, 8)``, counts
        ``Int64``. Sub-day bars are aligned in UTC; ``1d`` bars are one per trading session
        (``daily_session``, default ``extended``: the whole trading day), ``ts`` is the session's
        open and ``session_date`` its trading date. Bars without ticks are left out unless
        ``fill`` (then counts and volume are 0 and prices null).
        """
        tables = self.tables(contract_id, tick_types, start, end, window=window, session=session,
                             session_date=session_date, resolution=resolution, fill=fill,
                             daily_session=daily_session)
        return _frames(tables, tick_types, as_pandas)

    def session_ticks(self, contract_id: Contracts, session_date: str | date = "current", *, kind: str = "regular",
                      tick_types: TickTypes = "bid_ask", as_pandas: bool = False):
        """Ticks of one trading session: ``"current"`` (the latest that has opened, up to now),
        ``"previous"``, or a trading date; ``kind`` as in :meth:`session_times`. For its bars use
        :meth:`bars` with ``session=kind, session_date=...``."""
        return self.ticks(contract_id, tick_types, session=kind, session_date=session_date, as_pandas=as_pandas)

    def live(self, contract_id: int, tick_type: str, start: datetime | None = None, end: datetime | None = None, *,
             window: str | None = None, cursor: str | None = None, resolution: str = "tick",
             reconnect_for: float = 60.0) -> LiveStream:
        """Ticks of one stream as DataFrames: the history from ``start`` (or ``window`` back, or after a
        ``cursor`` from an earlier stream), then each batch the recorder acknowledges, until ``end``
        or :meth:`LiveStream.close`. Reconnects and resumes after its cursor if the server goes away.

        >>> for frame in client.live(711280073, "last", window="5m"):
        ...     print(frame.height, "trades")
        """
        return LiveStream(self._flight, contract_id, tick_type, start=start, end=end, window=window, cursor=cursor,
                          resolution=resolution, reconnect_for=reconnect_for)

    def history_and_live(self, contract_id: int, tick_type: str, start: datetime | None = None, *,
                         window: str | None = None, resolution: str = "tick",
                         on_update: Callable[[pl.DataFrame], None] | None = None) -> LiveFrame:
        """A DataFrame of one stream kept up to date on a background thread: ``.frame`` holds the
        history from ``start`` plus every live tick since, each exactly once (across the seam and
        across server restarts); ``on_update`` is called with each new piece. ``.stop()`` ends it.
        With a ``resolution`` (``1s`` to ``1h``) it holds bars instead: closed bars, and the bar
        being formed as its last row (column ``forming``), updated as ticks arrive.
        """
        return LiveFrame(self.live(contract_id, tick_type, start, window=window, resolution=resolution), on_update)

    def tables(self, contract_id: Contracts, tick_types: TickTypes, start: datetime | None = None,
               end: datetime | None = None, **query) -> dict[str, pa.Table]:
        """Like :meth:`ticks` / :meth:`bars` (same keywords), as Arrow tables keyed by tick type."""
        try:
            descriptor = flight.FlightDescriptor.for_command(
                command(contract_id, tick_types, start=start, end=end, **query))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        info = self._call(self._flight.get_flight_info, descriptor)
        parts: dict[str, list[pa.Table]] = {}
        for endpoint in info.endpoints:
            table = read_endpoint(endpoint, self._flight, self._connection)
            metadata = table.schema.metadata
            if not isinstance(contract_id, (int, str)):
                column = pa.array([int(metadata[b"ibstream.contract_id"])] * table.num_rows, pa.int64())
                table = table.add_column(0, "contract_id", column)
            parts.setdefault(metadata[b"ibstream.tick_type"].decode(), []).append(table)
        return {name: pa.concat_tables(tables) for name, tables in parts.items()}

    def statistics(self, contract_id: int, tick_type: str | None = None) -> pl.DataFrame:
        """Daily statistics from the index: one row per tick type and UTC date."""
        return pl.DataFrame(self._action("statistics", contract_id=contract_id, tick_type=tick_type))

    def session_times(self, contract_id: int, session_date: str | date = "current") -> pl.DataFrame:
        """Every session kind of a contract on a trading date (``"current"``: the trading day whose
        extended hours have opened): ``contract_id kind trading_date open close source``."""
        when = session_date.isoformat() if isinstance(session_date, date) else session_date
        return pl.DataFrame(self._action("sessions", contract_id=contract_id, date=when))

    def coverage(self, contract_id: int, tick_type: str, start: datetime, end: datetime | None = None) -> pl.DataFrame:
        """When a stream was recorded (``status`` recorded) and when not (gap, with ``reason``)."""
        return pl.DataFrame(self._action("coverage", contract_id=contract_id, tick_type=tick_type,
                                          start=iso_time(start), end=None if end is None else iso_time(end)))

    def rolls(self, root: str) -> pl.DataFrame:
        """The recorded roll schedule of a future configured by symbol (``root``, e.g. ``"MNQ"``): which
        expiry was the front contract from when (``ROOT.c.0`` reads it)."""
        return pl.DataFrame(self._action("rolls", root=root))

    def _action(self, name: str, **body) -> pa.Table:
        payload = action_body(name, **body)
        results = self._call(lambda: list(self._flight.do_action(flight.Action(name, payload))))
        return pa.ipc.open_stream(results[0].body).read_all()

    def streams(self) -> pl.DataFrame:
        """What the server stores: one row per contract and tick type."""
        rows = []
        for info in self._call(lambda: list(self._flight.list_flights())):
            query = QueryCommand.parse(info.descriptor.command)  # the command, not the ticket: tickets are opaque
            rows.append({
                "contract_id": query.contract_id,
                "tick_type": query.tick_types[0].value,
                "first": query.start,
                "last": None if query.end is None else query.end - timedelta(microseconds=1),
                "tick_count": info.total_records,
            })
        return pl.DataFrame(rows, schema={"contract_id": pl.Int64, "tick_type": pl.String,
                                          "first": pl.Datetime("us", "UTC"), "last": pl.Datetime("us", "UTC"),
                                          "tick_count": pl.Int64})

    def _connection(self, location: str) -> flight.FlightClient:
        """A connection to a server an endpoint names, opened once (this client's own for its location)."""
        if location == self.location:
            return self._flight
        if location not in self._connections:
            self._connections[location] = flight.connect(location, **self._options)
        return self._connections[location]

    def close(self) -> None:
        for connection in self._connections.values():
            connection.close()
        self._connections.clear()
        self._flight.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @staticmethod
    def _call(function, *args):
        try:
            return function(*args)
        except (pa.ArrowException, flight.FlightError) as exc:
            raise translated(exc) from exc


FAILOVER_ERRORS = (flight.FlightUnavailableError, flight.FlightTimedOutError)  # a server gone (also mid-stream)


def read_endpoint(endpoint: flight.FlightEndpoint, own: flight.FlightClient,
                  connect: Callable[[str], flight.FlightClient] = flight.connect) -> pa.Table:
    """The whole stream of one endpoint: from ``own`` (the connection that planned it) when the endpoint
    lists no locations, else from its first location that answers.

    A location that is unavailable or times out, before or during the stream (a server gone), is
    logged and the endpoint is read again, whole, from the next one; any other error is raised at
    once. When every location fails, the last error is raised (translated, naming the locations
    tried). ``connect(location)`` gives the connection to a location.
    """
    if not endpoint.locations:
        return Client._call(lambda: own.do_get(endpoint.ticket).read_all())
    uris = [location.uri.decode() for location in endpoint.locations]
    for i, uri in enumerate(uris):
        try:
            return connect(uri).do_get(endpoint.ticket).read_all()  # a partial stream is dropped with its reader
        except FAILOVER_ERRORS as exc:
            if i + 1 == len(uris):
                error = translated(exc)
                raise type(error)(f"no location of the endpoint answered ({', '.join(uris)}); the last: "
                                  f"{error}") from exc
            log.warning("reading an endpoint from %s failed (%s); trying %s", uri, _first_line(exc), uris[i + 1])
        except (pa.ArrowException, flight.FlightError) as exc:
            raise translated(exc) from exc
    raise AssertionError("unreachable: an endpoint with locations returns or raises in the loop")


def read_endpoints(info: flight.FlightInfo, own: flight.FlightClient,
                   connect: Callable[[str], flight.FlightClient] = flight.connect) -> list[pa.Table]:
    """Every endpoint's table of ``info``, in order, each read as :func:`read_endpoint` reads it (locations
    followed, the next one tried when a server is gone), for code that talks Flight itself.

    ``own`` is the connection that answered ``get_flight_info`` (it serves endpoints without
    locations); ``connect`` opens a connection to a location, once per location for this call (give
    the token and TLS options, e.g. ``functools.partial(flight.connect, middleware=[...])``), and the
    connections it opened are closed before this returns.

    >>> own = flight.connect("grpc://127.0.0.1:8815")
    >>> info = own.get_flight_info(flight.FlightDescriptor.for_command(command(711280073, "bid_ask", start)))
    >>> ticks = pa.concat_tables(read_endpoints(info, own))
    """
    opened: dict[str, flight.FlightClient] = {}

    def connection(location: str) -> flight.FlightClient:
        if location not in opened:
            opened[location] = connect(location)
        return opened[location]

    try:
        return [read_endpoint(endpoint, own, connection) for endpoint in info.endpoints]
    finally:
        for client in opened.values():
            client.close()


def _first_line(exc: Exception) -> str:
    return str(exc).split(". gRPC client debug context:", 1)[0].split(". Detail:", 1)[0]


__all__ = ["Client", "DEFAULT_LOCATION", "LiveFrame", "LiveStream", "read_endpoint", "read_endpoints"]
