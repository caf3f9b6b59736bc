"""Trading sessions from IB's hours and the exchange calendars (storage.sessions), real calendars.

Contract details are built from the simulated gateway's contracts for a chosen "fetch date":
``SIM_AAPL.hours(fetched)`` / ``SIM_MNQ.hours(fetched)`` are IB-format hours from XNYS / CMES.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import exchange_calendars
import pytest

from ibstream.core.errors import InvalidRequestError
from ibstream.core.times import to_us
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ, SimContract
from ibstream.storage.index import ContractDetails
from ibstream.storage.sessions import SESSION_KINDS, ContractSessions, Session, no_calendar_error, normalize_kind

ET, CT = ZoneInfo("US/Eastern"), ZoneInfo("US/Central")
FETCHED = date(2026, 11, 23)  # a Monday; IB's window is 2026-11-23 .. 2026-11-29 (7 days)


def utc(*args: int) -> int:
    return to_us(datetime(*args, tzinfo=UTC))


def local(zone: ZoneInfo, *args: int) -> int:
    return to_us(datetime(*args, tzinfo=zone))


def details(sim: SimContract, fetched: date = FETCHED, days: int = 7, **changes) -> ContractDetails:
    """What the recorder stores after resolving ``sim`` on ``fetched``."""
    return dataclasses.replace(sim.details(fetched, days), **changes)


def sessions_of(sim: SimContract, fetched: date = FETCHED, days: int = 7) -> ContractSessions:
    return ContractSessions.from_details(details(sim, fetched, days))


def spans(found: list[Session]) -> list[tuple[str, date, int, int]]:
    return [(s.kind, s.trading_date, s.open_us, s.close_us) for s in found]


def refusal(call, *args) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        call(*args)
    return str(caught.value)


AAPL, MNQ = sessions_of(SIM_AAPL), sessions_of(SIM_MNQ)


# -- kinds, helpers, calendar choice -----------------------------------------------------------

def test_normalize_kind():
    assert [normalize_kind(k) for k in SESSION_KINDS] == list(SESSION_KINDS)
    assert normalize_kind("overnight") == "full_day"
    assert normalize_kind(" Regular ") == "regular"
    message = refusal(normalize_kind, "rth")
    assert "'rth'" in message and "regular, extended, pre_market, after_hours, full_day" in message


def test_no_calendar_error():
    error = no_calendar_error(711280073)
    assert isinstance(error, InvalidRequestError)
    assert str(error).startswith("contract 711280073 has no trading hours")
    assert "`ibstream record`" in str(error) and "start/end" in str(error)


def test_calendar_and_zone_from_details():
    assert (AAPL.contract_id, AAPL.calendar_name, AAPL.zone) == (SIM_AAPL.con_id, "XNYS", ET)
    assert (MNQ.contract_id, MNQ.calendar_name, MNQ.zone) == (SIM_MNQ.con_id, "CMES", CT)
    globex = ContractSessions.from_details(details(SIM_MNQ, exchange="GLOBEX", sec_type="CONTFUT"))
    arca = ContractSessions.from_details(details(SIM_AAPL, primary_exchange="ARCA", exchange="SMART"))
    foreign = ContractSessions.from_details(details(SIM_AAPL, primary_exchange="IBIS", currency="EUR"))
    assert (globex.calendar_name, arca.calendar_name, foreign.calendar_name) == ("CMES", "XNYS", None)


# -- AAPL --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fetched", [FETCHED, date(2026, 3, 2)], ids=["ib", "calendar"])
def test_aapl_normal_and_early_close(fetched):
    aapl = sessions_of(SIM_AAPL, fetched)
    source = "ib" if fetched == FETCHED else "calendar"
    assert aapl.session("regular", date(2026, 11, 24)) == Session(
        SIM_AAPL.con_id, "regular", date(2026, 11, 24), utc(2026, 11, 24, 14, 30), utc(2026, 11, 24, 21), source)
    assert spans(aapl.day(date(2026, 11, 24))) == [
        ("regular", date(2026, 11, 24), utc(2026, 11, 24, 14, 30), utc(2026, 11, 24, 21)),
        ("extended", date(2026, 11, 24), utc(2026, 11, 24, 9), utc(2026, 11, 25, 1)),
        ("pre_market", date(2026, 11, 24), utc(2026, 11, 24, 9), utc(2026, 11, 24, 14, 30)),
        ("after_hours", date(2026, 11, 24), utc(2026, 11, 24, 21), utc(2026, 11, 25, 1)),
        ("full_day", date(2026, 11, 24), utc(2026, 11, 24, 5), utc(2026, 11, 25, 5)),
    ]
    # Black Friday: regular 09:30-13:00 ET, extended 04:00-17:00 ET
    assert spans(aapl.day(date(2026, 11, 27)))[:4] == [
        ("regular", date(2026, 11, 27), utc(2026, 11, 27, 14, 30), utc(2026, 11, 27, 18)),
        ("extended", date(2026, 11, 27), utc(2026, 11, 27, 9), utc(2026, 11, 27, 22)),
        ("pre_market", date(2026, 11, 27), utc(2026, 11, 27, 9), utc(2026, 11, 27, 14, 30)),
        ("after_hours", date(2026, 11, 27), utc(2026, 11, 27, 18), utc(2026, 11, 27, 22)),
    ]
    assert {s.source for s in aapl.day(date(2026, 11, 27))} == {source, "clock"}


@pytest.mark.parametrize("fetched", [FETCHED, date(2026, 3, 2)], ids=["ib", "calendar"])
def test_aapl_thanksgiving_is_refused(fetched):
    aapl = sessions_of(SIM_AAPL, fetched)
    for kind in ("regular", "extended", "after_hours"):
        message = refusal(aapl.session, kind, date(2026, 11, 26))
        assert message.startswith(f"contract {SIM_AAPL.con_id} (AAPL) has no {kind} session on 2026-11-26 (Thursday)")
        assert "a holiday on the XNYS calendar (Thanksgiving)" in message
        assert "2026-11-25 (Wednesday) before, 2026-11-27 (Friday) after" in message
    assert ("IB's hours mark it CLOSED" in message) == (fetched == FETCHED)
    assert spans(aapl.day(date(2026, 11, 26))) == [
        ("full_day", date(2026, 11, 26), utc(2026, 11, 26, 5), utc(2026, 11, 27, 5))]
    assert "a weekend day on the XNYS calendar" in refusal(aapl.session, "regular", date(2026, 11, 28))


# -- MNQ ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("fetched", [FETCHED, date(2026, 11, 27), date(2026, 3, 2)])
def test_mnq_monday_session_opens_sunday_evening(fetched):
    mnq = sessions_of(SIM_MNQ, fetched)
    monday = mnq.session("extended", date(2026, 11, 30))
    assert (monday.open_us, monday.close_us) == (utc(2026, 11, 29, 23), utc(2026, 11, 30, 22))
    assert monday.source == ("ib" if fetched == date(2026, 11, 27) else "calendar")
    assert [s.kind for s in mnq.day(date(2026, 11, 29))] == ["full_day"]
    assert [s.kind for s in mnq.day(date(2026, 11, 28))] == ["full_day"]
    assert "Sunday" in refusal(mnq.session, "extended", date(2026, 11, 29))
    assert spans(mnq.day(date(2026, 11, 30)))[:4] == [
        ("regular", date(2026, 11, 30), utc(2026, 11, 30, 14, 30), utc(2026, 11, 30, 21)),
        ("extended", date(2026, 11, 30), utc(2026, 11, 29, 23), utc(2026, 11, 30, 22)),
        ("pre_market", date(2026, 11, 30), utc(2026, 11, 29, 23), utc(2026, 11, 30, 14, 30)),
        ("after_hours", date(2026, 11, 30), utc(2026, 11, 30, 21), utc(2026, 11, 30, 22)),
    ]


def test_mnq_thanksgiving_trades_until_noon():
    """CMES keeps Globex open on Thanksgiving until 12:00 CT; both sessions end then."""
    assert spans(MNQ.day(date(2026, 11, 26))) == [
        ("regular", date(2026, 11, 26), utc(2026, 11, 26, 14, 30), utc(2026, 11, 26, 18)),
        ("extended", date(2026, 11, 26), utc(2026, 11, 25, 23), utc(2026, 11, 26, 18)),
        ("pre_market", date(2026, 11, 26), utc(2026, 11, 25, 23), utc(2026, 11, 26, 14, 30)),
        ("full_day", date(2026, 11, 26), utc(2026, 11, 26, 6), utc(2026, 11, 27, 6)),
    ]
    assert "has no after_hours session on 2026-11-26" in refusal(MNQ.session, "after_hours", date(2026, 11, 26))


# -- DST ---------------------------------------------------------------------------------------

DST = [  # (contract, kind, trading date, open, close): US DST starts 2026-03-08 and ends 2026-11-01
    (SIM_AAPL, "regular", date(2026, 3, 6), utc(2026, 3, 6, 14, 30), utc(2026, 3, 6, 21)),
    (SIM_AAPL, "regular", date(2026, 3, 9), utc(2026, 3, 9, 13, 30), utc(2026, 3, 9, 20)),
    (SIM_MNQ, "extended", date(2026, 3, 6), utc(2026, 3, 5, 23), utc(2026, 3, 6, 22)),
    (SIM_MNQ, "extended", date(2026, 3, 9), utc(2026, 3, 8, 22), utc(2026, 3, 9, 21)),  # Sunday 17:00 CDT
    (SIM_AAPL, "regular", date(2026, 10, 30), utc(2026, 10, 30, 13, 30), utc(2026, 10, 30, 20)),
    (SIM_AAPL, "regular", date(2026, 11, 2), utc(2026, 11, 2, 14, 30), utc(2026, 11, 2, 21)),
    (SIM_MNQ, "extended", date(2026, 10, 30), utc(2026, 10, 29, 22), utc(2026, 10, 30, 21)),
    (SIM_MNQ, "extended", date(2026, 11, 2), utc(2026, 11, 1, 23), utc(2026, 11, 2, 22)),  # Sunday 17:00 CST
]


@pytest.mark.parametrize("fetched", ["day before", "2026-11-23"])
@pytest.mark.parametrize("sim, kind, day, open_us, close_us", DST, ids=[f"{d[0].symbol}-{d[2]}" for d in DST])
def test_dst_follows_the_zone(sim, kind, day, open_us, close_us, fetched):
    """Inside IB's window (fetched the day before) and far outside it (fetched 2026-11-23)."""
    contract = sessions_of(sim, day - timedelta(days=1)) if fetched == "day before" else sessions_of(sim)
    found = contract.session(kind, day)
    assert (found.open_us, found.close_us, found.source) == (
        open_us, close_us, "ib" if fetched == "day before" else "calendar")


def test_full_day_of_a_dst_switch_is_23_or_25_hours():
    spring, autumn = AAPL.session("full_day", date(2026, 3, 8)), AAPL.session("overnight", date(2026, 11, 1))
    assert (spring.open_us, spring.close_us) == (utc(2026, 3, 8, 5), utc(2026, 3, 9, 4))
    assert (autumn.open_us, autumn.close_us, autumn.kind) == (utc(2026, 11, 1, 4), utc(2026, 11, 2, 5), "full_day")


# -- calendar completion outside IB's window ---------------------------------------------------

WEEKS = [  # (first date, days): holidays, early closes, DST switches, Good Friday, MLK day
    (date(2025, 6, 30), 10), (date(2025, 12, 20), 16), (date(2026, 1, 15), 6),
    (date(2026, 3, 4), 8), (date(2026, 3, 30), 7), (date(2026, 10, 28), 8),
]


@pytest.mark.parametrize("sim", [SIM_AAPL, SIM_MNQ], ids=["AAPL", "MNQ"])
@pytest.mark.parametrize("first, days", WEEKS, ids=[str(w[0]) for w in WEEKS])
def test_calendar_completion_equals_ib_hours(sim, first, days, caplog):
    """Details fetched 2026-11-23 answer far dates exactly as details fetched on those dates do."""
    far, near = sessions_of(sim), sessions_of(sim, first, days)
    with caplog.at_level(logging.WARNING, logger="ibstream.storage.sessions"):
        for day in (first + timedelta(days=i) for i in range(days)):
            completed, reported = far.day(day), near.day(day)
            assert spans(completed) == spans(reported), day
            assert {s.source for s in completed} <= {"calendar", "clock"}
            assert {s.source for s in reported} <= {"ib", "clock"}
    assert caplog.records == []  # inside the window the calendar agrees with IB everywhere


def test_calendar_completion_uses_exchange_calendars_times():
    xnys, cmes = exchange_calendars.get_calendar("XNYS"), exchange_calendars.get_calendar("CMES")

    def official(calendar, day):
        return to_us(calendar.session_open(str(day))), to_us(calendar.session_close(str(day)))

    for day in (date(2026, 3, 9), date(2025, 12, 24), date(2025, 7, 3)):
        regular = AAPL.session("regular", day)
        assert (regular.open_us, regular.close_us, regular.source) == (*official(xnys, day), "calendar")
        assert MNQ.session("extended", day).open_us == official(cmes, day)[0]
    assert official(xnys, date(2025, 12, 24))[1] == utc(2025, 12, 24, 18)  # 13:00 ET
    extended = AAPL.session("extended", date(2025, 12, 24))
    assert (extended.open_us, extended.close_us) == (utc(2025, 12, 24, 9), utc(2025, 12, 24, 22))  # 04:00-17:00 ET
    for day in (date(2025, 12, 24), date(2025, 7, 4)):  # CMES early closes at 12:00 CT end both MNQ sessions
        assert MNQ.session("extended", day).close_us == official(cmes, day)[1]
        assert MNQ.session("regular", day).close_us == official(cmes, day)[1]
    normal = MNQ.session("extended", date(2026, 3, 9))
    assert normal.close_us == official(cmes, date(2026, 3, 9))[1] - 3_600_000_000  # 16:00 CT, CMES says 17:00
    message = refusal(AAPL.session, "regular", date(2025, 7, 4))
    assert "a holiday on the XNYS calendar (July 4th)" in message
    assert "2025-07-03 (Thursday) before, 2025-07-07 (Monday) after" in message


def test_dates_outside_the_calendar_are_refused():
    message = refusal(AAPL.session, "regular", date(2030, 1, 2))
    assert message.startswith(
        f"contract {SIM_AAPL.con_id} (AAPL): 2030-01-02 is outside the XNYS exchange calendar's span")
    assert "IB's reported hours (2026-11-23 to 2026-11-29)" in message
    assert AAPL.session("full_day", date(2030, 1, 2)).open_us == utc(2030, 1, 2, 5)


# -- current / previous ------------------------------------------------------------------------

CURRENT = [  # (contract, kind, now, current trading date, previous trading date)
    ("AAPL", "regular", datetime(2026, 11, 24, 8, tzinfo=ET), date(2026, 11, 23), date(2026, 11, 20)),
    ("AAPL", "extended", datetime(2026, 11, 24, 8, tzinfo=ET), date(2026, 11, 24), date(2026, 11, 23)),
    ("AAPL", "regular", datetime(2026, 11, 24, 9, 30, tzinfo=ET), date(2026, 11, 24), date(2026, 11, 23)),
    ("AAPL", "regular", datetime(2026, 11, 24, 17, tzinfo=ET), date(2026, 11, 24), date(2026, 11, 23)),
    ("AAPL", "regular", datetime(2026, 11, 28, 12, tzinfo=ET), date(2026, 11, 27), date(2026, 11, 25)),
    ("AAPL", "after_hours", datetime(2026, 11, 28, 12, tzinfo=ET), date(2026, 11, 27), date(2026, 11, 25)),
    ("AAPL", "full_day", datetime(2026, 11, 28, 12, tzinfo=ET), date(2026, 11, 28), date(2026, 11, 27)),
    ("MNQ", "extended", datetime(2026, 11, 29, 18, tzinfo=CT), date(2026, 11, 30), date(2026, 11, 27)),
    ("MNQ", "extended", datetime(2026, 11, 29, 16, tzinfo=CT), date(2026, 11, 27), date(2026, 11, 26)),
    ("MNQ", "regular", datetime(2026, 11, 29, 18, tzinfo=CT), date(2026, 11, 27), date(2026, 11, 26)),
    ("MNQ", "extended", datetime(2026, 11, 30, 16, 30, tzinfo=CT), date(2026, 11, 30), date(2026, 11, 27)),
    ("MNQ", "extended", datetime(2026, 11, 30, 17, tzinfo=CT), date(2026, 12, 1), date(2026, 11, 30)),
]


@pytest.mark.parametrize("name, kind, now, current, previous", CURRENT)
def test_current_and_previous(name, kind, now, current, previous):
    contract = {"AAPL": AAPL, "MNQ": MNQ}[name]
    found, before = contract.current(kind, to_us(now)), contract.previous(kind, to_us(now))
    assert (found.kind, found.trading_date, before.trading_date) == (kind, current, previous)
    assert found.open_us <= to_us(now) and before.close_us <= found.open_us


def test_current_exact_values():
    sunday_evening = local(CT, 2026, 11, 29, 18)
    assert MNQ.current("extended", sunday_evening) == Session(
        SIM_MNQ.con_id, "extended", date(2026, 11, 30), utc(2026, 11, 29, 23), utc(2026, 11, 30, 22), "calendar")
    assert MNQ.previous("extended", sunday_evening) == Session(
        SIM_MNQ.con_id, "extended", date(2026, 11, 27), utc(2026, 11, 26, 23), utc(2026, 11, 27, 18), "ib")
    before_open = local(ET, 2026, 11, 24, 8)
    assert AAPL.previous("regular", before_open) == Session(
        SIM_AAPL.con_id, "regular", date(2026, 11, 20), utc(2026, 11, 20, 14, 30), utc(2026, 11, 20, 21), "calendar")


# -- ranges and days ---------------------------------------------------------------------------

def test_sessions_over_a_range():
    week = AAPL.sessions("regular", local(ET, 2026, 11, 24), local(ET, 2026, 12, 1))
    assert spans(week) == [
        ("regular", date(2026, 11, 24), utc(2026, 11, 24, 14, 30), utc(2026, 11, 24, 21)),
        ("regular", date(2026, 11, 25), utc(2026, 11, 25, 14, 30), utc(2026, 11, 25, 21)),
        ("regular", date(2026, 11, 27), utc(2026, 11, 27, 14, 30), utc(2026, 11, 27, 18)),
        ("regular", date(2026, 11, 30), utc(2026, 11, 30, 14, 30), utc(2026, 11, 30, 21)),
    ]
    assert [s.source for s in week] == ["ib", "ib", "ib", "calendar"]
    overlapping = AAPL.sessions("regular", utc(2026, 11, 24, 20, 59), utc(2026, 11, 25, 14, 31))
    assert [s.trading_date for s in overlapping] == [date(2026, 11, 24), date(2026, 11, 25)]
    assert AAPL.sessions("regular", utc(2026, 11, 24, 21), utc(2026, 11, 25, 14, 30)) == []  # [open, close)
    weekend = MNQ.sessions("extended", local(CT, 2026, 11, 27, 11), local(CT, 2026, 11, 30, 10))
    assert spans(weekend) == [
        ("extended", date(2026, 11, 27), utc(2026, 11, 26, 23), utc(2026, 11, 27, 18)),
        ("extended", date(2026, 11, 30), utc(2026, 11, 29, 23), utc(2026, 11, 30, 22)),
    ]
    sunday_night = MNQ.sessions("extended", local(CT, 2026, 11, 29, 20), local(CT, 2026, 11, 29, 21))
    assert [s.trading_date for s in sunday_night] == [date(2026, 11, 30)]
    days = AAPL.sessions("full_day", local(ET, 2026, 11, 27, 12), local(ET, 2026, 11, 29, 12))
    assert [s.trading_date for s in days] == [date(2026, 11, 27), date(2026, 11, 28), date(2026, 11, 29)]
    message = refusal(AAPL.sessions, "regular", utc(2026, 11, 25), utc(2026, 11, 24))
    assert "2026-11-25T00:00:00Z is not before end 2026-11-24T00:00:00Z" in message


def test_sessions_over_a_month_is_fast():
    start, end = utc(2026, 1, 1), utc(2026, 2, 1)
    for sim in (SIM_AAPL, SIM_MNQ):
        contract = sessions_of(sim)  # calendar already loaded; nothing cached on this instance yet
        began = time.perf_counter()
        for kind in SESSION_KINDS:
            contract.sessions(kind, start, end)
        assert time.perf_counter() - began < 0.05
        assert len(contract.sessions("regular", start, end)) == {"AAPL": 20, "MNQ": 21}[sim.symbol]


def test_day_lists_every_kind_in_order():
    assert [s.kind for s in AAPL.day(date(2026, 11, 27))] == list(SESSION_KINDS)
    assert [s.kind for s in MNQ.day(date(2026, 11, 27))] == ["regular", "extended", "pre_market", "full_day"]
    assert [s.kind for s in AAPL.day(date(2026, 11, 26))] == ["full_day"]
    assert "give a datetime.date" in refusal(AAPL.day, datetime(2026, 11, 27, tzinfo=UTC))


# -- contracts without a calendar, IB disagreeing, bad details ---------------------------------

FX_HOURS = ("20261122:1715-20261123:1700;20261123:1715-20261124:1700;20261124:1715-20261125:1700;"
            "20261125:1715-20261126:1700;20261126:1715-20261127:1700;20261128:CLOSED;20261129:1715-20261130:1700")
FX = ContractSessions.from_details(details(
    SIM_AAPL, contract_id=12087792, symbol="EUR", sec_type="CASH", exchange="IDEALPRO", primary_exchange="",
    local_symbol="EUR.USD", trading_hours=FX_HOURS,
    liquid_hours=FX_HOURS.replace(  # a mid-day break on 2026-11-25
        "20261124:1715-20261125:1700", "20261125:0300-20261125:1200;20261125:1300-20261125:1600"),
))


def test_contract_without_calendar_answers_inside_ib_window_only():
    assert FX.calendar_name is None
    assert FX.session("extended", date(2026, 11, 24)) == Session(
        12087792, "extended", date(2026, 11, 24), utc(2026, 11, 23, 22, 15), utc(2026, 11, 24, 22), "ib")
    # two liquid ranges closing on one date make one session, first open to last close
    assert spans([FX.session("regular", date(2026, 11, 25))]) == [
        ("regular", date(2026, 11, 25), utc(2026, 11, 25, 8), utc(2026, 11, 25, 21))]
    assert "IB's hours mark it CLOSED" in refusal(FX.session, "extended", date(2026, 11, 28))
    assert "no session in IB's hours closes on it" in refusal(FX.session, "extended", date(2026, 11, 29))
    assert "but has no pre_market part" in refusal(FX.session, "pre_market", date(2026, 11, 24))
    message = refusal(FX.session, "regular", date(2026, 12, 15))
    assert message.startswith("contract 12087792 (EUR.USD): no sessions known for 2026-12-15: exchange 'IDEALPRO' "
                              "has no exchange calendar")
    assert "dates IB reported (2026-11-23 to 2026-11-30)" in message
    assert "exchange 'IDEALPRO' has no exchange calendar" in refusal(
        FX.sessions, "extended", utc(2026, 11, 24), utc(2026, 12, 5))
    now = local(ET, 2026, 11, 25, 12)
    assert (FX.current("extended", now).trading_date, FX.previous("extended", now).trading_date) == (
        date(2026, 11, 25), date(2026, 11, 24))
    assert FX.session("full_day", date(2030, 1, 1)).source == "clock"


def test_ib_hours_win_over_the_calendar_and_warn_once(caplog):
    trading, liquid = SIM_AAPL.hours(FETCHED, 10)
    changed = details(
        SIM_AAPL, contract_id=990001,
        trading_hours=trading.replace("20261124:0400-20261124:2000", "20261124:CLOSED"),
        liquid_hours=liquid.replace("20261124:0930-20261124:1600", "20261124:CLOSED")
                           .replace("20261125:0930-20261125:1600", "20261125:0930-20261125:1300"),
    )
    with caplog.at_level(logging.WARNING, logger="ibstream.storage.sessions"):
        contract = ContractSessions.from_details(changed)
        message = refusal(contract.session, "regular", date(2026, 11, 24))
        assert "IB's hours mark it CLOSED; although the XNYS calendar trades it (IB's hours win)" in message
        assert contract.session("regular", date(2026, 11, 25)).close_us == utc(2026, 11, 25, 18)
        assert contract.session("extended", date(2026, 11, 25)).close_us == utc(2026, 11, 26, 1)
        ContractSessions.from_details(changed).day(date(2026, 11, 24))  # a fresh instance: no second warning
        assert contract.session("regular", date(2026, 12, 3)).close_us == utc(2026, 12, 3, 21)  # template intact
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert warnings[0].startswith("contract 990001 (AAPL): IB's hours and the XNYS calendar disagree on 2026-11-24: "
                                  "IB closed, calendar trading 2026-11-24 04:00-2026-11-24 20:00")
    assert "on 2026-11-25: IB trading 2026-11-25 04:00-2026-11-25 20:00, liquid 2026-11-25 09:30-2026-11-25 13:00" \
        in warnings[1]


def test_bad_details_and_arguments_are_refused():
    mars = details(SIM_AAPL, time_zone="Mars/Olympus")
    assert "time zone 'Mars/Olympus'" in refusal(ContractSessions.from_details, mars)
    message = refusal(ContractSessions.from_details, details(SIM_AAPL, trading_hours="20261124:0930-1600"))
    assert "tradingHours entry '20261124:0930-1600' is not IB's YYYYMMDD:HHMM-YYYYMMDD:HHMM" in message
    assert "does not open before it closes" in refusal(
        ContractSessions.from_details, details(SIM_AAPL, liquid_hours="20261124:1600-20261124:0930"))
    assert "give a datetime.date" in refusal(AAPL.session, "regular", "2026-11-24")
    assert "session kind was 'bars'" in refusal(AAPL.current, "bars", utc(2026, 11, 24))


def test_a_full_day_past_the_calendar_of_python_is_refused_cleanly():
    with pytest.raises(InvalidRequestError, match="9999-12-31 is past the last date there is"):
        sessions_of(SIM_MNQ).session("full_day", date(9999, 12, 31))

