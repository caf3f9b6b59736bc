"""Flight errors as ibstream errors, with the server's message and without its Python traceback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight

from ibstream.core.errors import (
    IbstreamError,
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServerUnavailableError,
)


def _message(exc: Exception) -> str:
    text = str(exc).split(". Detail:", 1)[0]
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text


def translated(exc: Exception) -> IbstreamError:
    message = _message(exc)
    if isinstance(exc, pa.ArrowInvalid):
        cls = RequestTooLargeError if message.startswith("request too large") else InvalidRequestError
        return cls(message)
    if isinstance(exc, pa.ArrowKeyError):
        return NotFoundError(message)
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError)):
        return ServerUnavailableError(f"{message} (is the server running and reachable?)")
    return IbstreamError(message)
