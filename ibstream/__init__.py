"""ibstream: an Arrow Flight market-data server for Interactive Brokers tick-by-tick data.

The entry objects and the errors, loaded on first use (``from ibstream import Client`` loads
the client only)::

    from ibstream import Client, Store, FlightServer, Settings, ServerBusyError

The parts live in ``ibstream.storage``, ``ibstream.recorder``, ``ibstream.flight_server``,
``ibstream.clients`` and ``ibstream.simulator``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ibstream._lazy import lazy_exports

_ERRORS = ["IbstreamError", "InvalidRequestError", "RequestTooLargeError", "NotFoundError", "ServerUnavailableError",
           "SubscriberTooSlowError", "ServerBusyError", "StorageError", "TickOrderError", "SealedHourError",
           "CorruptFileError", "StorageUnavailableError", "DamagedDataError", "UnauthenticatedError",
           "PermissionDeniedError", "InvalidConfigError"]
_EXPORTS = {
    "Client": "ibstream.clients.client",
    "LiveFrame": "ibstream.clients.live",
    "LiveStream": "ibstream.clients.live",
    "Store": "ibstream.storage.store",
    "FlightServer": "ibstream.flight_server.server",
    "Recorder": "ibstream.recorder.recorder",
    "GatewaySimulator": "ibstream.simulator.gateway",
    "Settings": "ibstream.settings",
    "ContractSpec": "ibstream.settings",
    "TickType": "ibstream.storage.schemas",
    **{name: "ibstream.core.errors" for name in _ERRORS},
}
__all__ = sorted([*_EXPORTS, "__version__"])
_getattr, _dir = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return sorted({*_dir(), "__version__"})


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("ibstream")
        except PackageNotFoundError:  # running from a source tree that was never installed
            return "0+unknown"
    return _getattr(name)


if TYPE_CHECKING:  # what type checkers and IDEs see (re-exports, hence F401)
    from ibstream.clients.client import Client  # noqa: F401
    from ibstream.clients.live import LiveFrame, LiveStream  # noqa: F401
    from ibstream.core.errors import (  # noqa: F401
        CorruptFileError,
        DamagedDataError,
        IbstreamError,
        InvalidConfigError,
        InvalidRequestError,
        NotFoundError,
        PermissionDeniedError,
        RequestTooLargeError,
        SealedHourError,
        ServerBusyError,
        ServerUnavailableError,
        StorageError,
        StorageUnavailableError,
        SubscriberTooSlowError,
        TickOrderError,
        UnauthenticatedError,
    )
    from ibstream.flight_server.server import FlightServer  # noqa: F401
    from ibstream.recorder.recorder import Recorder  # noqa: F401
    from ibstream.settings import ContractSpec, Settings  # noqa: F401
    from ibstream.simulator.gateway import GatewaySimulator  # noqa: F401
    from ibstream.storage.schemas import TickType  # noqa: F401
    from ibstream.storage.store import Store  # noqa: F401
