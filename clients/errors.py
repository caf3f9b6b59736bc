"""Flight errors as ibstream errors (by the code the server tags them with), with the server's
message and without its Python traceback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight

from ibstream.core.errors import (
    IbstreamError,
    InvalidRequestError,
    NotFoundError,
    RequestTooLargeError,
    ServerUnavailableError,
    from_wire,
)


def _message(exc: Exception) -> str:
    text = str(exc).split(". Detail:", 1)[0]
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text


def translated(exc: Exception) -> IbstreamError:
    """Exactly the server's error class, from the code its message is tagged with (see
    :func:`ibstream.core.errors.tagged`); by gRPC status for untagged errors (transport failures,
    older servers)."""
    message = _message(exc)
    ours = from_wire(message)
    if ours is not None:
        return ours
    if isinstance(exc, pa.ArrowInvalid):
        cls = RequestTooLargeError if message.startswith("request too large") else InvalidRequestError
        return cls(message)
    if isinstance(exc, pa.ArrowKeyError):
        return NotFoundError(message)
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError)):
        return ServerUnavailableError(f"{message} (is the server running and reachable?)")
    return IbstreamError(message)
