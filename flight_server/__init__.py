"""Arrow Flight server for stored ticks."""

from ibstream.flight_server.commands import COMMAND_VERSION, QueryCommand, Ticket, command
from ibstream.flight_server.server import FlightServer

__all__ = ["COMMAND_VERSION", "FlightServer", "Ticket", "QueryCommand", "command"]
