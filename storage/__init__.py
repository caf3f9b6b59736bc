"""Tick storage: IPC segments, Parquet archive, SQLite index, query planner, bars, sessions, live feeds."""

from storage.index import ArchiveEntry, DailyStatistics, Index
from storage.live import Cursor, LiveBars, LiveFeed
from storage.planner import Plan
from storage.schemas import SCHEMAS, TickType, schema_for
from storage.segments import SegmentWriter, StreamKey
from storage.sessions import ContractSessions, Session
from storage.store import Store, StreamInfo

__all__ = [
    "ArchiveEntry", "ContractSessions", "Cursor", "DailyStatistics", "Index", "LiveBars", "LiveFeed", "Plan",
    "SCHEMAS", "SegmentWriter", "Session", "Store", "StreamInfo", "StreamKey", "TickType", "schema_for",
]
