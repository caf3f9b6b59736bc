"""The HTTP gateway on a real uvicorn server on loopback, read with real HTTP clients: JSON, CSV and Arrow
answers equal the Flight answers row for row; sessions; IB-Studies' SSE URLs and message types; a
reconnecting SSE client gets every tick exactly once; bad input gets one mapped 4xx; tokens."""

from __future__ import annotations

import io
import json
import random
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from urllib.parse import quote

import httpx
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pytest

from ibstream.core.times import from_us, iso, now_us
from ibstream.flight_server.auth import token_digest
from ibstream.flight_server.commands import action_body, command
from ibstream.http_gateway import HttpGateway, parse_duration
from ibstream.settings import Settings, TokenSpec
from ibstream.simulator.market import SIM_MNQ
from ibstream.storage import Store
from ibstream.storage.export import csv_schema
from ibstream.storage.synthetic import MNQ
from tests.helpers import Served, free_port, ticks, utc, wait_until

CID = MNQ.contract_id
T0 = utc(2025, 1, 10, 12, 10)
RANGE = {"start_time": "2025-01-10T12:00:00Z", "end_time": "2025-01-10T14:00:00Z"}


@dataclass
class Gateway:
    served: Served
    http: HttpGateway
    flight: flight.FlightClient = field(init=False)

    def __post_init__(self):
        self.flight = flight.connect(self.served.location)

    @property
    def url(self) -> str:
        return self.http.url

    def flight_table(self, *args, **kwargs) -> list[pa.Table]:
        info = self.flight.get_flight_info(flight.FlightDescriptor.for_command(command(*args, **kwargs)))
        return [self.flight.do_get(e.ticket).read_all() for e in info.endpoints]

    def close(self) -> None:
        self.flight.close()
        self.http.stop()
        self.served.close()


def start(store: Store, settings: Settings | None = None) -> Gateway:
    served = Served(store)
    return Gateway(served, HttpGateway(served.server.queries, settings or store.settings).start())


@pytest.fixture
def history(store):
    """Quotes and trades of 2025-01-10 12:10 to about 13:20: hour 12 archived, the rest buffered."""
    quotes = ticks(T0, 20_000, "bid_ask", seed=3, rate_scale=20_000 / 4200 / 17 / 1.2)
    trades = ticks(T0, 4_000, "last", seed=4, rate_scale=4_000 / 4200 / 1.7 / 1.2)
    for table in (quotes, trades):
        tick_type = table.schema.metadata[b"ibstream.tick_type"].decode()
        for offset in range(0, table.num_rows, 1_000):
            store.append(CID, tick_type, table.slice(offset, 1_000))
    store.archive(now=utc(2025, 1, 10, 13, 1))
    assert store.index.archived_until_of(CID, "bid_ask") == utc(2025, 1, 10, 13).timestamp() * 1e6
    assert quotes.column("ts")[-1].as_py() > utc(2025, 1, 10, 13, 5)
    gateway = start(store)
    yield gateway
    gateway.close()


def get(gateway: Gateway, path: str, **kwargs) -> httpx.Response:
    return httpx.get(f"{gateway.url}{path}", timeout=30, **kwargs)


# -- REST: JSON, CSV and Arrow against Flight ----------------------------------------------------------


@pytest.mark.parametrize("tick_type,resolution", [("bid_ask", None), ("last", None), ("last", "1m"),
                                                  ("bid_ask", "5s")])
def test_arrow_csv_and_json_answers_equal_flight_row_for_row(history, tick_type, resolution):
    params = {"tick_types": tick_type, **RANGE} | ({"resolution": resolution} if resolution else {})
    [expected] = history.flight_table(CID, tick_type, utc(2025, 1, 10, 12), utc(2025, 1, 10, 14),
                                      **({"resolution": resolution} if resolution else {}))
    assert expected.num_rows > 100

    arrow = get(history, f"/v2/historical/{CID}", params=params,
                headers={"Accept": "application/vnd.apache.arrow.stream"})
    assert arrow.status_code == 200 and arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert table.schema.equals(expected.schema, check_metadata=True)
    assert table.equals(expected)

    csv = get(history, f"/v2/historical/{CID}", params=params | {"format": "csv"})
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    read = pacsv.read_csv(io.BytesIO(csv.content), convert_options=pacsv.ConvertOptions(
        column_types=csv_schema(expected.schema), strings_can_be_null=False))
    assert read.column_names == expected.column_names and read.num_rows == expected.num_rows
    for name in expected.column_names:
        column = expected.column(name)
        if pa.types.is_timestamp(column.type):
            assert read.column(name).to_pylist() == [_iso(v) for v in column.to_pylist()]
        else:
            assert read.column(name).equals(column.cast(read.column(name).type)), name

    for fmt, accept in (("json", "application/json"), ("ndjson", "application/x-ndjson")):
        answer = get(history, f"/v2/historical/{CID}", params=params, headers={"Accept": accept})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith(accept)
        rows = answer.json() if fmt == "json" else [json.loads(line) for line in answer.text.splitlines()]
        assert len(rows) == expected.num_rows
        for row, reference in zip(rows, expected.to_pylist()):
            assert row.pop("contract_id") == CID and row.pop("tick_type") == tick_type
            assert row.keys() == reference.keys()
            for key, value in reference.items():
                assert _json_value(value) == row[key], (key, value, row[key])


def _iso(value) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _json_value(value):
    if isinstance(value, Decimal):
        return str(value)  # exact: the decimal's text, every scale digit
    if hasattr(value, "tzinfo") and hasattr(value, "hour"):
        return _iso(value)
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def test_several_tick_types_json_rows_name_theirs_and_csv_refuses_differing_columns(history):
    both = get(history, f"/v2/historical/{CID}", params={"tick_types": "bid_ask,last", **RANGE})
    assert both.status_code == 200
    rows = both.json()
    quotes, trades = history.flight_table(CID, ["bid_ask", "last"], utc(2025, 1, 10, 12), utc(2025, 1, 10, 14))
    assert [r["tick_type"] for r in rows] == ["bid_ask"] * quotes.num_rows + ["last"] * trades.num_rows
    refused = get(history, f"/v2/historical/{CID}", params={"tick_types": "bid_ask,last", "format": "csv", **RANGE})
    assert refused.status_code == 400 and "different columns" in refused.json()["error"]["message"]
    arrow = get(history, f"/v2/historical/{CID}", params={"tick_types": "last,all_last", "format": "arrow", **RANGE})
    assert arrow.status_code == 404 or arrow.status_code == 200  # all_last is not stored: an empty endpoint
    if arrow.status_code == 200:
        table = pa.ipc.open_stream(arrow.content).read_all()
        assert table.column_names[:2] == ["contract_id", "tick_type"]
        assert table.num_rows == trades.num_rows


def test_a_full_response_is_streamed_batch_by_batch(history):
    with httpx.stream("GET", f"{history.url}/v2/historical/{CID}", params={"tick_types": "bid_ask", **RANGE,
                                                                        "format": "arrow"}) as response:
        chunks = [len(chunk) for chunk in response.iter_raw()]
    assert response.headers.get("transfer-encoding") == "chunked"
    assert len(chunks) > 1


def test_sessions_current_and_previous_equal_the_flight_action(store):
    now = from_us(now_us())
    ticks_now = ticks(from_us(now_us() - 3_600_000_000), 100, "last", seed=1)
    store.append(CID, "last", ticks_now)
    store.index.upsert_contract(SIM_MNQ.details(now.date() - timedelta(days=2), days=10))
    gateway = start(store)
    try:
        for when in ("current", "previous", (now.date() - timedelta(days=1)).isoformat()):
            [result] = gateway.flight.do_action(flight.Action("sessions", action_body("sessions", contract_id=CID,
                                                                                     date=when)))
            expected = pa.ipc.open_stream(result.body).read_all()
            answer = get(gateway, f"/v2/sessions/{CID}/{when}", params={"format": "arrow"})
            assert answer.status_code == 200, answer.text
            assert pa.ipc.open_stream(answer.content).read_all().equals(expected)
            rows = get(gateway, f"/v2/sessions/{CID}/{when}").json()
            assert [r["kind"] for r in rows] == expected.column("kind").to_pylist()
            assert [r["open"] for r in rows] == [_iso(v) for v in expected.column("open").to_pylist()]
        assert get(gateway, f"/v2/sessions/{CID}/yesterday").status_code == 400
        assert get(gateway, "/v2/sessions/42/current").status_code == 404
        session = get(gateway, f"/v2/historical/{CID}", params={"tick_types": "last", "session": "extended",
                                                                "session_date": "current"})
        assert session.status_code == 200
        statistics = get(gateway, f"/v2/statistics/{CID}")
        [result] = gateway.flight.do_action(flight.Action("statistics", action_body("statistics", contract_id=CID)))
        assert statistics.status_code == 200
        assert len(statistics.json()) == pa.ipc.open_stream(result.body).read_all().num_rows  # filled by archival
        coverage = get(gateway, f"/v2/coverage/{CID}/last", params={"start_time": iso(now_us() - 86_400_000_000)})
        assert coverage.status_code == 200
        assert [s["tick_type"] for s in get(gateway, "/v2/streams").json()] == ["last"]
    finally:
        gateway.close()


# -- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,params,status,code", [
    (f"/v2/historical/{CID}", {"tick_types": "bid", **RANGE}, 400, "invalid_request"),
    (f"/v2/historical/{CID}", {**RANGE}, 400, "invalid_request"),
    (f"/v2/historical/{CID}", {"tick_types": "last", "start_time": "2025-01-10T12:00:00"}, 400, "invalid_request"),
    (f"/v2/historical/{CID}", {"tick_types": "last", "window": "1h", "start_time": "2025-01-10T12:00:00Z"}, 400,
     "invalid_request"),
    (f"/v2/historical/{CID}", {"tick_types": "last", "start_time": "2025-01-01T00:00:00Z",
                               "end_time": "2025-03-01T00:00:00Z"}, 400, "request_too_large"),
    (f"/v2/historical/{CID}", {"tick_types": "last", "window": "1h", "bogus": "1"}, 400, "invalid_request"),
    (f"/v2/historical/{CID}", {"tick_types": "last", "window": "1h", "format": "xml"}, 400, "invalid_request"),
    ("/v2/historical/abc", {"tick_types": "last", "window": "1h"}, 400, "invalid_request"),
    ("/v2/historical/0", {"tick_types": "last", "window": "1h"}, 400, "invalid_request"),
    ("/v2/historical/42", {"tick_types": "last", "window": "1h"}, 404, "not_found"),
    (f"/v2/stream/{CID}/bogus", {}, 400, "invalid_request"),
    (f"/v2/stream/{CID}/last", {"timeout": "-1"}, 400, "invalid_request"),
    (f"/v2/stream/{CID}/last", {"limit": "0"}, 400, "invalid_request"),
    (f"/v2/stream/{CID}/buffer", {"buffer_duration": "forever"}, 400, "invalid_request"),
    ("/v2/stream/42/last", {}, 404, "not_found"),
    ("/v2/nothing", {}, 404, "not_found"),
])
def test_bad_input_gets_the_mapped_status_and_one_message(history, path, params, status, code):
    answer = get(history, path, params=params)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body.keys() == {"error"} and body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and 0 < len(body["error"]["message"]) < 3_000


def test_not_acceptable_and_last_event_id_errors(history):
    answer = get(history, f"/v2/historical/{CID}", params={"tick_types": "last", **RANGE},
                 headers={"Accept": "image/png"})
    assert answer.status_code == 406 and answer.json()["error"]["code"] == "invalid_request"
    answer = get(history, f"/v2/stream/{CID}", params={"tick_types": "bid_ask,last"},
                 headers={"Last-Event-ID": "123:1"})
    assert answer.status_code == 400 and "naming each" in answer.json()["error"]["message"]


HOSTILE = ["", " ", "x" * 5_000, "\u0000", "💥", "-1", "0", "1e308", "nan", "inf", "2**63", "9" * 400, "1d", "-5m",
           "2025-13-40", "2025-01-10T14:30:00", "2025-01-10T14:30:00Z", "9999-12-31T23:59:59+23:59", "::", "1:2:3",
           "bid_ask,bid_ask", "bid_ask,,last", "BidAsk", "current", "previous", "regular", "1m", "1d", "true", "%00",
           "1736519400123456:1", "-1:0", "[]", "{}", "null"]
PARAMS = ["tick_types", "start_time", "end_time", "window", "session", "session_date", "resolution", "fill",
          "daily_session", "cursor", "format", "timeout", "limit", "buffer_duration", "last_event_id", "x"]
PATHS = [f"/v2/historical/{CID}", "/v2/historical/{}", f"/v2/sessions/{CID}/{{}}", f"/v2/stream/{CID}/{{}}",
         "/v2/stream/{}", f"/v2/coverage/{CID}/{{}}", "/v2/statistics/{}", f"/v2/stream/{CID}/buffer"]


def test_hostile_queries_get_4xx_and_the_server_keeps_serving(history):
    rng = random.Random(20261202)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=history.url, timeout=30) as client:
        for _ in range(400):
            path = rng.choice(PATHS).replace("{}", quote(rng.choice(HOSTILE), safe="") or "x")
            params = {rng.choice(PARAMS): rng.choice(HOSTILE) for _ in range(rng.randint(0, 4))}
            if "stream" in path:
                params["timeout"] = "0.1"
            header = "".join(c for c in rng.choice(HOSTILE) if " " <= c <= "~").strip() or "x"  # a legal header
            headers = {"Last-Event-ID": header} if rng.random() < 0.2 else {}
            with client.stream("GET", path, params=params, headers=headers) as answer:
                body = answer.read()
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            assert answer.status_code < 500, (path, params, body[:300])
            if answer.status_code >= 400:
                assert json.loads(body)["error"]["code"]
    assert sum(n for status, n in statuses.items() if status >= 400) > 250
    good = get(history, f"/v2/historical/{CID}", params={"tick_types": "last", **RANGE, "format": "arrow"})
    assert pa.ipc.open_stream(good.content).read_all().equals(
        history.flight_table(CID, "last", utc(2025, 1, 10, 12), utc(2025, 1, 10, 14))[0])


def test_tokens_are_required_when_configured(tmp_path):
    token = "http-gateway-reader-token-0123456789"
    settings = Settings(data_root=tmp_path / "data", flight_port=0, fsync="none",
                        tokens=(TokenSpec(name="reader", role="read", sha256=token_digest(token)),))
    with Store(settings) as store:
        store.append(CID, "last", ticks(T0, 100, "last"))
        served = Served(store)
        http = HttpGateway(served.server.queries, settings).start()
        try:
            url = f"{http.url}/v2/historical/{CID}"
            params = {"tick_types": "last", **RANGE}
            refused = httpx.get(url, params=params)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
            assert refused.headers["www-authenticate"] == "Bearer"
            wrong = httpx.get(url, params=params, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = httpx.get(url, params=params, headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200 and len(ok.json()) == 100
            assert httpx.get(f"{http.url}/health").status_code == 401
            assert httpx.get(f"{http.url}/health", headers={"Authorization": f"Bearer {token}"}).json()["status"] \
                == "healthy"
            assert httpx.get(f"{http.url}/docs").status_code == 200
        finally:
            http.stop()
            served.client.close()
            served.server.shutdown()
            served.thread.join()


# -- Server-Sent Events, read the way IB-Studies' stream_client reads them ---------------------------------


@dataclass
class Received:
    kind: str
    event_id: str | None
    message: dict


class StudiesClient:
    """Reads an SSE stream line by line as ib_studies/stream_client.py does: ``event: ``, ``id: `` and
    ``data: `` lines (each data line a whole v2 message), empty lines between events; it dispatches on the
    message's ``type`` and stops on ``complete`` with reason ``timeout`` or an ``error``."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.events: list[Received] = []
        self.last_id: str | None = None

    def run(self, path: str, params: dict | None = None, *, stop_after_ticks: int | None = None,
            headers: dict | None = None) -> list[Received]:
        got: list[Received] = []
        kind = event_id = None
        with httpx.Client(timeout=httpx.Timeout(connect=10, read=30, write=10, pool=10)) as client:
            with client.stream("GET", f"{self.base_url}{path}", params=params, headers=headers) as response:
                assert response.status_code == 200, response.read()
                assert response.headers["content-type"].startswith("text/event-stream")
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        message = json.loads(line[6:])
                        assert message["type"] == kind and {"type", "stream_id", "timestamp", "data"} <= message.keys()
                        got.append(Received(message["type"], event_id, message))
                        if message["type"] == "tick":
                            self.last_id = event_id
                        if message["type"] == "error" or (message["type"] == "complete"
                                                          and message["data"]["reason"] == "timeout"):
                            kind = event_id = None
                            if all_complete(got) or message["type"] == "error":
                                break
                        if stop_after_ticks is not None and sum(e.kind == "tick" for e in got) >= stop_after_ticks:
                            break
                        kind = event_id = None
        self.events += got
        return got


def all_complete(events: list[Received]) -> bool:
    streams = {e.message["stream_id"] for e in events if e.kind == "info"}
    return streams <= {e.message["stream_id"] for e in events if e.kind == "complete"}


def recent(count: int, tick_type: str = "last", seed: int = 0, seconds_ago: float = 600) -> pa.Table:
    table = ticks(from_us(now_us() - int(seconds_ago * 1e6)), count, tick_type, seed=seed, rate_scale=4)
    stamps = table.column("ts").cast(pa.int64()).to_numpy().copy()
    if count > 15:
        stamps[10:15] = stamps[10]  # five ticks in one microsecond: the cursor counts within it
    return table.set_column(0, "ts", pa.array(stamps).cast(table.schema.field("ts").type))


def recorder(store: Store, table: pa.Table, tick_type: str = "last", batch: int = 40, pause: float = 0.01):
    """Appends ``table`` as the recorder acknowledges ticks, on a thread."""

    def run():
        for offset in range(0, table.num_rows, batch):
            store.append(CID, tick_type, table.slice(offset, batch))
            time.sleep(pause)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def tick_stamps(events: list[Received]) -> list[str]:
    return [e.message["data"]["ts"] for e in events if e.kind == "tick"]


def test_ib_studies_single_stream_receives_ticks_as_they_are_recorded_then_times_out(store):
    store.append(CID, "last", recent(5, seed=9, seconds_ago=900).slice(0, 1))  # the contract is stored
    gateway = start(store)
    try:
        table = ticks(from_us(now_us() + 300_000), 400, "last", seed=2, rate_scale=4)  # all after the connect
        client = StudiesClient(gateway.url)
        thread = threading.Timer(0.5, lambda: recorder(store, table).join())
        thread.start()
        events = client.run(f"/v2/stream/{CID}/last", {"timeout": "3"})
        thread.join()
        kinds = [e.kind for e in events]
        assert kinds[0] == "info" and events[0].message["data"]["status"] == "subscribed"
        assert kinds[-1] == "complete" and events[-1].message["data"]["reason"] == "timeout"
        received = [e for e in events if e.kind == "tick"]
        assert len(received) == table.num_rows
        first = received[0].message
        assert first["stream_id"].startswith(f"{CID}_last_") and first["data"]["contract_id"] == CID
        assert first["data"]["tick_type"] == "last" and first["metadata"] == {"historical": False}
        assert {"price", "size", "exchange", "conditions", "timestamp", "unix_time"} <= first["data"].keys()
        assert [float(e.message["data"]["size"]) for e in received] == \
            [float(v) for v in table.column("size").to_pylist()]
        assert events[-1].message["data"]["total_ticks"] == table.num_rows
        assert received[-1].event_id == events[-1].message["data"]["last_event_id"]
        assert gateway.served.server.stats.queries.get("live", 0) >= 1
    finally:
        gateway.close()


@pytest.mark.parametrize("path,params", [
    ("/v2/stream/{cid}", {"tick_types": "bid_ask,last"}),
    ("/v2/stream/{cid}/live", {"tick_types": "bid_ask,last"}),
    ("/v2/stream/{cid}/live/last", {}),
    ("/v2/stream/{cid}/live/Last", {}),
    ("/v2/stream/{cid}/BidAsk", {}),
    ("/v2/stream/{cid}/buffer", {"tick_types": "bid_ask,last", "buffer_duration": "1h"}),
    ("/v2/stream/{cid}/buffer", {"tick_types": "last", "buffer_duration": "3600"}),
])
def test_ib_stream_url_shapes_work_unchanged(store, path, params):
    history = recent(300, seed=5, seconds_ago=1_200)
    quotes = recent(300, "bid_ask", seed=6, seconds_ago=1_200)
    store.append(CID, "last", history)
    store.append(CID, "bid_ask", quotes)
    gateway = start(store)
    try:
        events = StudiesClient(gateway.url).run(path.format(cid=CID), params | {"timeout": "1"})
        infos = [e for e in events if e.kind == "info" and e.message["data"]["status"] == "subscribed"]
        wanted = params.get("tick_types", path.rsplit("/", 1)[-1].replace("Last", "last").replace("BidAsk", "bid_ask"))
        assert sorted(e.message["data"]["tick_type"] for e in infos) == sorted(wanted.split(","))
        assert {e.message["data"]["reason"] for e in events if e.kind == "complete"} == {"timeout"}
        if "buffer" in path:  # stored history first, flagged, then live
            expected = (300 if "last" in wanted else 0) + (300 if "bid_ask" in wanted else 0)
            assert len(tick_stamps(events)) == expected
            assert all(e.message["metadata"]["historical"] for e in events if e.kind == "tick")
        else:
            assert not tick_stamps(events)  # live only: none of the stored ticks
    finally:
        gateway.close()


def test_a_reconnecting_client_gets_every_tick_exactly_once(store):
    quotes, trades = recent(1_500, "bid_ask", seed=7, seconds_ago=1_800), recent(1_200, "last", seed=8,
                                                                              seconds_ago=1_800)
    store.append(CID, "last", trades.slice(0, 200))
    store.append(CID, "bid_ask", quotes.slice(0, 200))
    gateway = start(store)
    try:
        threads = [recorder(store, trades.slice(200), "last"), recorder(store, quotes.slice(200), "bid_ask")]
        client = StudiesClient(gateway.url)
        path, params = f"/v2/stream/{CID}/buffer", {"tick_types": "bid_ask,last", "buffer_duration": "1h"}
        got = client.run(path, params, stop_after_ticks=450)
        for _ in range(4):  # drop the connection mid-stream, reconnect from the last id received
            assert client.last_id is not None and "bid_ask=" in client.last_id
            got += client.run(path, params, stop_after_ticks=500, headers={"Last-Event-ID": client.last_id})
        for thread in threads:
            thread.join()
        got += client.run(path, params | {"timeout": "1.5"}, headers={"Last-Event-ID": client.last_id})
        for tick_type, table in (("bid_ask", quotes), ("last", trades)):
            mine = [e.message["data"] for e in got if e.kind == "tick" and e.message["data"]["tick_type"] == tick_type]
            assert [d["ts"] for d in mine] == [_iso(v) for v in table.column("ts").to_pylist()], tick_type
            assert [Decimal(d["size" if tick_type == "last" else "bid_size"]) for d in mine] == \
                table.column("size" if tick_type == "last" else "bid_size").to_pylist()
        wait_until(lambda: gateway.served.server.stats.live_subscribers == 0, what="every slot given back")
    finally:
        gateway.close()


def test_last_event_id_of_one_stream_is_the_flight_cursor(store):
    table = recent(500, seed=11, seconds_ago=600)
    store.append(CID, "last", table)
    gateway = start(store)
    try:
        client = StudiesClient(gateway.url)
        client.run(f"/v2/stream/{CID}/buffer", {"tick_types": "last"}, stop_after_ticks=12)
        cursor = client.last_id
        assert cursor is not None and cursor.count(":") == 1  # 5 ticks share the 11th tick's time: n counts them
        assert cursor == f"{table.column('ts').cast(pa.int64())[11].as_py()}:2"
        rest = gateway.served.client.live(CID, "last", cursor=cursor)
        frames = []
        for frame in rest:
            frames.append(frame)
            if rest.caught_up:
                break
        rest.close()
        assert sum(f.height for f in frames) == table.num_rows - 12
        again = client.run(f"/v2/stream/{CID}/last", {"timeout": "1", "last_event_id": cursor})
        assert len(tick_stamps(again)) == table.num_rows - 12
    finally:
        gateway.close()


def test_a_slow_sse_reader_is_dropped_with_an_error_event(tmp_path):
    settings = Settings(data_root=tmp_path / "data", flight_port=0, fsync="none", live_queue_rows=2_000)
    with Store(settings) as store:
        store.append(CID, "bid_ask", recent(10, "bid_ask", seconds_ago=60))
        served = Served(store)
        http = HttpGateway(served.server.queries, settings).start()
        try:
            with httpx.Client(timeout=60) as client, client.stream(
                    "GET", f"{http.url}/v2/stream/{CID}/bid_ask") as response:
                lines = response.iter_lines()
                assert next(lines).startswith("event: info")
                start_us, deadline = now_us(), time.monotonic() + 60
                # the reader takes nothing meanwhile; floods go on until it is dropped (on a busy host its feed
                # may subscribe only after a first flood was appended: that one it reads as history)
                while served.server.stats.slow_readers_dropped == 0 and time.monotonic() < deadline:
                    flood = ticks(from_us(start_us), 20_000, "bid_ask", seed=3, rate_scale=50)
                    for offset in range(0, flood.num_rows, 1_000):
                        store.append(CID, "bid_ask", flood.slice(offset, 1_000))
                    start_us = flood.column("ts").cast(pa.int64())[-1].as_py() + 1
                wait_until(lambda: served.server.stats.slow_readers_dropped == 1, timeout=30,
                           what="the reader to be dropped")
                errors = [json.loads(line[6:]) for line in lines if line.startswith("data: ")
                          and '"type":"error"' in line]
            assert len(errors) == 1 and errors[0]["data"]["code"] == "SUBSCRIBER_TOO_SLOW"
            assert errors[0]["data"]["recoverable"] is True and errors[0]["data"]["details"]["last_event_id"]
            wait_until(lambda: served.server.stats.live_subscribers == 0, what="the slot given back")
        finally:
            http.stop()
            served.close()


def test_buffer_durations_are_ib_streams():
    assert parse_duration("1h") == 3_600_000_000 and parse_duration("2h30m") == 9_000_000_000
    assert parse_duration("90") == 90_000_000 and parse_duration("1w") == 604_800_000_000
    for bad in ("", "0", "h", "1x", "-1h", "400d"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_health_info_and_docs(history):
    assert get(history, "/health").json()["status"] == "healthy"
    info = get(history, "/v2/info").json()
    assert info["version"] == "2.0.0" and info["usage"]["single_stream"] == "/v2/stream/{contract_id}/{tick_type}"
    assert {s["tick_type"] for s in info["streams"]} == {"bid_ask", "last"}
    assert get(history, "/docs").status_code == 200
    paths = get(history, "/openapi.json").json()["paths"]
    assert {"/v2/historical/{contract_id}", "/v2/stream/{contract_id}/{tick_type}", "/v2/stream/{contract_id}/buffer",
            "/v2/sessions/{contract_id}/{when}"} <= paths.keys()
    stats = history.served.server.stats
    before = dict(stats.queries)
    get(history, f"/v2/historical/{CID}", params={"tick_types": "last", **RANGE})
    get(history, f"/v2/historical/{CID}", params={"tick_types": "last", **RANGE, "resolution": "1m"})
    assert stats.queries["ticks"] == before.get("ticks", 0) + 1 and stats.queries["bars"] == before.get("bars", 0) + 1


def test_the_gateway_refuses_a_port_in_use(store):
    gateway = start(store)
    try:
        with pytest.raises(Exception, match="cannot listen on .*--http-port"):
            HttpGateway(gateway.served.server.queries, store.settings.model_copy(update={"http_port": gateway.http.port}))
    finally:
        gateway.close()



# -- started by the CLI ------------------------------------------------------------------------------------




def _cli(*args: str):
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")}
    return subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", *args], cwd=ROOT,
                            env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(url: str, process) -> None:
    def up() -> bool:
        assert process.poll() is None, process.stderr.read()
        try:
            return httpx.get(url, timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(up, timeout=60, what=f"{url} to answer")


def test_record_serves_live_ticks_over_sse_and_serve_the_stored_ones(tmp_path):
    port = free_port()
    recording = _cli("record", "--synthetic", "--seconds", "8", "--data-root", str(tmp_path / "data"),
                     "--flight-port", "0", "--http-port", str(port))
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", recording)
        wait_until(lambda: any(s["ticks"] for s in httpx.get(f"http://127.0.0.1:{port}/v2/info").json()["streams"]),
                   timeout=30, what="ticks recorded")
        events = StudiesClient(f"http://127.0.0.1:{port}").run(f"/v2/stream/{CID}", {"tick_types": "bid_ask,last",
                                                                                      "timeout": "1.5"})
        start = events[0].message["data"]["stream_config"]["start"]  # "now" at the request: nothing before it
        stamps = [datetime.fromisoformat(t) for t in tick_stamps(events)]
        assert stamps and min(stamps) >= datetime.fromisoformat(start)
    finally:
        assert recording.wait(60) == 0, recording.stderr.read()
    port = free_port()
    serving = _cli("serve", "--data-root", str(tmp_path / "data"), "--flight-port", "0", "--http-port", str(port))
    try:
        _wait_for(f"http://127.0.0.1:{port}/health", serving)
        streams = httpx.get(f"http://127.0.0.1:{port}/v2/streams").json()
        assert {s["contract_id"] for s in streams} >= {CID}
        stored = httpx.get(f"http://127.0.0.1:{port}/v2/historical/{CID}", params={"tick_types": "last",
                                                                                  "window": "1h"}).json()
        assert len(stored) == next(s["ticks"] for s in streams if s["contract_id"] == CID and s["tick_type"] == "last")
    finally:
        serving.terminate()
        serving.wait(30)
