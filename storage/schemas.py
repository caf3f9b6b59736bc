"""Arrow schemas of the four IB tick-by-tick types, named as IB-Stream names them.

Every field that ``EWrapper.tickByTickBidAsk`` / ``tickByTickAllLast`` / ``tickByTickMidPoint``
delivers is kept, plus two clocks:

``ts``
    Local receive time, microseconds, UTC. The ordering and range key: non-decreasing within a
    stream (contract_id, tick_type).
``ib_time``
    IB's own tick time, whole seconds (stored as a microsecond timestamp, UTC).

Sizes are ``decimal128(18, 8)``: exact for the int sizes of ibapi 9.81 and for the ``Decimal``
sizes (fractional shares, crypto) of newer releases.
"""

from __future__ import annotations

import pyarrow as pa

from ibstream.core.ticks import TickType

TIMESTAMP = pa.timestamp("us", tz="UTC")
SIZE = pa.decimal128(18, 8)
PRICE = pa.float64()


def _field(name: str, type_: pa.DataType) -> pa.Field:
    return pa.field(name, type_, nullable=False)


_CLOCKS = [_field("ts", TIMESTAMP), _field("ib_time", TIMESTAMP)]

_QUOTE_FIELDS = [
    _field("bid_price", PRICE),
    _field("ask_price", PRICE),
    _field("bid_size", SIZE),
    _field("ask_size", SIZE),
    _field("bid_past_low", pa.bool_()),
    _field("ask_past_high", pa.bool_()),
]

_TRADE_FIELDS = [
    _field("price", PRICE),
    _field("size", SIZE),
    _field("exchange", pa.string()),
    _field("special_conditions", pa.string()),
    _field("past_limit", pa.bool_()),
    _field("unreported", pa.bool_()),
]

_MID_FIELDS = [_field("mid_point", PRICE)]


def _schema(tick_type: TickType, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(_CLOCKS + fields, metadata={"ibstream.tick_type": tick_type.value})


SCHEMAS: dict[TickType, pa.Schema] = {
    TickType.BID_ASK: _schema(TickType.BID_ASK, _QUOTE_FIELDS),
    TickType.LAST: _schema(TickType.LAST, _TRADE_FIELDS),
    TickType.ALL_LAST: _schema(TickType.ALL_LAST, _TRADE_FIELDS),
    TickType.MID_POINT: _schema(TickType.MID_POINT, _MID_FIELDS),
}


def schema_for(tick_type: TickType | str) -> pa.Schema:
    """The stored (and served) schema of a tick type."""
    return SCHEMAS[TickType.parse(str(tick_type))]


# -- results of the server's actions (one row per record) ----------------------------------------

STATISTICS_SCHEMA = pa.schema([
    ("contract_id", pa.int64()), ("tick_type", pa.string()), ("date", pa.date32()), ("total_ticks", pa.int64()),
    ("unique_prices", pa.int64()), ("total_volume", pa.float64()), ("vwap", pa.float64()),
    ("high_price", pa.float64()), ("low_price", pa.float64()),
])
SESSIONS_SCHEMA = pa.schema([
    ("contract_id", pa.int64()), ("kind", pa.string()), ("trading_date", pa.date32()), ("open", TIMESTAMP),
    ("close", TIMESTAMP), ("source", pa.string()),
])
COVERAGE_SCHEMA = pa.schema([
    ("contract_id", pa.int64()), ("tick_type", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("start", TIMESTAMP), ("end", TIMESTAMP), ("open", pa.bool_()),
    ("backfilled_ticks", pa.int64()), ("backfill_note", pa.string()), ("backfilled_at", TIMESTAMP),  # null: not backfilled
])

# -- provenance of served ticks (storage.backfill.provenance) --------------------------------------

SOURCES = ("live", "backfill", "fallback")  # recorded tick by tick; from reqHistoricalTicks; from reqMktData
SOURCE_FIELD = pa.field("source", pa.string(), nullable=False)  # plain text: every reader and format takes it

ROLLS_SCHEMA = pa.schema([
    ("root", pa.string()), ("contract_id", pa.int64()), ("local_symbol", pa.string()), ("last_trade_date", pa.string()),
    ("start", TIMESTAMP), ("end", TIMESTAMP),
])


def records_table(records: list, schema: pa.Schema, attributes: dict[str, str] | None = None) -> pa.Table:
    """A table of records (dataclasses): column ``name`` holds attribute ``attributes.get(name, name)``,
    cast to the schema's type (microsecond ints become timestamps, ISO dates dates)."""
    attributes = attributes or {}
    columns = {f.name: pa.array([getattr(r, attributes.get(f.name, f.name)) for r in records]).cast(f.type)
               for f in schema}
    return pa.table(columns, schema=schema)


# -- columns a continuous contract's rows carry first: the expiry each row came from ---------------

EXPIRY_FIELDS = [pa.field("contract_id", pa.int64(), nullable=False), pa.field("local_symbol", pa.string())]


def with_expiry(data: pa.Table | pa.RecordBatch, contract_id: int, local_symbol: str | None):
    """``data`` with :data:`EXPIRY_FIELDS` in front (constant columns)."""
    n = data.num_rows
    data = data.add_column(0, EXPIRY_FIELDS[1], pa.array([local_symbol] * n, pa.string()))
    return data.add_column(0, EXPIRY_FIELDS[0], pa.array([contract_id] * n, pa.int64()))


def expiry_schema(schema: pa.Schema) -> pa.Schema:
    return pa.schema([*EXPIRY_FIELDS, *schema], metadata=schema.metadata)
