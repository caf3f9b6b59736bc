"""The historical pacer against a brute-force model of IB's pacing rules.

Times are whole numbers (as floats, so every sum is exact): the model checks each rule by
counting the requests inside each window, and finds the first allowed time by trying every
moment at which a window loses a request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ibstream.core.errors import InvalidConfigError
from ibstream.recorder.pacing import HistoricalPacer, HistoricalRequest


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Rules:
    """IB's rules, checked the slow way over everything sent."""

    identical_window: float = 15.0
    burst_window: float = 2.0
    burst_limit: int = 5
    window: float = 600.0
    window_limit: int = 60
    max_open: int = 50
    sent: list[tuple[float, HistoricalRequest]] = field(default_factory=list)
    open: int = 0

    def allowed(self, request: HistoricalRequest, at: float) -> bool:
        inside = lambda w: [r for t, r in self.sent if at - w < t <= at]  # noqa: E731 (sent within w before at)
        same = [r for r in inside(self.burst_window)
                if (r.contract_id, r.what_to_show) == (request.contract_id, request.what_to_show)]
        return (request not in inside(self.identical_window)
                and len(same) + 1 <= self.burst_limit
                and sum(r.weight for r in inside(self.window)) + request.weight <= self.window_limit
                and self.open < self.max_open)

    def earliest(self, request: HistoricalRequest, now: float) -> float:
        if self.open >= self.max_open:
            return math.inf
        moments = {now} | {t + w for t, _ in self.sent for w in (self.identical_window, self.burst_window,
                                                                  self.window) if t + w > now}
        return min(m for m in moments if self.allowed(request, m))


def pacer_of(rules: Rules, clock: Clock) -> HistoricalPacer:
    return HistoricalPacer(identical_window=rules.identical_window, burst_window=rules.burst_window,
                           burst_limit=rules.burst_limit, window=rules.window, window_limit=rules.window_limit,
                           max_open=rules.max_open, clock=clock)


REQUESTS = [HistoricalRequest(cid, what, page) for cid in (1, 2) for what in ("BID_ASK", "TRADES") for page in (0, 1)]
steps = st.lists(st.one_of(
    st.tuples(st.just("request"), st.sampled_from(REQUESTS)),
    st.tuples(st.just("wait"), st.integers(0, 40)),
    st.tuples(st.just("finish"), st.integers(0, 5)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(steps=steps, identical=st.integers(0, 30), burst_window=st.integers(0, 10), burst_limit=st.integers(1, 6),
       window=st.integers(0, 200), window_limit=st.integers(2, 12), max_open=st.integers(1, 8))
@example(steps=[("request", REQUESTS[0])] * 3, identical=15, burst_window=2, burst_limit=5, window=600,
         window_limit=60, max_open=50)
def test_the_pacer_waits_exactly_as_long_as_the_rules_need(steps, identical, burst_window, burst_limit, window,
                                                            window_limit, max_open):
    clock = Clock()
    rules = Rules(float(identical), float(burst_window), burst_limit, float(window), window_limit, max_open)
    pacer = pacer_of(rules, clock)
    opened: list[HistoricalRequest] = []
    for kind, value in steps:
        if kind == "wait":
            clock.now += value
        elif kind == "finish":
            if opened:
                pacer.finished(opened.pop(value % len(opened)))
                rules.open -= 1
        else:
            wait = pacer.delay(value)
            assert wait == rules.earliest(value, clock.now) - clock.now  # never longer than needed
            if wait == math.inf:
                continue
            clock.now += wait
            assert rules.allowed(value, clock.now)  # what it allows breaks no rule
            pacer.sent(value)
            rules.sent.append((clock.now, value))
            rules.open += 1
            opened.append(value)
        assert pacer.open == rules.open


def test_ibs_own_limits():
    clock = Clock()
    pacer = HistoricalPacer(clock=clock)
    trades = [HistoricalRequest(265598, "TRADES", page) for page in range(70)]
    starts = []
    for request in trades[:60]:
        clock.now += pacer.delay(request)
        starts.append(clock.now)
        pacer.sent(request)
        pacer.finished(request)
    # five for one contract and whatToShow, then the 2-s window decides: 5 per 2 s
    assert starts[:6] == [1_000.0] * 5 + [1_002.0]
    assert starts[59] == 1_022.0
    assert pacer.delay(trades[60]) == 1_600.0 - 1_022.0  # the 61st in 10 min waits for the first to leave
    quotes = HistoricalRequest(711280073, "BID_ASK", 0)
    assert pacer.delay(quotes) == 1_600.0 - 1_022.0  # BID_ASK weighs 2: two must leave (both sent at 1,000)
    clock.now = 1_600.0
    assert pacer.delay(quotes) == 0.0
    pacer.sent(quotes)
    assert pacer.delay(quotes) == 15.0  # the identical request: 15 s


def test_open_requests_block_until_one_finishes():
    pacer = HistoricalPacer(max_open=2, clock=Clock())
    first, second = HistoricalRequest(1, "TRADES", 1), HistoricalRequest(2, "TRADES", 1)
    pacer.sent(first)
    pacer.sent(second)
    assert pacer.delay(HistoricalRequest(3, "TRADES", 1)) == math.inf
    pacer.finished(first)
    assert pacer.delay(HistoricalRequest(3, "TRADES", 1)) == 0.0


@pytest.mark.parametrize("bad, message", [
    ({"window": -1.0}, "pacing window was -1.0; give seconds, 0 or more"),
    ({"window_limit": 1}, "pacing window_limit was 1; give a whole number of requests, at least 2 (a BID_ASK "
                          "request weighs 2)"),
    ({"max_open": 0}, "pacing max_open was 0; give a whole number of requests, at least 1 (a BID_ASK request "
                      "weighs 2)"),
])
def test_unusable_rules_are_refused(bad, message):
    with pytest.raises(InvalidConfigError) as refused:
        HistoricalPacer(**bad)
    assert str(refused.value) == message
