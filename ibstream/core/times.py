"""Time helpers: every stored time is int64 microseconds since the epoch, UTC."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

US_PER_SECOND = 1_000_000
US_PER_HOUR = 3_600 * US_PER_SECOND
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(value: datetime, *, name: str = "time") -> int:
    """Microseconds since the epoch of a tz-aware datetime; naive datetimes are refused."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        raise ValueError(
            f"{name} was the naive datetime {value.isoformat()}; give a tz-aware time "
            "(e.g. 2025-01-10T14:30:00Z or datetime(..., tzinfo=ZoneInfo('America/New_York')))"
        )
    return (value - _EPOCH) // timedelta(microseconds=1)


def from_us(micros: int) -> datetime:
    """The UTC datetime of microseconds since the epoch."""
    return _EPOCH + timedelta(microseconds=micros)


def hour_floor(micros: int) -> int:
    return micros - micros % US_PER_HOUR


def now_us() -> int:
    return to_us(datetime.now(UTC))


def iso(micros: int) -> str:
    return from_us(micros).isoformat().replace("+00:00", "Z")


def duration_us(value: timedelta) -> int:
    """Whole microseconds of a duration."""
    return value // timedelta(microseconds=1)
