"""Flight clients: ``Client`` returns polars (or pandas) DataFrames."""

from clients.client import Client

__all__ = ["Client"]
