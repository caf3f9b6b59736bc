"""Flight clients: ``Client`` returns polars (or pandas) DataFrames (names load on first use)."""

from ibstream._lazy import lazy_exports

_EXPORTS = {
    "Client": "ibstream.clients.client",
    "LiveFrame": "ibstream.clients.live",
    "LiveStream": "ibstream.clients.live",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
