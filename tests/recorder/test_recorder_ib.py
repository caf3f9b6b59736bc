"""The real ``ibapi`` client against the gateway simulator on loopback, served back over Flight.

Every test compares what the simulator wrote to the socket with what the Flight server
serves, field by field (all but ``ts``, the receive time only the recorder knows).
"""

from __future__ import annotations

import logging
import re
import time
from datetime import date, timedelta

import pytest
from ibapi.client import EClient
from ibapi.wrapper import EWrapper

from ibstream.app import RecordingService
from ibstream.recorder.ib import IBFeed
from ibstream.settings import ContractSpec, Settings
from ibstream.simulator.gateway import MALFORMED_FRAMES, GatewaySimulator
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ
from ibstream.storage.schemas import TickType
from tests.helpers import EVERYTHING, wait_until
from tests.recorder.harness import AAPL, MNQ, STREAMS, Recording, ib_settings


def test_every_tick_sent_over_the_wire_is_served_exactly(recording):
    recording.wait_for_ticks(1_000)
    recording.settle()
    recording.assert_served_equals_sent()
    assert recording.feed.connections == 1
    assert sorted(recording.gateway.subscriptions()) == sorted((c, TickType(t)) for c, t in STREAMS)
    for contract_id, tick_type in STREAMS:
        assert recording.coverage(contract_id, tick_type) == [("recorded", "subscribed")]


def test_all_last_and_mid_point_are_served_exactly_too(tmp_path, gateway):
    """The other two tick-by-tick types, through the recorder's one-pass decoder, field by field."""
    streams = [(MNQ, "all_last"), (MNQ, "mid_point")]
    contracts = (ContractSpec(con_id=MNQ, tick_types=("all_last", "mid_point")),)
    running = Recording(ib_settings(tmp_path, gateway, contracts=contracts), gateway)
    try:
        running.wait_for_ticks(300)
        running.settle()
        running.assert_served_equals_sent(streams)
        assert running.feed.malformed == 0
    finally:
        running.close()


def test_contract_details_are_recorded_with_hours_and_time_zone(recording):
    wait_until(lambda: len(recording.service.store.contracts()) == 2, what="contract details")
    details = {c.contract_id: c for c in recording.service.store.contracts()}
    assert (details[MNQ].symbol, details[MNQ].sec_type, details[MNQ].exchange) == ("MNQ", "FUT", "CME")
    assert details[MNQ].time_zone == "US/Central" and details[MNQ].last_trade_date == "20261218"
    assert details[AAPL].time_zone == "US/Eastern" and details[AAPL].primary_exchange == "NASDAQ"
    entry = re.compile(r"\d{8}:(CLOSED|\d{4}-\d{8}:\d{4})$")
    for c in details.values():
        assert all(entry.match(part) for part in c.trading_hours.split(";") + c.liquid_hours.split(";")), c


def test_simulated_hours_follow_the_exchange_calendars_thanksgiving_week():
    """XNYS: Thanksgiving closed, 13:00 early close the day after; CME Globex: 12:00 halts, Sunday open."""
    assert SIM_AAPL.hours(date(2026, 11, 25), days=6) == (
        "20261125:0400-20261125:2000;20261126:CLOSED;20261127:0400-20261127:1700;20261128:CLOSED;"
        "20261129:CLOSED;20261130:0400-20261130:2000",
        "20261125:0930-20261125:1600;20261126:CLOSED;20261127:0930-20261127:1300;20261128:CLOSED;"
        "20261129:CLOSED;20261130:0930-20261130:1600")
    assert SIM_MNQ.hours(date(2026, 11, 25), days=6) == (
        "20261124:1700-20261125:1600;20261125:1700-20261126:1200;20261126:1700-20261127:1200;20261128:CLOSED;"
        "20261129:1700-20261130:1600",
        "20261125:0830-20261125:1500;20261126:0830-20261126:1200;20261127:0830-20261127:1200;20261128:CLOSED;"
        "20261130:0830-20261130:1500")


def test_contract_given_by_symbol_is_resolved_to_its_con_id(tmp_path, gateway):
    specs = (ContractSpec(symbol="AAPL", sec_type="STK", exchange="SMART", tick_types=("last",)),
             ContractSpec(symbol="NOPE", sec_type="STK", tick_types=("last",)))
    running = Recording(ib_settings(tmp_path, gateway, contracts=specs), gateway)
    try:
        running.wait_for_ticks(100)
        running.settle()
        running.assert_served_equals_sent([(AAPL, "last")])
        assert running.feed.status()[("NOPE STK USD", "last")] == "no_security_definition"
    finally:
        running.close()


def test_forced_disconnect_reconnects_resubscribes_once_and_coverage_shows_the_gap(recording):
    recording.wait_for_ticks(300)
    recording.gateway.drop_connections()
    wait_until(lambda: recording.feed.connections == 2, what="reconnect")
    recording.wait_for_ticks(300)
    recording.settle()
    recording.assert_served_equals_sent()
    assert sorted(recording.gateway.subscriptions()) == sorted((c, TickType(t)) for c, t in STREAMS)
    for contract_id, tick_type in STREAMS:
        assert recording.coverage(contract_id, tick_type) == [
            ("recorded", "subscribed"), ("gap", "disconnected"), ("recorded", "subscribed")]
    table = recording.service.store.coverage(MNQ, "bid_ask", *EVERYTHING)
    starts, ends = table.column("start").to_pylist(), table.column("end").to_pylist()
    assert ends[0] == starts[1] and ends[1] == starts[2] and starts[1] < starts[2]


def test_a_stalled_gateway_is_detected_and_reconnected(recording, caplog):
    recording.wait_for_ticks(200)
    recording.gateway.stall(2.0)
    wait_until(lambda: recording.feed.connections == 2, what="reconnect after stall")
    recording.wait_for_ticks(200)
    recording.settle()
    recording.assert_served_equals_sent()
    assert ("gap", "gateway_silent") in recording.coverage(MNQ, "bid_ask")
    assert "sent nothing for" in caplog.text


def test_restart_with_the_gateway_down_backs_off_then_records(tmp_path):
    with GatewaySimulator(speed=40) as probe:
        port = probe.port
    settings = Settings(data_root=tmp_path / "data", flight_port=0, fsync="none", ib_port=port,
                        ib_reconnect_initial=timedelta(milliseconds=100), ib_resubscribe_pause=timedelta(0))
    feed = IBFeed(settings)
    with RecordingService(settings, feed) as service:
        time.sleep(0.5)  # a few refused attempts
        assert feed.connections == 0
        with GatewaySimulator(port=port, speed=40) as gateway:
            wait_until(lambda: sum(service.recorder.acknowledged.values()) > 100, what="ticks after start")
            assert feed.connections == 1
            table = service.store.coverage(MNQ, "last", *EVERYTHING)
            assert table.column("status").to_pylist()[:2] == ["gap", "recorded"]
            assert table.column("reason").to_pylist()[0] == "disconnected"
            gateway.pause()


# -- IB's status and error messages ---------------------------------------------------------------

def test_1100_then_1102_keeps_the_subscriptions(recording):
    recording.wait_for_ticks(200)
    before = recording.gateway.subscriptions()
    recording.gateway.connectivity_lost()
    wait_until(lambda: recording.status(MNQ, "bid_ask") == "ib_connectivity_lost", what="1100 handled")
    recording.gateway.connectivity_restored(data_lost=False)
    wait_until(lambda: recording.status(MNQ, "bid_ask") == "recording", what="1102 handled")
    recording.wait_for_ticks(200)
    recording.settle()
    recording.assert_served_equals_sent()
    assert recording.gateway.subscriptions() == before
    assert recording.coverage(MNQ, "bid_ask") == [
        ("recorded", "subscribed"), ("gap", "ib_connectivity_lost"), ("recorded", "subscribed")]


def test_1101_resubscribes_every_stream(recording):
    recording.wait_for_ticks(200)
    recording.gateway.connectivity_lost()
    recording.gateway.connectivity_restored(data_lost=True)
    wait_until(lambda: len(recording.gateway.subscriptions()) == 4, what="resubscription")
    recording.wait_for_ticks(200)
    recording.settle()
    recording.assert_served_equals_sent()
    assert recording.feed.connections == 1
    assert recording.coverage(AAPL, "last")[-2:] == [("gap", "ib_connectivity_lost"), ("recorded", "subscribed")]


def test_farm_flap_2103_2104_resubscribes_instead_of_staying_silent(recording):
    recording.wait_for_ticks(200)
    recording.gateway.farm_broken()
    wait_until(lambda: recording.status(MNQ, "last") == "market_data_farm_broken", what="2103 handled")
    recording.gateway.farm_restored()
    wait_until(lambda: recording.status(MNQ, "last") == "recording", what="2104 handled")
    recording.wait_for_ticks(300)  # only a resubscription brings ticks back after a flap
    recording.settle()
    recording.assert_served_equals_sent()
    assert sorted(recording.gateway.subscriptions()) == sorted((c, TickType(t)) for c, t in STREAMS)
    assert ("gap", "market_data_farm_broken") in recording.coverage(MNQ, "last")


def test_10190_marks_one_stream_keeps_the_others_and_retries(tmp_path, gateway):
    gateway.tick_by_tick_limit = 3
    running = Recording(ib_settings(tmp_path, gateway), gateway)
    try:
        wait_until(lambda: "tick_by_tick_limit" in running.feed.status().values(), what="10190")
        refused = [key for key, state in running.feed.status().items() if state == "tick_by_tick_limit"]
        assert len(refused) == 1 and list(running.feed.status().values()).count("recording") == 3
        gateway.tick_by_tick_limit = None
        wait_until(lambda: set(running.feed.status().values()) == {"recording"}, what="retry after 10190")
        running.wait_for_ticks(300)
        running.settle()
        running.assert_served_equals_sent()
    finally:
        running.close()


@pytest.mark.parametrize(("code", "state"), [(354, "no_market_data_permissions"), (200, "no_security_definition")])
def test_refused_contract_is_marked_and_the_others_keep_recording(tmp_path, gateway, code, state, caplog):
    gateway.refuse(AAPL, code)
    running = Recording(ib_settings(tmp_path, gateway), gateway)
    try:
        wait_until(lambda: running.status(AAPL, "bid_ask") == state, what=f"error {code}")
        running.wait_for_ticks(300)
        running.settle()
        running.assert_served_equals_sent([(MNQ, "bid_ask"), (MNQ, "last")])
        assert running.status(AAPL, "last") == state and running.status(MNQ, "last") == "recording"
        assert gateway.sent(AAPL, "bid_ask") is None
        assert f"cannot record conId {AAPL}" in caplog.text or f"IB {code} on conId {AAPL}" in caplog.text
        if code == 354:
            assert running.coverage(AAPL, "bid_ask")[-1] == ("gap", state)
    finally:
        running.close()


def test_326_client_id_in_use_moves_to_the_next_id(tmp_path, gateway):
    other = type("Other", (EWrapper, EClient), {"__init__": lambda self: EClient.__init__(self, self)})()
    other.connect("127.0.0.1", gateway.port, 17)  # takes the recorder's default client id
    try:
        wait_until(lambda: gateway.session_count() == 1, what="first client")
        time.sleep(0.1)
        running = Recording(ib_settings(tmp_path, gateway), gateway)
        try:
            wait_until(lambda: running.feed.connections == 1, what="connection as client 18")
            assert running.feed.client_id == 18
            running.wait_for_ticks(100)
        finally:
            running.close()
    finally:
        other.disconnect()


def test_informational_farm_messages_change_nothing(recording, caplog):
    recording.wait_for_ticks(100)
    caplog.set_level(logging.INFO, logger="ibstream.recorder.ib")
    for code in (2105, 2106, 2107, 2108):
        recording.gateway.send_error(code)
    recording.wait_for_ticks(200)
    recording.settle()
    recording.assert_served_equals_sent()
    assert "historical data only" in caplog.text and "IB 2108" in caplog.text
    assert set(recording.feed.status().values()) == {"recording"}


def test_malformed_frames_are_skipped_without_dropping_the_session(recording, caplog):
    recording.wait_for_ticks(200)
    for data in MALFORMED_FRAMES:
        recording.gateway.send_raw(data)
    recording.wait_for_ticks(300)
    recording.settle()
    recording.assert_served_equals_sent()
    assert recording.feed.connections == 1
    assert recording.feed.malformed >= 3
    assert "skipped a malformed message" in caplog.text


def test_clean_stop_closes_coverage_and_a_restart_reopens_it(tmp_path, gateway):
    settings = ib_settings(tmp_path, gateway)
    first = Recording(settings, gateway)
    first.wait_for_ticks(100)
    first.settle()
    first.close()
    wait_until(lambda: gateway.session_count() == 0, what="the gateway to see the first recorder go")
    gateway.resume()
    second = Recording(settings, gateway)
    try:
        second.wait_for_ticks(100)
        second.settle()
        second.assert_served_equals_sent()
        assert second.coverage(MNQ, "bid_ask") == [
            ("recorded", "subscribed"), ("gap", "recorder_stopped"), ("recorded", "subscribed")]
    finally:
        second.close()


def test_our_socket_reader_is_used_per_connection_and_ibapi_is_left_as_it_was(recording):
    import ibapi.client
    import ibapi.reader

    from ibstream.recorder.ib import _Reader

    recording.wait_for_ticks(10)
    assert type(recording.feed._session.reader) is _Reader
    assert ibapi.client.reader is ibapi.reader, "importing or connecting must not patch ibapi for other users"
