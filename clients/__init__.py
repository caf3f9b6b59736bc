"""Flight clients: ``Client`` returns polars (or pandas) DataFrames."""

from clients.client import Client
from clients.live import LiveFrame, LiveStream

__all__ = ["Client", "LiveFrame", "LiveStream"]
