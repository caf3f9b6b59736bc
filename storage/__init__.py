"""Tick storage: IPC segments, Parquet archive, SQLite index, query planner, bars, sessions, live feeds.

Names load on first use: importing one storage module does not import them all."""

from ibstream._lazy import lazy_exports

_EXPORTS = {
    "ArchiveEntry": "ibstream.storage.index",
    "DailyStatistics": "ibstream.storage.index",
    "Index": "ibstream.storage.index",
    "Cursor": "ibstream.storage.live",
    "LiveBars": "ibstream.storage.live",
    "LiveFeed": "ibstream.storage.live",
    "Plan": "ibstream.storage.planner",
    "SCHEMAS": "ibstream.storage.schemas",
    "TickType": "ibstream.storage.schemas",
    "schema_for": "ibstream.storage.schemas",
    "SegmentWriter": "ibstream.storage.segments",
    "StreamKey": "ibstream.storage.segments",
    "ContractSessions": "ibstream.storage.sessions",
    "Session": "ibstream.storage.sessions",
    "Store": "ibstream.storage.store",
    "StreamInfo": "ibstream.storage.store",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
