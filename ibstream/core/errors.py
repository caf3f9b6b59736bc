"""One error hierarchy for ibstream, with codes that survive the wire.

Every error says what was wrong, what was expected and, where it helps, what to do. Each class
has a stable machine-readable ``code``. The Flight server raises the matching Arrow/Flight error
type (see ``ibstream.flight_server.server``) with the message tagged ``[ibstream.<code>] ``
(:func:`tagged`), so a client in any language tells the errors apart without parsing prose; our
client turns the tag back into exactly the class (:func:`from_wire`).
"""

from __future__ import annotations

import re
from typing import ClassVar


class IbstreamError(Exception):
    """Root of every error ibstream raises on purpose."""

    code: ClassVar[str] = "internal"


class InvalidRequestError(IbstreamError, ValueError):
    """A request (command, ticket, range, argument) is malformed or out of bounds."""

    code: ClassVar[str] = "invalid_request"


class RequestTooLargeError(InvalidRequestError):
    """A request asks for more data than the server's limits allow."""

    code: ClassVar[str] = "request_too_large"


class NotFoundError(IbstreamError, LookupError):
    """A contract or stream the request names is not stored."""

    code: ClassVar[str] = "not_found"


class ExpiredDataError(NotFoundError):
    """The raw ticks of the range left the store by retention; its 1-minute bars and up are kept."""

    code: ClassVar[str] = "expired"


class ServerUnavailableError(IbstreamError, ConnectionError):
    """The server cannot be reached or refused the work for now; retrying may help."""

    code: ClassVar[str] = "unavailable"


class SubscriberTooSlowError(ServerUnavailableError):
    """A live reader fell too far behind and was dropped; resume from its cursor."""

    code: ClassVar[str] = "subscriber_too_slow"


class ServerBusyError(ServerUnavailableError):
    """The server is at a limit (concurrent streams, memory) and refused the work for now."""

    code: ClassVar[str] = "server_busy"


class UnauthenticatedError(IbstreamError):
    """The call carries no token, or one the server does not know (gRPC UNAUTHENTICATED)."""

    code: ClassVar[str] = "unauthenticated"


class PermissionDeniedError(IbstreamError):
    """The caller's token lacks the role the call needs (gRPC PERMISSION_DENIED)."""

    code: ClassVar[str] = "permission_denied"


class InvalidConfigError(IbstreamError, ValueError):
    """A setting, a token file or a certificate cannot be used as given."""

    code: ClassVar[str] = "invalid_config"


class StorageError(IbstreamError):
    """The store cannot do what was asked (ordering, sealing, corrupt file)."""

    code: ClassVar[str] = "storage"


class TickOrderError(StorageError, ValueError):
    """Ticks were appended with ``ts`` going backwards within a stream."""

    code: ClassVar[str] = "tick_order"


class SealedHourError(StorageError, ValueError):
    """Ticks were appended to an hour that has already been archived."""

    code: ClassVar[str] = "sealed_hour"


class CorruptFileError(StorageError):
    """A stored file cannot be read."""

    code: ClassVar[str] = "corrupt_file"


class StorageUnavailableError(StorageError, OSError):
    """The disk refused a write or fsync (full, read-only, I/O error) or was slow to.

    ``acknowledged`` ticks of the batch were stored durably before the failure (a batch that
    crosses a rotation boundary is written in pieces); none of the rest is on disk, and no torn
    bytes are left behind, so retrying exactly the rest never duplicates a tick. ``errno`` is the
    operating system's error number (``errno.ENOSPC`` for a full disk).
    """

    code: ClassVar[str] = "storage_unavailable"

    def __init__(self, message: str, *, acknowledged: int = 0, errno: int | None = None):
        super().__init__(message)
        self.acknowledged = acknowledged
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0]


class DamagedDataError(CorruptFileError):
    """Stored bytes failed their checksum or could not be decoded; they are quarantined and reported."""

    code: ClassVar[str] = "damaged_data"


_TAG = re.compile(r"^\[ibstream\.([a-z_]+)\] ")


def _classes(root: type[IbstreamError] = IbstreamError) -> list[type[IbstreamError]]:
    return [root, *(c for sub in root.__subclasses__() for c in _classes(sub))]


CODES: dict[str, type[IbstreamError]] = {cls.code: cls for cls in _classes()}


ECHO_LIMIT = 80  # characters of a bad input value a message repeats
MESSAGE_LIMIT = 2_000  # characters of a message on the wire: far under gRPC's 8 KiB metadata limit


def shown(value: object, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` as a message echoes input: cut to ``limit`` characters, saying how long it was."""
    try:
        text = repr(value)
    except Exception:  # an input whose repr fails (e.g. an int too long to print) is named by its type
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def tagged(exc: BaseException) -> str:
    """The message as the server sends it: ``[ibstream.<code>] <message>`` (``internal`` for
    anything that is not one of ours), at most :data:`MESSAGE_LIMIT` characters."""
    code = exc.code if isinstance(exc, IbstreamError) else "internal"
    message = str(exc)
    if len(message) > MESSAGE_LIMIT:
        message = f"{message[:MESSAGE_LIMIT]}... (cut from {len(message):,} characters)"
    return f"[ibstream.{code}] {message}"


def from_wire(message: str) -> IbstreamError | None:
    """The error a tagged message names, with the tag removed; None for an untagged message."""
    match = _TAG.match(message)
    if match is None or match.group(1) not in CODES:
        return None
    return CODES[match.group(1)](message[match.end():])
