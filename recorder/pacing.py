"""IB's pacing rules for historical data requests, as a pacer that says how long to wait.

IB refuses historical requests that break its pacing rules with error 162 ("pacing
violation"), and an account that keeps breaking them is cut off for a while. The rules
(``proto_docs/backfill.md`` §1; IB's "Historical Data Limitations"):

1. no *identical* request within 15 s;
2. fewer than 6 requests for one contract and ``whatToShow`` within 2 s (at most 5);
3. at most 60 requests in any 10 minutes, a ``BID_ASK`` request counting as 2;
4. at most 50 requests open (sent, not yet answered) at once.

:class:`HistoricalPacer` keeps what was sent and answers :meth:`~HistoricalPacer.delay`: the
least time to wait before ``request`` breaks none of them. Every rule is of the form "the
request may go at any time from T on" (the windows only ever lose entries as time passes), so
the least wait is the largest of the four thresholds, and sending at it is always allowed. The
clock is injectable (monotonic seconds), so the pacer is tested against a brute-force model of
the rules without waiting.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ibstream.core.errors import InvalidConfigError


@dataclass(frozen=True)
class HistoricalRequest:
    """What the pacing rules look at in one request: its contract, ``whatToShow`` and the rest of
    its parameters (``params``: two requests are identical when all three are equal)."""

    contract_id: int
    what_to_show: str
    params: Hashable = ()

    @property
    def weight(self) -> int:
        """What the request counts towards the 10-minute limit: 2 for BID_ASK, else 1."""
        return 2 if self.what_to_show == "BID_ASK" else 1


class HistoricalPacer:
    """IB's historical pacing rules over an injectable monotonic ``clock`` (seconds).

    Parameters
    ----------
    identical_window:
        seconds within which an identical request is refused (IB: 15).
    burst_window, burst_limit:
        at most ``burst_limit`` requests for one contract and ``whatToShow`` within
        ``burst_window`` seconds (IB: 5 within 2 s, "fewer than 6").
    window, window_limit:
        at most ``window_limit`` weight units within ``window`` seconds (IB: 60 in 600 s;
        BID_ASK weighs 2).
    max_open:
        requests open at once (IB: 50).

    A request counts from :meth:`sent` on; :meth:`finished` closes it (answered, refused or
    abandoned). Windows are half-open: a request sent at ``t`` is inside a window ``w`` up to,
    not including, ``t + w``. Thread-safe.
    """

    def __init__(self, *, identical_window: float = 15.0, burst_window: float = 2.0, burst_limit: int = 5,
                 window: float = 600.0, window_limit: int = 60, max_open: int = 50,
                 clock: Callable[[], float] = time.monotonic):
        for name, value in (("identical_window", identical_window), ("burst_window", burst_window),
                            ("window", window)):
            if not value >= 0:
                raise InvalidConfigError(f"pacing {name} was {value!r}; give seconds, 0 or more")
        for name, count, least in (("burst_limit", burst_limit, 1), ("window_limit", window_limit, 2),
                                   ("max_open", max_open, 1)):
            if count < least:
                raise InvalidConfigError(f"pacing {name} was {count!r}; give a whole number of requests, at least "
                                         f"{least} (a BID_ASK request weighs 2)")
        self.identical_window, self.burst_window, self.burst_limit = identical_window, burst_window, burst_limit
        self.window, self.window_limit, self.max_open = window, window_limit, max_open
        self.clock = clock
        self._sent: deque[tuple[float, HistoricalRequest]] = deque()  # oldest first, within the longest window
        self._open: dict[HistoricalRequest, int] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings, *, clock: Callable[[], float] = time.monotonic) -> "HistoricalPacer":
        """The rules as ``settings.backfill_pacing_*`` state them (IB's by default)."""
        return cls(identical_window=settings.backfill_pacing_identical.total_seconds(),
                   burst_window=settings.backfill_pacing_burst_window.total_seconds(),
                   burst_limit=settings.backfill_pacing_burst_limit,
                   window=settings.backfill_pacing_window.total_seconds(),
                   window_limit=settings.backfill_pacing_window_limit, max_open=settings.backfill_pacing_max_open,
                   clock=clock)

    @property
    def open(self) -> int:
        """Requests sent and not finished."""
        with self._lock:
            return sum(self._open.values())

    def delay(self, request: HistoricalRequest) -> float:
        """Seconds from now until ``request`` may be sent without breaking a rule (0: now); ``math.inf``
        while ``max_open`` requests are open (it depends on one finishing, not on time)."""
        with self._lock:
            now = self.clock()
            self._forget(now)
            if sum(self._open.values()) >= self.max_open:
                return math.inf
            return max(0.0, self._earliest(request) - now)

    def sent(self, request: HistoricalRequest) -> None:
        """``request`` went to IB now (a refused one counts too: IB counted it)."""
        with self._lock:
            self._sent.append((self.clock(), request))
            self._open[request] = self._open.get(request, 0) + 1

    def finished(self, request: HistoricalRequest) -> None:
        """IB answered ``request`` (or refused it, or the connection that carried it is gone)."""
        with self._lock:
            left = self._open.get(request, 0) - 1
            if left > 0:
                self._open[request] = left
            else:
                self._open.pop(request, None)

    def _earliest(self, request: HistoricalRequest) -> float:
        """The first time at which every rule lets ``request`` go (each rule: "from T on")."""
        earliest = -math.inf
        same = [at for at, r in self._sent if (r.contract_id, r.what_to_show) == (request.contract_id,
                                                                                   request.what_to_show)]
        identical = [at for at, r in self._sent if r == request]
        if identical:
            earliest = max(earliest, identical[-1] + self.identical_window)
        if len(same) >= self.burst_limit:  # the oldest ones must leave the window until burst_limit - 1 are in it
            earliest = max(earliest, same[len(same) - self.burst_limit] + self.burst_window)
        load = sum(r.weight for _, r in self._sent) + request.weight
        for at, sent in self._sent:  # oldest first: each one leaving the window lightens the load
            if load <= self.window_limit:
                break
            load -= sent.weight
            earliest = max(earliest, at + self.window)
        return earliest

    def _forget(self, now: float) -> None:
        """Drop what no rule can see any more (sent longer ago than every window)."""
        longest = max(self.identical_window, self.burst_window, self.window)
        while self._sent and self._sent[0][0] + longest <= now:
            self._sent.popleft()
