"""Arrow Flight server for stored ticks (names load on first use)."""

from ibstream._lazy import lazy_exports

_EXPORTS = {
    "COMMAND_VERSION": "ibstream.flight_server.commands",
    "QueryCommand": "ibstream.flight_server.commands",
    "Ticket": "ibstream.flight_server.commands",
    "command": "ibstream.flight_server.commands",
    "FlightServer": "ibstream.flight_server.server",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
