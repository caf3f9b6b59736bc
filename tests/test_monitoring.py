"""Monitoring on real servers: /metrics scraped over HTTP while the gateway simulator feeds the real
ibapi client, /health failing for a silenced stream, access rules (tokens, TLS, binding), bad
settings, and the Grafana dashboard's queries against a real scrape."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
import ssl
import time
from datetime import date, datetime, timedelta, timezone

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from ibstream.cli import main
from ibstream.core.errors import ServerUnavailableError
from ibstream.core.times import US_PER_SECOND, now_us
from ibstream.flight_server.auth import token_line
from ibstream.monitoring import Monitor, MonitoringServer
from ibstream.settings import ContractSpec, Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.market import SIM_AAPL, SimContract
from ibstream.storage import Store
from ibstream.storage.index import ContractDetails
from tests.flight_server.test_access import _cert, _key, _pem_key
from tests.helpers import EVERYTHING, ROOT, ticks, utc, wait_until
from tests.recorder.harness import STREAMS, TODAY, Recording, ib_settings

DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
READER = "monitoring-reader-token-0123456789"


class AlwaysOpen(SimContract):
    """A contract that trades around the clock (IB reports each day 00:00-24:00 UTC), so its session is open
    whenever the test runs."""

    def hours(self, today: date, days: int = 7) -> tuple[str, str]:
        spans = ";".join(f"{day:%Y%m%d}:0000-{day + timedelta(days=1):%Y%m%d}:0000"
                         for day in (today + timedelta(days=i) for i in range(-1, days)))
        return spans, spans


ROUND_THE_CLOCK = AlwaysOpen(**{f.name: getattr(SIM_AAPL, f.name) for f in dataclasses.fields(SIM_AAPL)}
                             | {"sec_type": "CASH", "exchange": "IDEALPRO", "primary_exchange": "", "time_zone": "UTC"})
CID = ROUND_THE_CLOCK.con_id


def scrape(url: str, **kwargs) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    response = httpx.get(f"{url}/metrics", **kwargs)
    assert response.status_code == 200, response.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def stream(contract_id: int, tick_type: str) -> tuple:
    return tuple(sorted({"contract_id": str(contract_id), "tick_type": tick_type}.items()))


def total(samples: dict, name: str) -> float:
    return sum(value for (sample, _), value in samples.items() if sample == name)


@pytest.fixture
def recording(tmp_path, gateway):
    running = Recording(ib_settings(tmp_path, gateway, monitoring_port=0), gateway)
    yield running
    running.close()


def test_metrics_scraped_from_the_endpoint_follow_the_ticks(recording):
    monitoring = recording.service.monitoring
    assert monitoring is not None and monitoring.port > 0
    url = monitoring.url
    wait_until(lambda: all(scrape(url).get(("ibstream_ticks_acknowledged_total", stream(c, t)), 0) > 0
                           for c, t in STREAMS), what="every stream's acknowledged counter above 0")
    first = scrape(url)
    recording.wait_for_ticks(500)
    wait_until(lambda: total(scrape(url), "ibstream_ticks_acknowledged_total")
               >= total(first, "ibstream_ticks_acknowledged_total") + 500, what="the counter to follow")
    assert total(scrape(url), "ibstream_flush_duration_seconds_count") > total(first, "ibstream_flush_duration_seconds_count")

    recording.settle()  # the market stops; every tick sent is acknowledged
    samples = scrape(url)
    for contract_id, tick_type in STREAMS:
        stored = recording.service.store.read(contract_id, tick_type, *EVERYTHING).num_rows
        labels = stream(contract_id, tick_type)
        assert samples[("ibstream_ticks_acknowledged_total", labels)] == stored > 0
        assert samples[("ibstream_ticks_received_total", labels)] == stored
        assert samples[("ibstream_ticks_dropped_total", labels)] == 0
        assert samples[("ibstream_ticks_held", labels)] == 0
        assert samples[("ibstream_stream_recording", labels)] == 1
        assert samples[("ibstream_segment_bytes", labels)] > 0
    assert total(samples, "ibstream_ticks_acknowledged_total") == recording.gateway.sent_count() - recording.sent_before
    assert samples[("ibstream_ib_connected", ())] == 1
    assert samples[("ibstream_ib_connections_total", ())] == recording.feed.connections >= 1
    assert samples[("ibstream_ib_market_data_farm_ok", ())] == 1
    assert samples[("ibstream_disk_free_bytes", ())] > 0
    # fsync=none in these settings: one write and one (zero) fsync observation per acknowledged batch
    assert samples[("ibstream_segment_write_duration_seconds_count", ())] > 0
    assert samples[("ibstream_segment_fsync_duration_seconds_count", ())] == \
        samples[("ibstream_segment_write_duration_seconds_count", ())]

    recording.client.ticks(*STREAMS[0], *TODAY)
    recording.client.ticks(*STREAMS[1], *TODAY)
    after = scrape(url)
    kind = (("kind", "ticks"),)
    assert after[("ibstream_queries_total", kind)] == 2
    assert after[("ibstream_query_errors_total", kind)] == 0
    wait_until(lambda: scrape(url).get(("ibstream_query_duration_seconds_count", kind)) == 2,
               what="both tick streams timed to their end")
    assert after[("ibstream_queries_total", (("kind", "flight_info"),))] == 2
    with pytest.raises(Exception):
        recording.client.ticks(999, "bid_ask", *TODAY)  # not stored: refused
    assert scrape(url)[("ibstream_query_errors_total", (("kind", "flight_info"),))] == 1
    assert after[("ibstream_live_subscribers", ())] == 0


def test_the_dashboard_queries_only_metrics_the_endpoint_serves(recording):
    dashboard = json.loads(DASHBOARD.read_text())
    assert any(v.get("type") == "datasource" and v.get("query") == "prometheus"
               for v in dashboard["templating"]["list"])
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 15
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]  # variables' queries
    used = {name for expr in exprs for name in re.findall(r"\bibstream_[a-z0-9_]+", expr)}

    recording.wait_for_ticks(100)
    recording.client.ticks(*STREAMS[0], *TODAY)  # a query, so the per-kind series exist
    text = httpx.get(f"{recording.service.monitoring.url}/metrics").text
    served = set()
    suffixes = {"histogram": ["_bucket", "_sum", "_count"]}  # a counter's TYPE line names it with _total
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):  # families with no samples too
        served |= {name + suffix for suffix in suffixes.get(kind, [""])}
    assert used <= served, f"the dashboard queries metrics no scrape has: {sorted(used - served)}"
    assert {"ibstream_ticks_acknowledged_total", "ibstream_segment_fsync_duration_seconds_bucket",
            "ibstream_ib_connected", "ibstream_cache_hit_ratio", "ibstream_query_duration_seconds_bucket",
            "ibstream_live_subscribers", "ibstream_slow_readers_dropped_total"} <= used


def test_health_fails_for_a_stream_the_gateway_silenced(tmp_path):
    with GatewaySimulator(contracts=(ROUND_THE_CLOCK,), speed=40, send_interval=0.005) as gateway:
        settings = ib_settings(tmp_path, gateway, monitoring_port=0, contracts=(ContractSpec(con_id=CID),),
                               health_silence_threshold=timedelta(seconds=1))
        running = Recording(settings, gateway)
        try:
            url = running.service.monitoring.url

            def health() -> httpx.Response:
                return httpx.get(f"{url}/health")

            running.wait_for_ticks(200)
            wait_until(lambda: health().status_code == 200, what="a healthy recording")
            body = health().json()
            assert body["status"] == "ok" and body["ib"]["connected"] is True
            assert {(s["contract_id"], s["tick_type"], s["state"], s["in_session"]) for s in body["streams"]} == \
                {(CID, "bid_ask", "ok", True), (CID, "last", "ok", True)}

            gateway.pause()  # connected, answering, no ticks: a feed left dead by a farm flap
            def silent_streams() -> set[str]:
                response = health()
                return {s["tick_type"] for s in response.json()["streams"] if s["state"] == "silent"} \
                    if response.status_code == 503 else set()

            wait_until(lambda: silent_streams() == {"bid_ask", "last"}, what="/health to fail for both streams")
            body = health().json()
            assert body["status"] == "failing"
            assert body["ib"]["connected"] is True  # the connection is fine; the streams are not
            silent = {s["tick_type"]: s for s in body["streams"] if s["state"] == "silent"}
            assert set(silent) == {"bid_ask", "last"}
            for tick_type, entry in silent.items():
                assert entry["last_tick_age_seconds"] > 1.0
                assert any(line.startswith(f"{CID}/{tick_type}: no tick for ") and "during its trading session" in line
                           for line in body["failing"]), body["failing"]
            samples = scrape(url)
            assert samples[("ibstream_healthy", ())] == 0
            assert samples[("ibstream_stream_silent", stream(CID, "bid_ask"))] == 1

            gateway.resume()
            wait_until(lambda: health().status_code == 200, what="/health to recover")
        finally:
            running.close()


def _details(hours: str) -> ContractDetails:
    return ContractDetails(
        contract_id=CID, symbol="AAPL", sec_type="CASH", exchange="IDEALPRO", primary_exchange="", currency="USD",
        local_symbol="AAPL", trading_class="", last_trade_date="", multiplier="", min_tick=0.01, long_name="",
        time_zone="UTC", trading_hours=hours, liquid_hours=hours, updated_at_us=now_us())


@pytest.mark.parametrize("open_now", [True, False])
def test_a_silent_stream_fails_health_only_inside_its_session(tmp_path, open_now):
    """The read-only server's view (`ibstream serve` beside a recorder): the stream's coverage is open,
    its last stored tick an hour old."""
    settings = Settings(data_root=tmp_path / "data", fsync="none", flight_port=0, monitoring_port=0,
                        health_silence_threshold=timedelta(minutes=5))
    today = datetime.now(timezone.utc).date()
    days = [today + timedelta(days=i) for i in range(-1, 7)]
    hours = ";".join(f"{d:%Y%m%d}:0000-{d + timedelta(days=1):%Y%m%d}:0000" if open_now else f"{d:%Y%m%d}:CLOSED"
                     for d in days)
    an_hour_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    with Store(settings) as writer:
        writer.append(CID, "bid_ask", ticks(an_hour_ago, 100))
        writer.index.upsert_contract(_details(hours))
        writer.index.coverage_transition(CID, "bid_ask", now_us() - 3_600 * US_PER_SECOND, "recorded", "subscribed")
        last = writer.read(CID, "bid_ask", *EVERYTHING).column("ts")[-1].value
    with Store(settings, read_only=True) as store:
        monitor = Monitor(settings, store)
        monitor.started_us -= 3_600 * US_PER_SECOND  # as if serving for an hour
        with MonitoringServer(monitor, settings) as server:
            response = httpx.get(f"{server.url}/health")
            body = response.json()
            (entry,) = body["streams"]
            assert (entry["contract_id"], entry["tick_type"]) == (CID, "bid_ask")
            assert entry["last_tick"] == datetime.fromtimestamp(last / US_PER_SECOND, timezone.utc).isoformat() \
                .replace("+00:00", "Z")
            if open_now:
                assert response.status_code == 503
                assert entry["state"] == "silent" and entry["in_session"] is True
                assert body["failing"] == [f"{CID}/bid_ask: no tick for {entry['last_tick_age_seconds'] / 60:.0f} min "
                                           "during its trading session (threshold 5 min)"]
            else:
                assert response.status_code == 200
                assert entry["state"] == "outside_session" and entry["in_session"] is False
                assert body["failing"] == []


def test_tokens_guard_the_endpoints(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(token_line("grafana", "read", READER) + "\n")
    settings = Settings(data_root=tmp_path / "data", fsync="none", monitoring_port=0, token_file=tokens)
    with Store(settings) as store, MonitoringServer(Monitor(settings, store), settings) as server:
        for path in ("/metrics", "/health"):
            refused = httpx.get(server.url + path)
            assert refused.status_code == 401 and "needs a token" in refused.json()["detail"]
            assert refused.headers["www-authenticate"] == "Bearer"
            wrong = httpx.get(server.url + path, headers={"Authorization": "Bearer not-a-token"})
            assert wrong.status_code == 401 and "not one this server knows" in wrong.json()["detail"]
            assert httpx.get(server.url + path, headers={"Authorization": f"Bearer {READER}"}).status_code == 200


def test_https_with_the_tls_settings(tmp_path):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    ca_key, server_key = _key(), _key()
    ca = _cert("monitoring test CA", ca_key, ca_key, None, ca=True)
    cert = _cert("localhost", server_key, ca_key, ca.subject, ca=False,
                 sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(_pem_key(server_key))
    settings = Settings(data_root=tmp_path / "data", fsync="none", monitoring_port=0,
                        tls_cert_file=tmp_path / "cert.pem", tls_key_file=tmp_path / "key.pem")
    with Store(settings) as store, MonitoringServer(Monitor(settings, store), settings) as server:
        assert server.url.startswith("https://127.0.0.1:")
        assert "ibstream_disk_free_bytes" in httpx.get(f"{server.url}/metrics", verify=ssl.create_default_context(cafile=tmp_path / "ca.pem")).text
        with pytest.raises(httpx.ConnectError):  # a certificate nobody vouched for
            httpx.get(f"{server.url}/metrics")
    (tmp_path / "bad.pem").write_text("not a certificate")
    broken = settings.model_copy(update={"tls_cert_file": tmp_path / "bad.pem"})
    with Store(settings) as store, pytest.raises(Exception, match="IBSTREAM_TLS_CERT_FILE"):
        MonitoringServer(Monitor(broken, store), broken)


def test_bad_monitoring_settings_are_refused_with_a_reason(tmp_path):
    with pytest.raises(ValidationError, match="monitoring_host 0.0.0.0 is not a loopback address"):
        Settings(monitoring_port=9100, monitoring_host="0.0.0.0")
    Settings(monitoring_port=9100, monitoring_host="0.0.0.0", allow_insecure=True)
    Settings(monitoring_host="0.0.0.0")  # monitoring off: the host does not matter
    with pytest.raises(ValidationError, match="longer than zero"):
        Settings(health_silence_threshold=timedelta(0))
    with pytest.raises(ValidationError, match="Flight server's port too"):
        Settings(monitoring_port=8815, flight_port=8815)


def test_the_cli_says_what_is_wrong_in_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    Store(Settings(data_root=data, fsync="none")).close()
    assert main(["serve", "--data-root", str(data), "--flight-port", "0", "--monitoring-port", "70000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ibstream serve: bad setting: IBSTREAM_MONITORING_PORT") and "\n" not in err

    monkeypatch.setenv("IBSTREAM_HEALTH_SILENCE_THRESHOLD", "PT0S")
    assert main(["serve", "--data-root", str(data), "--flight-port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "IBSTREAM_HEALTH_SILENCE_THRESHOLD: the health silence threshold must be longer than zero" in err
    monkeypatch.delenv("IBSTREAM_HEALTH_SILENCE_THRESHOLD")

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", "--data-root", str(data), "--flight-port", "0", "--monitoring-port", str(port)]) == 2
        assert time.monotonic() - started < 120  # it did not start serving
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"ibstream serve: the monitoring server cannot listen on 127.0.0.1:{port}") and "\n" not in err
    assert "--monitoring-port" in err


def test_a_port_in_use_is_refused_before_anything_records(tmp_path):
    settings = Settings(data_root=tmp_path / "data", fsync="none", monitoring_port=0)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        taken = settings.model_copy(update={"monitoring_port": busy.getsockname()[1]})
        with Store(settings) as store, pytest.raises(ServerUnavailableError, match="cannot listen on 127.0.0.1"):
            MonitoringServer(Monitor(taken, store), taken)


def test_a_serving_process_counts_queries_by_kind(served, store):
    """The read-only side: queries, errors and the cache from the Flight server a monitor watches."""
    store.append(711280073, "bid_ask", ticks(utc(2025, 1, 10, 14), 1_000))
    settings = Settings.of(store.settings).model_copy(update={"monitoring_port": 0})
    with MonitoringServer(Monitor(settings, store, server=served.server), settings) as server:
        served.client.ticks(711280073, "bid_ask", utc(2025, 1, 10, 14), utc(2025, 1, 10, 15))
        served.client.statistics(711280073)
        samples = scrape(server.url)
        assert samples[("ibstream_queries_total", (("kind", "ticks"),))] == 1
        assert samples[("ibstream_queries_total", (("kind", "statistics"),))] == 1
        assert samples[("ibstream_query_duration_seconds_count", (("kind", "statistics"),))] == 1
        assert samples[("ibstream_cache_hits_total", ())] == store.cache.hits
        assert samples[("ibstream_segment_bytes", stream(711280073, "bid_ask"))] > 0
        assert ("ibstream_ticks_acknowledged_total", stream(711280073, "bid_ask")) not in samples  # no recorder here
    warmed = getattr(store, "warmed", None)  # the server's warm-up thread reads the store: let it finish first
    if warmed is not None:
        warmed.wait(60)
