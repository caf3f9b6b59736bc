"""Arrow Flight server for stored ticks."""

from flight_server.commands import COMMAND_VERSION, QueryCommand, Ticket, command
from flight_server.server import FlightServer

__all__ = ["COMMAND_VERSION", "FlightServer", "Ticket", "QueryCommand", "command"]
