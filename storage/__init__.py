"""Tick storage: IPC segments, Parquet archive, SQLite index, query planner, bars, sessions, live feeds."""

from ibstream.storage.index import ArchiveEntry, DailyStatistics, Index
from ibstream.storage.live import Cursor, LiveBars, LiveFeed
from ibstream.storage.planner import Plan
from ibstream.storage.schemas import SCHEMAS, TickType, schema_for
from ibstream.storage.segments import SegmentWriter, StreamKey
from ibstream.storage.sessions import ContractSessions, Session
from ibstream.storage.store import Store, StreamInfo

__all__ = [
    "ArchiveEntry", "ContractSessions", "Cursor", "DailyStatistics", "Index", "LiveBars", "LiveFeed", "Plan",
    "SCHEMAS", "SegmentWriter", "Session", "Store", "StreamInfo", "StreamKey", "TickType", "schema_for",
]
