"""Gap backfill end to end: the real recorder records the simulator's wall-clock market through ibapi,
a forced disconnect leaves a gap, the hours are archived, and the backfill fills the gap from the
simulator's ``reqHistoricalTicks`` (its own ibapi connection) into the real store.

One recording (module fixture) is copied into a fresh data root per test. Afterwards the archive
equals the market (``sim.market``) over the recorded window on every column but ``ts``: no tick
of the gap missing, none twice at either edge.
"""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime, timedelta

import polars as pl
import pyarrow as pa
import pytest

from ibstream.cli import main
from ibstream.core.times import US_PER_SECOND, to_us
from ibstream.recorder.backfill import Backfiller
from ibstream.recorder.history import PAGE_TICKS, HistorySession, session_spans, start_text
from ibstream.settings import ContractSpec, Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.history import NO_PERMISSIONS, HistoryPacing
from ibstream.storage.store import Store
from tests.helpers import EVERYTHING, wait_until
from tests.recorder.harness import AAPL, MNQ, Recording, ib_settings

SPEED = 100  # MNQ quotes ~1,500/s: most seconds hold more than a page (1,000)
SIM_PACING = HistoryPacing(identical_seconds=0.25, burst_seconds=0.1, window_seconds=1.0)  # IB's rules, shorter
CONTRACTS = (ContractSpec(con_id=MNQ, tick_types=("bid_ask", "last")), ContractSpec(con_id=AAPL, tick_types=("last",)))
STREAMS = [(MNQ, "bid_ask"), (MNQ, "last"), (AAPL, "last")]


def backfill_settings(data_root, sim: GatewaySimulator) -> Settings:
    """The recorder's settings: a gap of about 2 s per disconnect; our pacer a little stricter than the
    simulator's, so that loopback jitter never turns an allowed request into a violation."""
    return ib_settings(data_root.parent, sim, data_root=data_root, contracts=CONTRACTS,
                       ib_reconnect_initial=timedelta(seconds=2), ib_reconnect_delay=timedelta(seconds=2),
                       backfill_pacing_identical=timedelta(seconds=0.3), backfill_pacing_burst_window=timedelta(
                           seconds=0.15), backfill_pacing_window=timedelta(seconds=1.5),
                       backfill_pacing_backoff=timedelta(milliseconds=50))


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """(simulator, data root): a recording with one disconnect, every hour archived, the recorder stopped."""
    with GatewaySimulator(speed=SPEED, send_interval=0.005, market_clock=True, history_pacing=SIM_PACING) as sim:
        sim.tick_by_tick_start = 1.1  # IB starts a subscription after the request: a second's edge lies between
        root = tmp_path_factory.mktemp("recorded") / "data"
        settings = backfill_settings(root, sim)
        running = Recording(settings, sim)
        try:
            running.wait_for_ticks(3_000)
            # Late in a second: the recorder notices the drop a little later, in the next second, but the gap
            # starts after the last message it received, so the lost ticks of this second are fetched too.
            wait_until(lambda: time.time() % 1 >= 0.9, what="late in a second")
            sim.drop_connections()
            wait_until(lambda: running.feed.connections == 2, what="reconnect")
            running.wait_for_ticks(3_000)
        finally:
            running.close()
        with Store(settings) as store:
            store.archive(datetime.now(UTC) + timedelta(hours=2))  # every hour recorded in is closed by then
        yield sim, root


@pytest.fixture
def store_and_settings(recorded, tmp_path):
    """A fresh copy of the recording, opened for writing, and its settings."""
    sim, root = recorded
    shutil.copytree(root, tmp_path / "data")
    settings = backfill_settings(tmp_path / "data", sim)
    quiet = max(SIM_PACING.identical_seconds, SIM_PACING.burst_seconds, SIM_PACING.window_seconds)
    wait_until(lambda: not sim.history_requests or time.monotonic() - sim.history_requests[-1].when > quiet,
               what="the simulator's pacing windows to clear of earlier tests' requests")
    with Store(settings) as store:
        yield store, settings


def gap_of(store: Store, contract_id: int, tick_type: str):
    table = store.coverage(contract_id, tick_type, *EVERYTHING)
    rows = [row for row in table.to_pylist() if row["reason"] == "disconnected"]
    assert len(rows) == 1, table.to_pylist()
    return rows[0]


def assert_archive_is_the_market(sim: GatewaySimulator, store: Store, contract_id: int, tick_type: str) -> pa.Table:
    """The stored stream is one contiguous run of the market, every column but ts equal; returns it."""
    stored = pl.from_arrow(store.read(contract_id, tick_type, *EVERYTHING)).drop("ts")
    market = pl.from_arrow(sim.market(contract_id, tick_type)).drop("ts")
    first = stored.row(0)
    offsets = [i for i, row in enumerate(market.iter_rows()) if row == first]
    assert any(market.slice(i, stored.height).equals(stored) for i in offsets), (contract_id, tick_type)
    return store.read(contract_id, tick_type, *EVERYTHING)


def requests_of(sim: GatewaySimulator, since: int, contract_id: int, what: str):
    return [r for r in sim.history_requests[since:] if (r.con_id, r.what_to_show) == (contract_id, what)]


def test_a_disconnect_gap_is_backfilled_exactly_from_ibs_history(recorded, store_and_settings):
    sim, _ = recorded
    store, settings = store_and_settings
    before = len(sim.history_requests)
    report = Backfiller(store, settings).run()
    assert (report.count("backfilled"), report.pacing_violations, report.stopped) == (3, 0, None)
    assert all(r.code is None for r in sim.history_requests[before:])
    for contract_id, tick_type in STREAMS:
        gap = gap_of(store, contract_id, tick_type)
        assert gap["status"] == "backfilled"
        stored = assert_archive_is_the_market(sim, store, contract_id, tick_type)
        start, end = to_us(gap["start"]), to_us(gap["end"])
        ts = stored.column("ts").cast(pa.int64()).to_numpy()
        inside = int(((ts >= start) & (ts < end)).sum())
        outcome = next(g for g in report.gaps if (g.contract_id, g.tick_type) == (contract_id, tick_type))
        assert inside == outcome.added == gap["backfilled_ticks"] > 0
        assert outcome.fetched == outcome.added + outcome.duplicates
        assert [row["status"] for row in store.coverage(contract_id, tick_type, *EVERYTHING).to_pylist()] == [
            "recorded", "backfilled", "recorded", "gap"]  # the last: recorder_stopped, still open
    quotes = requests_of(sim, before, MNQ, "BID_ASK")
    assert [r.start for r in quotes][0] == start_text(to_us(gap_of(store, MNQ, "bid_ask")["start"]) // US_PER_SECOND)
    seconds = [r.start for r in quotes]
    assert seconds == sorted(set(seconds))  # each page after the last: no page asked twice, none looping
    assert any(r.ticks > PAGE_TICKS for r in quotes)  # a page IB completed past 1,000 to the end of its second


def test_a_gap_ib_refuses_is_unfillable_with_ibs_message(recorded, store_and_settings):
    sim, _ = recorded
    store, settings = store_and_settings
    sim.refuse_history(AAPL)
    try:
        report = Backfiller(store, settings).run()
    finally:
        sim.history.refusals.clear()
    outcome = next(g for g in report.gaps if g.contract_id == AAPL)
    assert (outcome.status, outcome.note, outcome.added, outcome.requests) == (
        "unfillable", f"IB 162: {NO_PERMISSIONS}", 0, 1)
    gap = gap_of(store, AAPL, "last")
    assert (gap["status"], gap["reason"], gap["backfill_note"]) == ("unfillable", "disconnected",
                                                                     f"IB 162: {NO_PERMISSIONS}")
    assert all(row["status"] != "gap" or row["end"] is None  # unfillable: never tried again
               for row in store.coverage(AAPL, "last", *EVERYTHING).to_pylist())
    assert [(g.contract_id, g.tick_type) for g in Backfiller(store, settings).run().gaps] == []


class _Interrupting(HistorySession):
    """A real session that, once its first page is answered, makes the simulator refuse the next two
    requests for pacing: mid-backfill."""

    def __init__(self, sim: GatewaySimulator, settings: Settings):
        super().__init__(settings)
        self.sim, self.armed = sim, True

    def _page(self, contract, what, second):
        page = super()._page(contract, what, second)
        if self.armed:
            self.armed = False
            self.sim.pacing_violations(2)
        return page


def test_pacing_violations_mid_backfill_are_retried_and_lose_nothing(recorded, store_and_settings):
    sim, _ = recorded
    store, settings = store_and_settings
    before = len(sim.history_requests)
    report = Backfiller(store, settings, session=lambda: _Interrupting(sim, settings)).run()
    assert (report.count("backfilled"), report.pacing_violations, report.stopped) == (3, 2, None)
    asked = sim.history_requests[before:]
    refused = [i for i, r in enumerate(asked) if r.code == 162]
    assert len(refused) == 2 and refused[1] == refused[0] + 1
    violated, retried = asked[refused[0]], asked[refused[1] + 1]
    assert asked[refused[1]].key == violated.key == retried.key and retried.code is None  # the same page again
    for contract_id, tick_type in STREAMS:
        assert gap_of(store, contract_id, tick_type)["status"] == "backfilled"
        assert_archive_is_the_market(sim, store, contract_id, tick_type)


class _Dropping(HistorySession):
    """A real session whose gateway closes the connection once the first page of quotes is answered (the
    quotes' gap takes several pages: the drop is mid-gap)."""

    def __init__(self, sim: GatewaySimulator, settings: Settings):
        super().__init__(settings)
        self.sim = sim

    def _page(self, contract, what, second):
        page = super()._page(contract, what, second)
        if what == "BID_ASK":
            self.sim.drop_connections()
        return page


def test_a_disconnect_mid_gap_leaves_it_a_gap_for_the_next_run(recorded, store_and_settings):
    sim, _ = recorded
    store, settings = store_and_settings
    report = Backfiller(store, settings, session=lambda: _Dropping(sim, settings)).run()
    done = {(g.contract_id, g.tick_type) for g in report.gaps}
    assert report.count("backfilled") == len(done) and report.left == 3 - len(done) and (MNQ, "bid_ask") not in done
    assert report.stopped is not None and report.stopped.startswith("the connection to the gateway at 127.0.0.1:")
    gap = gap_of(store, MNQ, "bid_ask")
    assert gap["status"] == "gap" and store.read(MNQ, "bid_ask", gap["start"], gap["end"]).num_rows == 0  # none stored
    report = Backfiller(store, settings).run()  # the next run: the rest, exactly
    assert (report.count("backfilled"), report.stopped) == (3 - len(done), None)
    for contract_id, tick_type in STREAMS:
        assert_archive_is_the_market(sim, store, contract_id, tick_type)


class _Racing(HistorySession):
    """A real session after whose fetch of AAPL's gap another writer backfills that gap with the same ticks."""

    def __init__(self, store: Store, settings: Settings):
        super().__init__(settings)
        self.store = store

    def fetch_ticks(self, contract, tick_type, start_us, end_us, *, closes=()):
        ticks = super().fetch_ticks(contract, tick_type, start_us, end_us, closes=closes)
        if contract.contract_id == AAPL:
            gap = gap_of(self.store, AAPL, "last")
            self.store.backfill(AAPL, "last", to_us(gap["start"]), to_us(gap["end"]), ticks, status="backfilled")
        return ticks


def test_a_gap_changed_while_it_was_fetched_is_left_and_the_run_goes_on(recorded, store_and_settings):
    sim, _ = recorded
    store, settings = store_and_settings
    report = Backfiller(store, settings, session=lambda: _Racing(store, settings)).run()
    assert (report.count("backfilled"), report.count("gap"), report.stopped) == (2, 1, None)
    (raced,) = [g for g in report.gaps if g.status == "gap"]
    assert (raced.contract_id, raced.tick_type, raced.added) == (AAPL, "last", 0)
    assert raced.note.startswith("not stored, tried again next run: ") and "is not one closed coverage row" in raced.note
    for contract_id, tick_type in STREAMS:  # the other writer's backfill stands, once
        assert gap_of(store, contract_id, tick_type)["status"] == "backfilled"
        assert_archive_is_the_market(sim, store, contract_id, tick_type)


def test_the_cli_backfills_once_with_a_summary_and_refuses_a_held_store(recorded, tmp_path, capsys, monkeypatch):
    sim, root = recorded
    shutil.copytree(root, tmp_path / "data")
    monkeypatch.setenv("IBSTREAM_BACKFILL_PACING_IDENTICAL", "PT0.3S")
    monkeypatch.setenv("IBSTREAM_BACKFILL_PACING_BURST_WINDOW", "PT0.15S")
    monkeypatch.setenv("IBSTREAM_BACKFILL_PACING_WINDOW", "PT1.5S")
    args = ["backfill", "--data-root", str(tmp_path / "data"), "--ib-port", str(sim.port), "--no-progress"]
    with Store(Settings(data_root=tmp_path / "data")):  # a recorder holds the store
        assert main(args) == 2
    held = capsys.readouterr().err
    assert held.startswith(f"ibstream backfill: {tmp_path / 'data'} is already open for writing by another process "
                           "(pid ") and held.endswith(
        "that recorder backfills every 10 min itself (IBSTREAM_BACKFILL_INTERVAL); to backfill now, stop it, run "
        "`ibstream backfill`, then start it again\n")
    quiet = max(SIM_PACING.identical_seconds, SIM_PACING.burst_seconds, SIM_PACING.window_seconds)
    wait_until(lambda: time.monotonic() - sim.history_requests[-1].when > quiet, what="quiet pacing windows")
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 4 and all(line.startswith("  ") and ": backfilled, " in line for line in out[:3])
    assert out[3].startswith("3 gaps backfilled, 0 partly, 0 unfillable; ")
    assert main(args) == 0  # nothing left
    assert capsys.readouterr().out == ("0 gaps backfilled, 0 partly, 0 unfillable; 0 ticks added (0 already held at "
                                       "the edges); 0 requests (0 pacing violations)\n")


def test_an_unreachable_gateway_is_one_line(recorded, tmp_path, capsys, caplog):
    sim, root = recorded
    shutil.copytree(root, tmp_path / "data")
    with GatewaySimulator() as probe:
        port = probe.port  # closed once the block ends: nothing listens there
    assert main(["backfill", "--data-root", str(tmp_path / "data"), "--ib-port", str(port), "--no-progress"]) == 2
    refused = (f"cannot connect to the gateway at 127.0.0.1:{port} as client id 117 for historical data; start TWS / "
               "IB Gateway with the API enabled, check IBSTREAM_IB_HOST / --ib-port, or set "
               "IBSTREAM_BACKFILL_CLIENT_ID to a free client id")
    assert capsys.readouterr().err == f"ibstream backfill: {refused}\n"
    settings = Settings(data_root=tmp_path / "data", ib_port=port, ib_connect_timeout=timedelta(seconds=3))
    with Store(settings) as store:  # the recording process's schedule: one line when it starts failing
        backfiller = Backfiller(store, settings)
        assert backfiller.run_scheduled() is None and backfiller.run_scheduled() is None
    assert [r.getMessage() for r in caplog.records if r.name == "ibstream.recorder.backfill"] == [
        f"backfill cannot run: {refused}; it tries again every 10 min"]


@pytest.mark.parametrize("first, last, closes, spans", [
    (100, 200, [], [(100, 200)]),
    (100, 200, [150 * US_PER_SECOND], [(100, 149), (150, 200)]),
    (100, 200, [150 * US_PER_SECOND + 1, 99 * US_PER_SECOND, 201 * US_PER_SECOND], [(100, 150), (151, 200)]),
    (100, 100, [100 * US_PER_SECOND], [(100, 100)]),
])
def test_requests_are_cut_at_session_closes(first, last, closes, spans):
    assert session_spans(first, last, closes) == spans
