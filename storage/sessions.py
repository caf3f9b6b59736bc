"""Trading sessions of a contract, from IB's reported hours completed by an exchange calendar.

Every time this module returns is int microseconds since the epoch, UTC; every wall time it
reads (IB's hours, templates) is local time in the contract's zone (IB's ``timeZoneId``, e.g.
``US/Central``), converted with :mod:`zoneinfo`, so DST follows the zone.

Definitions
-----------
IB's hours
    ``tradingHours`` and ``liquidHours`` of ``reqContractDetails`` as stored in the index
    (:class:`storage.index.ContractDetails`): ``;``-separated entries, each
    ``YYYYMMDD:HHMM-YYYYMMDD:HHMM`` or ``YYYYMMDD:CLOSED``, local time. IB reports about a week;
    the *window* is the first to the last trading date either string mentions.
Trading date
    The date of an IB range's close (a Globex session opening Sunday 17:00 CT and closing Monday
    16:00 CT belongs to Monday). Several ranges with one trading date (a mid-day break) make one
    session, from the first open to the last close. A ``CLOSED`` entry closes its date unless a
    range also closes on it. A date inside the window that no range closes on has no session.
    A close written ``2400`` ends at midnight and still belongs to its written date.
Session kinds (:data:`SESSION_KINDS`)
    ``regular``: liquid hours. ``extended``: trading hours. ``pre_market``: extended open to
    regular open, ``after_hours``: regular close to extended close (each only where non-empty).
    ``full_day``: 00:00 to 24:00 local of every calendar date, whatever trades (source
    ``"clock"``); ``overnight`` is accepted as its alias.
Inside IB's window
    IB's hours are the truth (source ``"ib"``). Where the exchange calendar covers the date and
    the calendar-built hours (below) differ (open vs closed, or another close of either
    session), a warning is logged once per (contract, date) and IB's hours are used.
Outside IB's window (source ``"calendar"``)
    The exchange calendar says whether the date trades (weekends and holidays: no session). The
    hours come from a template: the most common local (open, close) of each IB session among
    IB's full days (calendar sessions that are neither early closes nor late opens; all of IB's
    days if none is full; ties go to the longer session). The calendar's normal hours match
    the IB session nearest to them in open + close (XNYS 09:30-16:00: liquid hours; CMES
    17:00-17:00: trading hours). That session closes at min(template close, calendar close) and
    opens at max(template open, calendar open). The other session, if OUTER (closes later),
    closes shifted by the same amount (AAPL 16:00 -> 13:00 moves 20:00 to 17:00); if INNER, it
    closes at min(its close, the matched close). Opens likewise: an inner other session opens at
    max(its open, the matched open), an outer one keeps its open.
Calendars
    Futures (FUT, FOP, CONTFUT) on CME, GLOBEX, CBOT, ECBOT, NYMEX, COMEX: ``CMES``. USD stocks
    (STK) whose primary exchange (or exchange, if none) is a US venue (NASDAQ, NYSE, ARCA, AMEX,
    BATS, ISLAND, IEX, SMART, ...): ``XNYS``. Anything else has no calendar: only dates inside
    IB's window are answered. Calendars load lazily, once per process; a date outside a
    calendar's span (about 20 years back to 1 year ahead of the load) and outside IB's window is
    refused.

Every refusal is an :class:`~ibstream.core.errors.InvalidRequestError` naming the contract.
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any, NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ibstream.core.errors import InvalidRequestError
from ibstream.core.resolutions import SESSION_KINDS, normalize_kind  # noqa: F401 (re-exported)
from ibstream.core.times import from_us, iso, to_us
from ibstream.storage.index import ContractDetails

log = logging.getLogger(__name__)


_FUTURE_TYPES = frozenset({"FUT", "FOP", "CONTFUT"})
_CME_EXCHANGES = frozenset({"CME", "GLOBEX", "CBOT", "ECBOT", "NYMEX", "COMEX"})
_US_STOCK_EXCHANGES = frozenset({
    "SMART", "NASDAQ", "ISLAND", "NYSE", "ARCA", "AMEX", "BATS", "IEX", "BYX", "EDGEA", "EDGX",
    "CHX", "PSE", "PHLX", "BEX", "DRCTEDGE", "PEARL", "MEMX", "LTSE", "NYSENAT", "CBOE", "ISE",
})
_SEARCH_DAYS = 14  # how far current/previous and refusals look for a trading date
_RANGE = re.compile(r"(\d{8}):([01]\d|2[0-4])([0-5]\d)-(\d{8}):([01]\d|2[0-4])([0-5]\d)")
_CLOSED = re.compile(r"(\d{8}):CLOSED")
_WARNED: set[tuple[int, date]] = set()  # (contract, date) disagreements already logged

Span = tuple[int, int]  # (open, close), microseconds UTC
_IbHours = dict[date, "tuple[datetime, datetime] | None"]  # trading date -> local (open, close) or CLOSED


def no_calendar_error(contract_id: int) -> InvalidRequestError:
    """The refusal for a contract the index holds no details (hence no hours) for."""
    return InvalidRequestError(
        f"contract {contract_id} has no trading hours: sessions and 1d bars need the contract details "
        "the recorder stores from IB's reqContractDetails; record it with `ibstream record` first, "
        "or query by start/end"
    )


@dataclass(frozen=True)
class Session:
    """One session: ``[open_us, close_us)`` in microseconds UTC, of ``trading_date`` (local).

    ``source`` is ``"ib"`` (the contract's reported hours), ``"calendar"`` (template + exchange
    calendar) or ``"clock"`` (``full_day``).
    """

    contract_id: int
    kind: str
    trading_date: date
    open_us: int
    close_us: int
    source: str


@dataclass(frozen=True)
class _Hours:
    """Trading (extended) and liquid (regular) hours of one trading date, or None where closed."""

    trading: Span | None
    liquid: Span | None
    source: str


class _Pattern(NamedTuple):
    """Usual hours of one IB session: open and close in wall minutes from local midnight of the
    trading date (a Globex open at 17:00 the evening before is -420)."""

    open: int
    close: int

    @classmethod
    def of(cls, day: date, open_: datetime, close: datetime) -> _Pattern:
        midnight = datetime.combine(day, time())
        minutes = timedelta(minutes=1)
        return cls((open_.replace(tzinfo=None) - midnight) // minutes,
                   (close.replace(tzinfo=None) - midnight) // minutes)

    def on(self, day: date, zone: ZoneInfo) -> tuple[datetime, datetime]:
        """Local (open, close) of this pattern on ``day`` (wall-clock arithmetic, so DST-correct)."""
        midnight = datetime.combine(day, time(), zone)
        return midnight + timedelta(minutes=self.open), midnight + timedelta(minutes=self.close)


@dataclass(frozen=True)
class _Calendar:
    """One exchange calendar's sessions, precomputed: trading date -> (open, close) in µs UTC."""

    name: str
    sessions: dict[date, Span]
    dates: list[date]  # sorted session dates
    unusual: frozenset[date]  # early closes and late opens
    weekmask: str  # Monday..Sunday, "1" = a weekday that normally trades
    native: Any = field(repr=False)

    def covers(self, day: date) -> bool:
        return self.dates[0] <= day <= self.dates[-1]

    def span_text(self) -> str:
        return f"{self.dates[0]} to {self.dates[-1]}"

    def normal_day(self, near: date) -> date:
        """A session date at or after ``near`` (else the last) that is neither early nor late."""
        later = itertools.islice(self.dates, bisect_left(self.dates, near), None)
        candidates = itertools.chain(later, reversed(self.dates))
        return next((day for day in candidates if day not in self.unusual), self.dates[-1])

    def closed_reason(self, day: date) -> str:
        """Why the calendar has no session on ``day`` (a covered date without one)."""
        if self.weekmask[day.weekday()] == "0":
            return f"a weekend day on the {self.name} calendar"
        name = self.holiday_names.get(day)
        return f"a holiday on the {self.name} calendar ({name})" if name \
            else f"a special closure on the {self.name} calendar"

    @functools.cached_property
    def holiday_names(self) -> dict[date, str]:
        """Named regular holidays over the calendar's span (computed on the first refusal)."""
        holidays = self.native.regular_holidays
        if holidays is None:
            return {}
        names = holidays.holidays(self.dates[0], self.dates[-1], return_name=True)
        return dict(zip(names.index.date, names))


@functools.cache
def _load_calendar(name: str) -> _Calendar:
    """The exchange calendar ``name``, loaded once per process (``get_calendar`` is slow)."""
    import exchange_calendars

    native = exchange_calendars.get_calendar(name)
    schedule = native.schedule
    opens = schedule["open"].dt.as_unit("us").array.asi8
    closes = schedule["close"].dt.as_unit("us").array.asi8
    dates = list(schedule.index.date)
    return _Calendar(
        name=name,
        sessions={day: (int(o), int(c)) for day, o, c in zip(dates, opens, closes)},
        dates=dates,
        unusual=frozenset(native.early_closes.date) | frozenset(native.late_opens.date),
        weekmask=native.weekmask,
        native=native,
    )


def _calendar_name(details: ContractDetails) -> str | None:
    """The exchange calendar for a contract (see the module docstring), or None."""
    sec_type, currency = details.sec_type.upper(), details.currency.upper()
    exchanges = {details.exchange.upper(), details.primary_exchange.upper()}
    if sec_type in _FUTURE_TYPES and exchanges & _CME_EXCHANGES:
        return "CMES"
    venue = (details.primary_exchange or details.exchange).upper()
    if sec_type == "STK" and currency == "USD" and venue in _US_STOCK_EXCHANGES:
        return "XNYS"
    return None


def _parse_hours(text: str, zone: ZoneInfo, label: str, field_name: str) -> _IbHours:
    """IB's hours string as trading date -> local (first open, last close), or None if CLOSED."""
    days: _IbHours = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        if closed := _CLOSED.fullmatch(entry):
            days.setdefault(_ib_date(closed[1], entry, label), None)
        elif match := _RANGE.fullmatch(entry):
            day = _ib_date(match[4], entry, label)
            open_ = datetime.combine(_ib_date(match[1], entry, label), time(), zone) \
                + timedelta(hours=int(match[2]), minutes=int(match[3]))
            close = datetime.combine(day, time(), zone) + timedelta(hours=int(match[5]), minutes=int(match[6]))
            if not open_ < close:
                raise InvalidRequestError(f"{label}: {field_name} entry {entry!r} does not open before it closes")
            known = days.get(day)
            days[day] = (min(known[0], open_), max(known[1], close)) if known else (open_, close)
        else:
            raise InvalidRequestError(
                f"{label}: {field_name} entry {entry!r} is not IB's YYYYMMDD:HHMM-YYYYMMDD:HHMM or "
                "YYYYMMDD:CLOSED; refresh the contract details with `ibstream record`, or query by start/end"
            )
    return days


def _ib_date(text: str, entry: str, label: str) -> date:
    try:
        return datetime.strptime(text, "%Y%m%d").date()
    except ValueError:
        raise InvalidRequestError(f"{label}: hours entry {entry!r} has the invalid date {text!r}") from None


def _usual(hours: _IbHours, full: set[date]) -> _Pattern | None:
    """The most common pattern of IB's full days (all days if none is full); ties: the longest."""
    spans = {day: span for day, span in hours.items() if span}
    patterns = [_Pattern.of(day, *span) for day, span in spans.items() if day in full] \
        or [_Pattern.of(day, *span) for day, span in spans.items()]
    counts = Counter(patterns)
    return max(counts, key=lambda p: (counts[p], p.close - p.open), default=None)


def _fit(spans: dict[str, tuple[datetime, datetime]], matched: str, cal_open: datetime,
         cal_close: datetime) -> dict[str, tuple[datetime, datetime]]:
    """Template spans adjusted to one calendar session (early close, late open; module docstring)."""
    m_open, m_close = spans[matched]
    open_, close = max(m_open, cal_open), min(m_close, cal_close)
    fitted = {matched: (open_, close)}
    for name, (o_open, o_close) in spans.items():
        if name != matched:
            o_close = o_close + (close - m_close) if o_close > m_close else min(o_close, close)
            fitted[name] = (o_open if o_open < m_open else max(o_open, open_), o_close)
    return fitted


def _us_span(span: tuple[datetime, datetime] | None) -> Span | None:
    return None if span is None else (to_us(span[0]), to_us(span[1]))


class ContractSessions:
    """Sessions of one contract: IB's hours inside their window, template + calendar outside it.

    Build with :meth:`from_details`. Per-date hours are computed once and cached, so repeated
    and range queries are cheap.
    """

    def __init__(self, contract_id: int, label: str, exchange: str, zone: ZoneInfo,
                 calendar: _Calendar | None, trading: _IbHours, liquid: _IbHours):
        self.contract_id = contract_id
        self.zone = zone
        self.calendar_name = calendar.name if calendar else None
        self._label = label
        self._exchange = exchange
        self._calendar = calendar
        self._ib = {"trading": trading, "liquid": liquid}
        dates = [*trading, *liquid]
        self._window = (min(dates), max(dates)) if dates else None
        self._lead_days = max([(day - span[0].date()).days  # how many days before its date a session opens
                               for hours in (trading, liquid) for day, span in hours.items() if span] + [0])
        self._patterns: dict[str, _Pattern] = {}
        self._matched: str | None = None
        if calendar is not None:
            full = {day for day in dates if day in calendar.sessions and day not in calendar.unusual}
            self._patterns = {name: p for name, hours in self._ib.items() if (p := _usual(hours, full))}
            self._matched = self._matching_session(calendar)
        self._days: dict[date, _Hours] = {}

    @classmethod
    def from_details(cls, details: ContractDetails) -> ContractSessions:
        """Sessions from the details the recorder stored (IB's hours, zone, exchange)."""
        label = f"contract {details.contract_id} ({details.local_symbol or details.symbol})"
        try:
            zone = ZoneInfo(details.time_zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise InvalidRequestError(
                f"{label}: time zone {details.time_zone!r} from IB's contract details is not a known "
                "IANA zone (such as US/Eastern); refresh the details with `ibstream record`, or query by start/end"
            ) from None
        name = _calendar_name(details)
        return cls(
            details.contract_id, label, details.exchange, zone, _load_calendar(name) if name else None,
            _parse_hours(details.trading_hours, zone, label, "tradingHours"),
            _parse_hours(details.liquid_hours, zone, label, "liquidHours"),
        )

    # -- public queries ------------------------------------------------------------------------

    def session(self, kind: str, trading_date: date) -> Session:
        """The ``kind`` session of ``trading_date`` (a local date); refused if that date has none."""
        kind = normalize_kind(kind)
        found = self._lookup(kind, self._checked_date(trading_date))
        if found is None:
            raise self._no_session(kind, trading_date)
        return found

    def current(self, kind: str, now_us: int) -> Session:
        """The latest ``kind`` session that opened at or before ``now_us`` (µs UTC).

        Before today's regular open this is the previous trading date's; on a Sunday evening after
        Globex opens it is Monday's. Looks back at most 14 days, then refuses.
        """
        kind = normalize_kind(kind)
        today = from_us(now_us).astimezone(self.zone).date()
        for offset in range(-self._lead_days, _SEARCH_DAYS + 1):
            found = self._lookup(kind, today - timedelta(days=offset))
            if found is not None and found.open_us <= now_us:
                return found
        raise InvalidRequestError(
            f"{self._label} has no {kind} session that opened in the {_SEARCH_DAYS} days up to {iso(now_us)}; "
            f"ask for another kind ({', '.join(SESSION_KINDS)}) or query by start/end"
        )

    def previous(self, kind: str, now_us: int) -> Session:
        """The ``kind`` session before :meth:`current` (µs UTC)."""
        kind = normalize_kind(kind)
        latest = self.current(kind, now_us)
        found = self._nearest(kind, latest.trading_date, -1)
        if found is None:
            raise InvalidRequestError(
                f"{self._label} has no known {kind} session in the {_SEARCH_DAYS} days before "
                f"{latest.trading_date}; query by start/end"
            )
        return found

    def sessions(self, kind: str, start_us: int, end_us: int) -> list[Session]:
        """Every ``kind`` session overlapping ``[start_us, end_us)`` (µs UTC), oldest first."""
        kind = normalize_kind(kind)
        if end_us <= start_us:
            raise InvalidRequestError(
                f"{self._label}: session range is empty or inverted: start {iso(start_us)} is not before "
                f"end {iso(end_us)}; the range is [start, end)"
            )
        first = from_us(start_us).astimezone(self.zone).date()
        last = from_us(end_us).astimezone(self.zone).date() + timedelta(days=self._lead_days)
        found = (self._lookup(kind, first + timedelta(days=i)) for i in range((last - first).days + 1))
        return [s for s in found if s is not None and s.open_us < end_us and s.close_us > start_us]

    def day(self, trading_date: date) -> list[Session]:
        """Every session of ``trading_date``, in :data:`SESSION_KINDS` order."""
        trading_date = self._checked_date(trading_date)
        return [s for kind in SESSION_KINDS if (s := self._lookup(kind, trading_date)) is not None]

    # -- one date ------------------------------------------------------------------------------

    def _lookup(self, kind: str, day: date) -> Session | None:
        """The ``kind`` session of ``day``, None if it has none; refused if ``day`` is unknowable."""
        if kind == "full_day":
            try:
                next_day = day + timedelta(days=1)
            except OverflowError:
                raise InvalidRequestError(f"{self._label}: {day} is past the last date there is") from None
            midnight = datetime.combine(day, time(), self.zone)
            return Session(self.contract_id, kind, day, to_us(midnight),
                           to_us(datetime.combine(next_day, time(), self.zone)), "clock")
        hours = self._hours(day)
        trading, liquid = hours.trading, hours.liquid
        span = {
            "regular": liquid,
            "extended": trading,
            "pre_market": (trading[0], liquid[0]) if trading and liquid else None,
            "after_hours": (liquid[1], trading[1]) if trading and liquid else None,
        }[kind]
        if span is None or span[0] >= span[1]:
            return None
        return Session(self.contract_id, kind, day, span[0], span[1], hours.source)

    def _hours(self, day: date) -> _Hours:
        hours = self._days.get(day)
        if hours is None:
            hours = self._days[day] = self._compute(day)
        return hours

    def _compute(self, day: date) -> _Hours:
        if self._in_window(day):
            ib = _Hours(_us_span(self._ib["trading"].get(day)), _us_span(self._ib["liquid"].get(day)), "ib")
            self._check(day, ib)
            return ib
        if self._calendar is None:
            raise InvalidRequestError(
                f"{self._label}: no sessions known for {day}: exchange {self._exchange!r} has no exchange "
                f"calendar, so sessions are known only on the dates IB reported ({self._window_text()}); "
                "ask for a date in that range, refresh the hours with `ibstream record`, or query by start/end"
            )
        if not self._calendar.covers(day):
            raise InvalidRequestError(
                f"{self._label}: {day} is outside the {self._calendar.name} exchange calendar's span "
                f"({self._calendar.span_text()}) and outside IB's reported hours ({self._window_text()}); "
                "ask for a date in either, or query by start/end"
            )
        return self._from_calendar(day)

    def _from_calendar(self, day: date) -> _Hours:
        """Hours of ``day`` from the template and the calendar (module docstring)."""
        assert self._calendar is not None  # _compute asks only for a contract with a calendar
        if day not in self._calendar.sessions:
            return _Hours(None, None, "calendar")
        if self._matched is None:
            raise InvalidRequestError(
                f"{self._label}: IB reported no open hours for this contract, so its usual session times "
                f"(needed for {day}) are unknown; refresh the hours with `ibstream record`, or query by start/end"
            )
        spans = {name: pattern.on(day, self.zone) for name, pattern in self._patterns.items()}
        cal_open, cal_close = (from_us(us).astimezone(self.zone) for us in self._calendar.sessions[day])
        fitted = _fit(spans, self._matched, cal_open, cal_close)
        return _Hours(_us_span(fitted.get("trading")), _us_span(fitted.get("liquid")), "calendar")

    def _matching_session(self, calendar: _Calendar) -> str | None:
        """The IB session ("trading" or "liquid") nearest to the calendar's normal hours."""
        if not self._patterns or self._window is None:
            return None
        near = calendar.normal_day(self._window[0])
        cal = _Pattern.of(near, *(from_us(us).astimezone(self.zone) for us in calendar.sessions[near]))

        def distance(name: str) -> int:
            return abs(self._patterns[name].open - cal.open) + abs(self._patterns[name].close - cal.close)

        return min(self._patterns, key=distance)

    def _check(self, day: date, ib: _Hours) -> None:
        """Warn once per (contract, date) where IB's hours and the calendar-built hours differ."""
        if self._calendar is None or not self._calendar.covers(day) or self._matched is None:
            return
        cal = self._from_calendar(day)
        closes = [(h.trading and h.trading[1], h.liquid and h.liquid[1]) for h in (ib, cal)]
        if closes[0] == closes[1] or (self.contract_id, day) in _WARNED:
            return
        _WARNED.add((self.contract_id, day))
        log.warning("%s: IB's hours and the %s calendar disagree on %s: IB %s, calendar %s; using IB's",
                    self._label, self._calendar.name, day, self._describe(ib), self._describe(cal))

    # -- messages ------------------------------------------------------------------------------

    def _no_session(self, kind: str, day: date) -> InvalidRequestError:
        before, after = self._nearest(kind, day, -1), self._nearest(kind, day, +1)
        near = ", ".join(f"{s.trading_date} ({s.trading_date:%A}) {side}"
                         for s, side in ((before, "before"), (after, "after")) if s)
        return InvalidRequestError(
            f"{self._label} has no {kind} session on {day} ({day:%A}): {self._why_none(kind, day)}; "
            f"nearest dates with one: {near or f'none within {_SEARCH_DAYS} days'}; "
            "ask for one of those, or query by start/end"
        )

    def _why_none(self, kind: str, day: date) -> str:
        hours = self._hours(day)
        if hours.trading or hours.liquid:
            return f"it trades ({self._describe(hours)}) but has no {kind} part"
        reasons = []
        if self._in_window(day):
            listed = day in self._ib["trading"] or day in self._ib["liquid"]
            reasons.append("IB's hours mark it CLOSED" if listed else "no session in IB's hours closes on it")
        if self._calendar is not None and self._calendar.covers(day):
            reasons.append(self._calendar.closed_reason(day) if day not in self._calendar.sessions
                           else f"although the {self._calendar.name} calendar trades it (IB's hours win)")
        return "; ".join(reasons) or "not a trading date"

    def _nearest(self, kind: str, day: date, step: int) -> Session | None:
        """The closest ``kind`` session in direction ``step`` within the search span, if knowable."""
        for offset in range(1, _SEARCH_DAYS + 1):
            try:
                found = self._lookup(kind, day + timedelta(days=step * offset))
            except InvalidRequestError:
                return None
            if found is not None:
                return found
        return None

    def _describe(self, hours: _Hours) -> str:
        def clock(span: Span) -> str:
            open_, close = (from_us(us).astimezone(self.zone) for us in span)
            return f"{open_:%Y-%m-%d %H:%M}-{close:%Y-%m-%d %H:%M}"

        named = (("trading", hours.trading), ("liquid", hours.liquid))
        return ", ".join(f"{name} {clock(span)}" for name, span in named if span) or "closed"

    def _in_window(self, day: date) -> bool:
        return self._window is not None and self._window[0] <= day <= self._window[1]

    def _window_text(self) -> str:
        return f"{self._window[0]} to {self._window[1]}" if self._window else "none"

    def _checked_date(self, value: date) -> date:
        if isinstance(value, datetime) or not isinstance(value, date):
            raise InvalidRequestError(
                f"{self._label}: trading_date was {value!r}; give a datetime.date (the local trading date "
                f"in {self.zone.key}), not a datetime or string"
            )
        return value
