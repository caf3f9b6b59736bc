"""One error hierarchy for ibstream.

Every error says what was wrong, what was expected and, where it helps, what to do.
The Flight server raises the matching Arrow/Flight error type (see ``flight_server.server``);
the client translates those back into these classes.
"""

from __future__ import annotations


class IbstreamError(Exception):
    """Root of every error ibstream raises on purpose."""


class InvalidRequestError(IbstreamError, ValueError):
    """A request (command, ticket, range, argument) is malformed or out of bounds."""


class RequestTooLargeError(InvalidRequestError):
    """A request asks for more data than the server's limits allow."""


class NotFoundError(IbstreamError, LookupError):
    """A contract or stream the request names is not stored."""


class ServerUnavailableError(IbstreamError, ConnectionError):
    """The server cannot be reached or refused the work for now; retrying may help."""


class SubscriberTooSlowError(ServerUnavailableError):
    """A live reader fell too far behind and was dropped; resume from its cursor."""


class ServerBusyError(ServerUnavailableError):
    """The server is at a limit (concurrent streams, memory) and refused the work for now."""


class StorageError(IbstreamError):
    """The store cannot do what was asked (ordering, sealing, corrupt file)."""


class TickOrderError(StorageError, ValueError):
    """Ticks were appended with ``ts`` going backwards within a stream."""


class SealedHourError(StorageError, ValueError):
    """Ticks were appended to an hour that has already been archived."""


class CorruptFileError(StorageError):
    """A stored file cannot be read."""


class StorageUnavailableError(StorageError, OSError):
    """The disk refused a write or fsync (full, read-only, I/O error) or was slow to.

    ``acknowledged`` ticks of the batch were stored durably before the failure (a batch that
    crosses a rotation boundary is written in pieces); none of the rest is on disk, and no torn
    bytes are left behind, so retrying exactly the rest never duplicates a tick. ``errno`` is the
    operating system's error number (``errno.ENOSPC`` for a full disk).
    """

    def __init__(self, message: str, *, acknowledged: int = 0, errno: int | None = None):
        super().__init__(message)
        self.acknowledged = acknowledged
        self.errno = errno

    def __str__(self) -> str:
        return self.args[0]


class DamagedDataError(CorruptFileError):
    """Stored bytes failed their checksum or could not be decoded; they are quarantined and reported."""
