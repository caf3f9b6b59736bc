"""The Flight client IB-Studies uses: ticks as polars (or pandas) DataFrames."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Literal, overload

import polars as pl
import pyarrow as pa
import pyarrow.flight as flight

from flight_server.commands import command
from ibstream.errors import (
    IbstreamError,
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServerUnavailableError,
)

DEFAULT_LOCATION = "grpc://127.0.0.1:8815"


def _message(exc: Exception) -> str:
    text = str(exc).split(". Detail:", 1)[0]
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text


def _translate(exc: Exception) -> IbstreamError:
    message = _message(exc)
    if isinstance(exc, pa.ArrowInvalid):
        cls = RequestTooLargeError if message.startswith("request too large") else InvalidRequestError
        return cls(message)
    if isinstance(exc, pa.ArrowKeyError):
        return NotFoundError(message)
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError)):
        return ServerUnavailableError(f"{message} (is the server running and reachable?)")
    return IbstreamError(message)


class Client:
    """Reads ticks from an ibstream Flight server.

    Parameters
    ----------
    location
        The server, e.g. ``"grpc://127.0.0.1:8815"``.

    Examples
    --------
    >>> client = Client("grpc://127.0.0.1:8815")
    >>> quotes = client.ticks(711280073, "bid_ask", start=datetime(2025, 1, 10, 14, tzinfo=UTC))
    """

    def __init__(self, location: str = DEFAULT_LOCATION, **kwargs):
        self.location = location
        self._flight = flight.connect(location, **kwargs)

    @overload
    def ticks(self, contract_id: int, tick_types: str, start: datetime, end: datetime | None = None,
              *, as_pandas: Literal[False] = False) -> pl.DataFrame: ...

    @overload
    def ticks(self, contract_id: int, tick_types: Sequence[str], start: datetime, end: datetime | None = None,
              *, as_pandas: Literal[False] = False) -> dict[str, pl.DataFrame]: ...

    def ticks(self, contract_id, tick_types, start, end=None, *, as_pandas=False):
        """Ticks with ``start <= ts < end`` (tz-aware datetimes; ``end=None`` means now).

        One tick type (a string) gives one DataFrame; a list gives ``{tick_type: DataFrame}``.
        Columns and dtypes are those of :mod:`storage.schemas` (``ts``/``ib_time`` are
        ``Datetime("us", "UTC")``, sizes ``Decimal(18, 8)``). An empty range gives an empty
        DataFrame with those columns.
        """
        tables = self.tables(contract_id, tick_types, start, end)
        frames = {name: (t.to_pandas() if as_pandas else pl.from_arrow(t)) for name, t in tables.items()}
        return frames[tick_types] if isinstance(tick_types, str) else frames

    def tables(self, contract_id: int, tick_types: str | Sequence[str], start: datetime,
               end: datetime | None = None) -> dict[str, pa.Table]:
        """Like :meth:`ticks`, as Arrow tables keyed by tick type."""
        try:
            descriptor = flight.FlightDescriptor.for_command(command(contract_id, tick_types, start, end))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
        info = self._call(self._flight.get_flight_info, descriptor)
        tables = {}
        for endpoint in info.endpoints:
            reader = self._call(self._flight.do_get, endpoint.ticket)
            table = self._call(reader.read_all)
            name = table.schema.metadata[b"ibstream.tick_type"].decode()
            tables[name] = table
        return tables

    def streams(self) -> pl.DataFrame:
        """What the server stores: one row per contract and tick type."""
        rows = []
        for info in self._call(lambda: list(self._flight.list_flights())):
            parsed = json.loads(info.endpoints[0].ticket.ticket)
            rows.append({
                "contract_id": parsed["contract_id"],
                "tick_type": parsed["tick_type"],
                "first": parsed["start_us"],
                "last": parsed["end_us"] - 1,
                "tick_count": info.total_records,
            })
        frame = pl.DataFrame(rows, schema={"contract_id": pl.Int64, "tick_type": pl.String, "first": pl.Int64,
                                           "last": pl.Int64, "tick_count": pl.Int64})
        return frame.with_columns(pl.col("first", "last").cast(pl.Datetime("us", "UTC")))

    def close(self) -> None:
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
            raise _translate(exc) from exc


__all__ = ["Client", "DEFAULT_LOCATION"]
