"""Flight errors as ibstream errors (by the code the server tags them with), with the server's
message and without its Python traceback."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.flight as flight

from ibstream.core.errors import (
    IbstreamError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RequestTooLargeError,
    ServerUnavailableError,
    UnauthenticatedError,
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
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return UnauthenticatedError(message)
    if isinstance(exc, flight.FlightUnauthorizedError):
        return PermissionDeniedError(message)
    if isinstance(exc, (flight.FlightUnavailableError, flight.FlightTimedOutError)):
        return ServerUnavailableError(f"{message} ({_hint(message)})")
    return IbstreamError(message)


def _hint(message: str) -> str:
    lowered = message.lower()
    if "ssl" in lowered or "handshake" in lowered or "certificate" in lowered or "tls" in lowered:
        return ("a TLS problem: a TLS server needs grpc+tls:// and, for a private certificate authority, "
                "tls_root_certs= (or IBSTREAM_TLS_ROOT_CERTS); a server asking for client certificates needs "
                "tls_client_cert= and tls_client_key=")
    if "socket closed" in lowered or "connection reset" in lowered or "protocol" in lowered:
        return ("the server closed the connection: if it serves TLS, connect with grpc+tls:// (and tls_root_certs=); "
                "else is it running and reachable?")
    return "is the server running and reachable?"
