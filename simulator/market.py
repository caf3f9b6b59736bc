"""What the simulated gateway trades: contract details with real trading hours, and tick tapes.

A tape is an endless (synthetic) or finite (archive replay) sequence of tables in the stored
tick schema whose ``ts`` column is the due time in microseconds after the tape starts.
Trading and liquid hours are built the way IB reports them (``YYYYMMDD:HHMM-YYYYMMDD:HHMM``
or ``YYYYMMDD:CLOSED``, in the contract's time zone) from exchange_calendars' holidays and
early closes: XNYS for the stock, CMES for the Globex future.
"""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ibstream.core.times import US_PER_SECOND, to_us
from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import TIMESTAMP, TickType, schema_for
from ibstream.storage.synthetic import AAPL, MNQ, SyntheticContract
from ibstream.storage.synthetic import synthetic_tape as market_tape

Tape = Iterator[pa.Table]


@dataclass(frozen=True)
class SimContract:
    """A contract as ``reqContractDetails`` describes it, plus the synthetic market behind it."""

    market: SyntheticContract
    sec_type: str
    exchange: str
    primary_exchange: str
    currency: str
    local_symbol: str
    trading_class: str
    market_name: str
    expiry: str
    multiplier: str
    md_size_multiplier: int
    long_name: str
    time_zone: str
    calendar: str
    valid_exchanges: str
    order_types: str = "LMT,MKT,STP"
    under_con_id: int = 0
    under_symbol: str = ""
    under_sec_type: str = ""
    industry: str = ""
    category: str = ""
    subcategory: str = ""
    stock_type: str = ""
    market_rule_ids: str = ""

    @property
    def con_id(self) -> int:
        return self.market.contract_id

    @property
    def symbol(self) -> str:
        return self.market.symbol

    def matches(self, con_id: int, symbol: str, sec_type: str, expiry: str, exchange: str, currency: str) -> bool:
        """Whether a ``reqContractDetails`` request names this contract (IB's matching, simplified)."""
        if con_id:
            return con_id == self.con_id
        return (symbol.upper() == self.symbol and sec_type.upper() in ("", self.sec_type)
                and self.expiry.startswith(expiry) and exchange.upper() in ("", self.exchange, self.primary_exchange)
                and currency.upper() in ("", self.currency))

    def details(self, today: date, days: int = 7) -> ContractDetails:
        """What the recorder stores after resolving this contract on ``today`` (IB reports
        ``days`` days of hours from then)."""
        trading, liquid = self.hours(today, days)
        return ContractDetails(
            contract_id=self.con_id, symbol=self.symbol, sec_type=self.sec_type, exchange=self.exchange,
            primary_exchange=self.primary_exchange, currency=self.currency, local_symbol=self.local_symbol,
            trading_class=self.trading_class, last_trade_date=self.expiry, multiplier=self.multiplier,
            min_tick=self.market.tick_size, long_name=self.long_name, time_zone=self.time_zone,
            trading_hours=trading, liquid_hours=liquid,
            updated_at_us=to_us(datetime.combine(today, time(), ZoneInfo("UTC"))),
        )

    def hours(self, today: date, days: int = 7) -> tuple[str, str]:
        """(tradingHours, liquidHours) from ``today`` on, as IB formats them."""
        if self.calendar == "CMES":
            return _hours("CMES", "America/Chicago", today, days, _globex_session)
        return _hours("XNYS", "America/New_York", today, days, _equity_session)


def _fmt(moment: datetime) -> str:
    return moment.strftime("%Y%m%d:%H%M")


def _sessions(calendar_name: str, today: date, days: int):
    import exchange_calendars

    calendar = exchange_calendars.get_calendar(calendar_name)
    last = today + timedelta(days=days - 1)
    first, final = max(today, calendar.first_session.date()), min(last, calendar.last_session.date())
    schedule = calendar.schedule.loc[str(first):str(final)]
    return {session.date(): (row["open"], row["close"]) for session, row in schedule.iterrows()}


def _hours(calendar_name: str, zone_name: str, today: date, days: int, session_hours) -> tuple[str, str]:
    """IB's (tradingHours, liquidHours) strings; ``session_hours(day, open, close, zone)`` gives
    ((trading open, trading close), (liquid open, liquid close)) for a day the calendar trades."""
    zone = ZoneInfo(zone_name)
    sessions = _sessions(calendar_name, today, days)
    opening_days = {open_.tz_convert(zone).date() for open_, _ in sessions.values()}
    trading, liquid = [], []
    for day in (today + timedelta(days=i) for i in range(days)):
        if day not in sessions:
            if day in opening_days:  # e.g. Sunday: Monday's Globex session opens that evening
                continue
            trading.append(f"{day:%Y%m%d}:CLOSED")
            liquid.append(f"{day:%Y%m%d}:CLOSED")
            continue
        open_, close = (t.tz_convert(zone).to_pydatetime() for t in sessions[day])
        (trade_open, trade_close), (liquid_open, liquid_close) = session_hours(day, open_, close, zone)
        trading.append(f"{_fmt(trade_open)}-{_fmt(trade_close)}")
        liquid.append(f"{_fmt(liquid_open)}-{_fmt(liquid_close)}")
    return ";".join(trading), ";".join(liquid)


def _equity_session(day: date, open_: datetime, close: datetime, zone: ZoneInfo):
    """US stock: 04:00-20:00 ET extended (4 h after an early close), regular hours from XNYS."""
    extended_close = datetime.combine(day, time(20), zone) if close.hour >= 16 else close + timedelta(hours=4)
    return (datetime.combine(day, time(4), zone), extended_close), (open_, close)


def _globex_session(day: date, open_: datetime, close: datetime, zone: ZoneInfo):
    """CME Globex equity futures: 17:00 CT (previous day) - 16:00 CT, RTH 08:30-15:00 CT."""
    close = min(close, datetime.combine(day, time(16), zone))
    return (open_, close), (datetime.combine(day, time(8, 30), zone), min(close, datetime.combine(day, time(15), zone)))


SIM_MNQ = SimContract(
    MNQ, sec_type="FUT", exchange="CME", primary_exchange="", currency="USD", local_symbol="MNQZ6",
    trading_class="MNQ", market_name="MNQ", expiry="20261218", multiplier="2", md_size_multiplier=1,
    long_name="Micro E-Mini Nasdaq-100 Index", time_zone="US/Central", calendar="CMES", valid_exchanges="CME",
    under_con_id=362687422, under_symbol="NQ", under_sec_type="IND", market_rule_ids="67",
)
SIM_AAPL = SimContract(
    AAPL, sec_type="STK", exchange="SMART", primary_exchange="NASDAQ", currency="USD", local_symbol="AAPL",
    trading_class="NMS", market_name="NMS", expiry="", multiplier="", md_size_multiplier=100,
    long_name="APPLE INC", time_zone="US/Eastern", calendar="XNYS",
    valid_exchanges="SMART,AMEX,NYSE,CBOE,PHLX,ISE,CHX,ARCA,NASDAQ,DRCTEDGE,BEX,BATS,EDGEA,BYX,IEX,EDGX,PEARL",
    industry="Technology", category="Computers", subcategory="Computers", stock_type="COMMON",
    market_rule_ids="26,26,26",
)
SIM_CONTRACTS = (SIM_MNQ, SIM_AAPL)

MONTH_CODES = "FGHJKMNQUVXZ"  # futures month codes, January to December


def futures_chain(root: SimContract | SyntheticContract | str, expiries: Sequence[date],
                  con_ids: Sequence[int] | None = None) -> tuple[SimContract, ...]:
    """One futures contract per expiry, each its own conId and synthetic market, like IB lists a chain.

    ``root`` is ``"MNQ"`` (:data:`SIM_MNQ`), a :class:`SimContract` future to copy, or a
    :class:`SyntheticContract` market to dress as MNQ. Each expiry gets ``lastTradeDateOrContractMonth``
    ``YYYYMMDD``, the local symbol root + month code + last year digit (``MNQZ6``, ``MNQH7``), the
    root's trading class and exchange, and a market that is a copy of the root's with that conId and a
    price level 0.05 % higher per month after the root's expiry. ``con_ids`` default to the root's conId
    plus the days from the root's expiry (the root's own expiry keeps its conId)."""
    if isinstance(root, str):
        if root.upper() != SIM_MNQ.symbol:
            raise ValueError(f"futures_chain knows the root 'MNQ', not {root!r}; pass a SimContract future to copy")
        root = SIM_MNQ
    elif isinstance(root, SyntheticContract):
        root = dataclasses.replace(SIM_MNQ, market=root)
    if root.sec_type != "FUT" or len(root.expiry) != 8:
        raise ValueError(f"futures_chain needs a future with a YYYYMMDD expiry to copy; {root.symbol} is "
                         f"{root.sec_type} with expiry {root.expiry!r}")
    if not expiries or len(set(expiries)) != len(expiries):
        raise ValueError(f"futures_chain needs distinct expiries, got {list(expiries)}")
    if con_ids is not None and (len(con_ids) != len(expiries) or len(set(con_ids)) != len(con_ids)):
        raise ValueError(f"futures_chain needs one distinct conId per expiry: {len(expiries)} expiries, "
                         f"con_ids {list(con_ids)}")
    base = datetime.strptime(root.expiry, "%Y%m%d").date()
    chain = []
    for i, expiry in enumerate(expiries):
        months = (expiry.year - base.year) * 12 + expiry.month - base.month
        tick = root.market.tick_size
        market = dataclasses.replace(
            root.market, contract_id=con_ids[i] if con_ids is not None else root.con_id + (expiry - base).days,
            start_price=round(root.market.start_price * (1 + 0.0005 * months) / tick) * tick)
        chain.append(dataclasses.replace(
            root, market=market, expiry=f"{expiry:%Y%m%d}",
            local_symbol=f"{root.symbol}{MONTH_CODES[expiry.month - 1]}{expiry.year % 10}"))
    return tuple(chain)


SIM_MNQ_CHAIN = futures_chain(SIM_MNQ, [date(2026, 12, 18), date(2027, 3, 19), date(2027, 6, 17)])


@dataclass(frozen=True)
class Chunk:
    """A piece of a tape: rows and when each is due (µs; on what clock depends on the tape)."""

    table: pa.Table
    due: np.ndarray


class MarketTape:
    """One stream's market on the wall clock, whether anyone listens or not.

    Tick *i* of ``tape`` is due at ``origin_us`` + its offset (the tape's ``ts``) and carries IB time
    = the whole second of that due time. Rows are in the stored schema (``ts`` = the due time).
    Chunks are made lazily, only as time reaches them, and kept for history and late subscribers.
    """

    def __init__(self, tape: Tape, tick_type: TickType, origin_us: int):
        self.tick_type = tick_type
        self.origin_us = origin_us
        self._tape = tape
        self._schema = schema_for(tick_type)
        self._chunks: list[Chunk] = []
        self._firsts: list[int] = []  # due time of each chunk's first row
        self._exhausted = False
        self._lock = threading.Lock()

    def _make_chunk(self) -> bool:
        """One more chunk from the tape (False once it has ended)."""
        for raw in self._tape:
            if raw.num_rows == 0:
                continue
            due_np = raw.column("ts").cast(pa.int64()).to_numpy() + self.origin_us
            table = raw.set_column(0, "ts", pa.array(due_np).cast(TIMESTAMP)).set_column(
                1, "ib_time", pa.array(due_np - due_np % US_PER_SECOND).cast(TIMESTAMP))
            self._chunks.append(Chunk(table.cast(self._schema), due_np))
            self._firsts.append(int(due_np[0]))
            return True
        self._exhausted = True
        return False

    def _advance(self, until_us: int) -> None:
        while (not self._chunks or self._chunks[-1].due[-1] < until_us) and not self._exhausted:
            self._make_chunk()

    def chunk(self, index: int) -> Chunk | None:
        """Chunk ``index`` (made now if it is the next one); None past the tape's end."""
        with self._lock:
            if index == len(self._chunks) and not self._exhausted:
                self._make_chunk()
            return self._chunks[index] if index < len(self._chunks) else None

    def position_after(self, moment_us: int) -> tuple[int, int]:
        """(chunk, row) of the first tick due after ``moment_us``."""
        with self._lock:
            self._advance(moment_us + 1)
            index = max(bisect.bisect_right(self._firsts, moment_us) - 1, 0)
            while index < len(self._chunks):
                row = int(np.searchsorted(self._chunks[index].due, moment_us, side="right"))
                if row < len(self._chunks[index].due):
                    return index, row
                index += 1
            return index, 0

    def row_before(self, index: int, row: int) -> pa.Table | None:
        """The tick just before position (chunk ``index``, ``row``), as a one-row table; None at the start."""
        with self._lock:
            if row > 0:
                return self._chunks[index].table.slice(row - 1, 1)
            return self._chunks[index - 1].table.slice(-1) if index > 0 else None

    def between(self, start_us: int, end_us: int) -> pa.Table:
        """Every tick due in ``[start_us, end_us)`` (made up to ``end_us`` if need be), in order."""
        with self._lock:
            self._advance(end_us)
            pieces = []
            for chunk in self._chunks[max(bisect.bisect_right(self._firsts, start_us) - 1, 0):]:
                if chunk.due[0] >= end_us:
                    break
                first, stop = np.searchsorted(chunk.due, [start_us, end_us], side="left")
                if stop > first:
                    pieces.append(chunk.table.slice(int(first), int(stop - first)))
        return pa.concat_tables(pieces) if pieces else self._schema.empty_table()


def synthetic_tape(contract: SimContract, tick_type: TickType, *, seed: int = 0, speed: float = 1.0,
                   chunk_rows: int = 4_096) -> Tape:
    """The synthetic market of one stream, endlessly, at ``speed`` times its realistic rate."""
    return market_tape(contract.market, tick_type, seed=seed, rate_scale=speed, chunk_rows=chunk_rows)


def archive_tape(data_root: Path, contract_id: int, tick_type: TickType, start: datetime, end: datetime, *,
                 speed: float = 1.0, chunk_rows: int = 4_096) -> Tape:
    """Ticks of one stream from our own store, replayed with their original spacing / ``speed``."""
    from ibstream.settings import Settings
    from ibstream.storage.store import Store

    with Store(Settings(data_root=data_root), read_only=True) as store:
        table = store.read(contract_id, tick_type, start, end)
    if table.num_rows == 0:
        return
    ts = table.column("ts").cast(pa.int64())
    offsets = pc.cast(pc.divide(pc.cast(pc.subtract(ts, ts[0]), pa.float64()), speed), pa.int64())
    table = table.set_column(0, "ts", offsets)
    for offset in range(0, table.num_rows, chunk_rows):
        yield table.slice(offset, chunk_rows)
