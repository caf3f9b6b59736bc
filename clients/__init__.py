"""Flight clients: ``Client`` returns polars (or pandas) DataFrames."""

from ibstream.clients.client import Client
from ibstream.clients.live import LiveFrame, LiveStream

__all__ = ["Client", "LiveFrame", "LiveStream"]
