"""What the simulated gateway trades: contract details with real trading hours, and tick tapes.

A tape is an endless (synthetic) or finite (archive replay) sequence of tables in the stored
tick schema whose ``ts`` column is the due time in microseconds after the tape starts.
Trading and liquid hours are built the way IB reports them (``YYYYMMDD:HHMM-YYYYMMDD:HHMM``
or ``YYYYMMDD:CLOSED``, in the contract's time zone) from exchange_calendars' holidays and
early closes: XNYS for the stock, CMES for the Globex future.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.compute as pc

from ibstream.core.times import to_us
from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import TickType
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
