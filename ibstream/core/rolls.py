"""Futures rolls: which expiry of a future is the front contract at a time (pure functions).

The rule (``proto_docs/futures-rolls.md``): an expiry's *roll instant* is ``roll_time`` (wall
time in the exchange's zone, default 17:00, the Globex open) on the date ``roll_days_before``
calendar days before its last trade date. The *front* at time ``t`` is the earliest expiry
whose roll instant is after ``t``; it is the front from the previous expiry's roll instant to
its own. Every time here is int microseconds since the epoch, UTC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ibstream.core.errors import InvalidConfigError
from ibstream.core.times import to_us

# Names IB's contract details give as timeZoneId that are no IANA zone (IANA ones, e.g. US/Central, pass as they are).
IB_ZONES = {
    "EST": "America/New_York", "EDT": "America/New_York", "CST": "America/Chicago", "CDT": "America/Chicago",
    "MST": "America/Denver", "PST": "America/Los_Angeles", "GMT": "Europe/London", "BST": "Europe/London",
    "MET": "Europe/Berlin", "CET": "Europe/Berlin", "EET": "Europe/Helsinki", "JST": "Asia/Tokyo",
    "HKT": "Asia/Hong_Kong", "SGT": "Asia/Singapore", "AEST": "Australia/Sydney", "AET": "Australia/Sydney",
    "IST": "Asia/Kolkata", "KST": "Asia/Seoul", "CTT": "Asia/Shanghai",
}


@dataclass(frozen=True)
class Expiry:
    """One expiry of a future: its conId, last trade date and roll instant (µs UTC)."""

    contract_id: int
    last_trade_date: date
    roll_us: int


def exchange_zone(name: str) -> ZoneInfo:
    """The zone of IB's ``timeZoneId``: an IANA name (``US/Central``) or IB's own (``CST (Central Standard Time)``)."""
    key = name.strip()
    candidates = (key, IB_ZONES.get(key.split(" ", 1)[0].upper(), ""))
    for candidate in candidates:
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    raise InvalidConfigError(f"time zone {name!r} from IB's contract details is neither an IANA zone (such as "
                             f"US/Central) nor one of IB's names ({', '.join(sorted(IB_ZONES))})")


def last_trade_date(text: str) -> date:
    """IB's ``lastTradeDateOrContractMonth`` as a date: ``20261218`` (a month alone, ``202612``, is refused)."""
    head = text.strip().split(" ", 1)[0]
    try:
        if len(head) != 8:
            raise ValueError
        return date(int(head[:4]), int(head[4:6]), int(head[6:]))
    except ValueError:
        raise InvalidConfigError(f"last trade date {text!r} is not YYYYMMDD; a roll needs the day, not just the "
                                 "contract month") from None


def roll_instant_us(expiry: date, zone: ZoneInfo, days_before: int, at: time) -> int:
    """``at`` (wall time in ``zone``) on the date ``days_before`` calendar days before ``expiry``, in µs UTC."""
    return to_us(datetime.combine(expiry - timedelta(days=days_before), at, zone))


def schedule(expiries: Iterable[tuple[int, date]], zone: ZoneInfo, days_before: int, at: time) -> list[Expiry]:
    """``(contract_id, last trade date)`` pairs as expiries with their roll instants, earliest first."""
    return sorted((Expiry(cid, day, roll_instant_us(day, zone, days_before, at)) for cid, day in expiries),
                  key=lambda e: (e.last_trade_date, e.contract_id))


def front(expiries: Sequence[Expiry], at_us: int) -> Expiry | None:
    """The front contract at ``at_us``: the earliest expiry whose roll instant is after it (None: all rolled)."""
    return next((e for e in expiries if e.roll_us > at_us), None)


def neighbours(expiries: Sequence[Expiry], expiry: Expiry) -> tuple[Expiry | None, Expiry | None]:
    """The expiries before and after ``expiry`` in the schedule (None at either end)."""
    i = expiries.index(expiry)
    return (expiries[i - 1] if i > 0 else None), (expiries[i + 1] if i + 1 < len(expiries) else None)


def active_from_us(expiries: Sequence[Expiry], expiry: Expiry) -> int | None:
    """When ``expiry`` became the front: the previous expiry's roll instant (None if the schedule has none)."""
    previous, _ = neighbours(expiries, expiry)
    return previous.roll_us if previous is not None else None


def wanted(expiries: Sequence[Expiry], at_us: int, overlap_us: int) -> list[Expiry]:
    """The expiries to record at ``at_us``: the front, the next one from ``overlap_us`` before the front's roll
    instant, and the previous one until ``overlap_us`` after its own, so no tick is lost across a roll."""
    current = front(expiries, at_us)
    if current is None:
        return []
    previous, following = neighbours(expiries, current)
    keep = [current]
    if previous is not None and at_us < previous.roll_us + overlap_us:
        keep.insert(0, previous)
    if following is not None and at_us >= current.roll_us - overlap_us:
        keep.append(following)
    return keep
