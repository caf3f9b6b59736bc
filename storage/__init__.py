"""Tick storage: IPC segments, Parquet archive, SQLite index and the query planner."""

from storage.index import ArchiveEntry, DailyStatistics, Index
from storage.planner import Plan
from storage.schemas import SCHEMAS, TickType, schema_for
from storage.segments import SegmentWriter, StreamKey
from storage.store import Store, StreamInfo

__all__ = [
    "ArchiveEntry", "DailyStatistics", "Index", "Plan", "SCHEMAS", "SegmentWriter", "Store",
    "StreamInfo", "StreamKey", "TickType", "schema_for",
]
