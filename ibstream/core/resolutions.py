"""Bar resolutions, rolling windows and trading-session kinds: names a request may use."""

from __future__ import annotations

import re

from ibstream.core.errors import InvalidRequestError, shown
from ibstream.core.times import US_PER_HOUR, US_PER_SECOND

TICK = "tick"
DAILY = "1d"
US_PER_MINUTE = 60 * US_PER_SECOND
BAR_RESOLUTIONS: dict[str, int] = {
    "1s": US_PER_SECOND, "5s": 5 * US_PER_SECOND, "10s": 10 * US_PER_SECOND, "30s": 30 * US_PER_SECOND,
    "1m": US_PER_MINUTE, "5m": 5 * US_PER_MINUTE, "15m": 15 * US_PER_MINUTE, "30m": 30 * US_PER_MINUTE,
    "1h": US_PER_HOUR, DAILY: 24 * US_PER_HOUR,
}
RESOLUTIONS = (TICK, *BAR_RESOLUTIONS)
PREAGGREGATE_US = US_PER_MINUTE  # archived hours keep 1-minute partial bars


def parse_resolution(value: str) -> str:
    """``value`` if it is a known resolution, else an error listing the legal ones."""
    if value not in RESOLUTIONS:
        raise InvalidRequestError(f"resolution was {shown(value)}; use any of {', '.join(RESOLUTIONS)}")
    return value


def partial_step_us(resolution: str) -> int:
    """The resolution partial bars are computed at: the bar's own below one minute, else 1 minute
    (every resolution from 1m up, and session boundaries, are whole minutes)."""
    return min(BAR_RESOLUTIONS[resolution], PREAGGREGATE_US)


_WINDOW = re.compile(r"^([1-9][0-9]*)([smhdw])$")
_UNIT_US = {"s": US_PER_SECOND, "m": US_PER_MINUTE, "h": US_PER_HOUR, "d": 24 * US_PER_HOUR, "w": 7 * 24 * US_PER_HOUR}


MAX_WINDOW_US = 3_660 * 24 * US_PER_HOUR  # ten years


def parse_window(value: str) -> int:
    """Microseconds of a rolling window such as ``15m``, ``24h``, ``7d``, ``2w`` (at most ten years)."""
    match = _WINDOW.match(value)
    if match is None:
        raise InvalidRequestError(
            f"window was {shown(value)}; use a whole number and a unit s, m, h, d or w, e.g. '15m', '24h', '7d'")
    micros = int(match.group(1)) * _UNIT_US[match.group(2)]
    if micros > MAX_WINDOW_US:
        raise InvalidRequestError(f"window was {shown(value)}; a window reaches back at most ten years (3660d)")
    return micros


SESSION_KINDS: tuple[str, ...] = ("regular", "extended", "pre_market", "after_hours", "full_day")
_ALIASES = {"overnight": "full_day"}


def normalize_kind(kind: str) -> str:
    """The session kind ``kind`` names (case-insensitive; ``overnight`` means ``full_day``)."""
    name = kind.strip().lower() if isinstance(kind, str) else kind
    name = _ALIASES.get(name, name)
    if name not in SESSION_KINDS:
        raise InvalidRequestError(
            f"session kind was {shown(kind)}; use one of {', '.join(SESSION_KINDS)} "
            "('overnight' is accepted for full_day)"
        )
    return name
