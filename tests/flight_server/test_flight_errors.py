"""Bad input gets the matching Flight error with a precise message; the server keeps serving."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import Served, ticks, utc

CID = MNQ.contract_id
GOOD = {"version": 1, "contract_id": CID, "tick_types": ["bid_ask"], "start": "2025-01-10T00:00:00Z",
        "end": "2025-01-11T00:00:00Z"}


@pytest.fixture
def raw(store: Store, served: Served) -> flight.FlightClient:
    store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14), 1_000))
    client = flight.connect(served.location)
    yield client
    client.close()


def info(client: flight.FlightClient, payload) -> flight.FlightInfo:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.get_flight_info(flight.FlightDescriptor.for_command(body))


def assert_good_query_still_works(client: flight.FlightClient) -> None:
    result = info(client, GOOD)
    assert client.do_get(result.endpoints[0].ticket).read_all().num_rows == 1_000


BAD_COMMANDS = [
    (b"{not json", pa.ArrowInvalid, "command is not valid JSON"),
    (b"[1, 2]", pa.ArrowInvalid, "command must be a JSON object; got list"),
    ({**GOOD, "granularity": "1m"}, pa.ArrowInvalid, "unknown field 'granularity'"),
    ({**GOOD, "version": 2}, pa.ArrowInvalid, "command version was 2; this server speaks version 1"),
    ({**GOOD, "tick_types": ["bidask"]}, pa.ArrowInvalid,
     "tick_type was 'bidask'; use any of bid_ask, last, all_last, mid_point"),
    ({**GOOD, "tick_types": []}, pa.ArrowInvalid, "tick_types"),
    ({k: v for k, v in GOOD.items() if k != "start"}, pa.ArrowInvalid,
     "give the range exactly one way: start (with an optional end), window (e.g. '24h'), session"),
    ({**GOOD, "start": "2025-01-10T00:00:00"}, pa.ArrowInvalid, "start was the naive datetime 2025-01-10T00:00:00"),
    ({**GOOD, "start": "yesterday"}, pa.ArrowInvalid, "start: Input should be a valid datetime"),
    ({**GOOD, "start": "2025-01-11T00:00:00Z", "end": "2025-01-10T00:00:00Z"}, pa.ArrowInvalid,
     "range is empty or inverted: start 2025-01-11T00:00:00+00:00 is not before end 2025-01-10T00:00:00+00:00"),
    ({**GOOD, "contract_id": 42}, pa.ArrowKeyError, "contract_id 42 is not stored"),
    ({**GOOD, "start": "2024-01-01T00:00:00Z"}, pa.ArrowInvalid, "request too large: range"),
]


@pytest.mark.parametrize("payload, error, message", BAD_COMMANDS)
def test_bad_command_gets_precise_error(raw, payload, error, message):
    with pytest.raises(error) as caught:
        info(raw, payload)
    assert message in str(caught.value)
    assert_good_query_still_works(raw)


def test_too_many_rows_is_refused(settings, tmp_path):
    limited = settings.model_copy(update={"max_query_rows": 500})
    with Store(limited) as store:
        store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14), 1_000))
        running = Served(store)
        try:
            with pytest.raises(pa.ArrowInvalid, match="request too large: about 1,000 ticks, over the limit of 500"):
                info(flight.connect(running.location), GOOD)
        finally:
            running.close()


@pytest.mark.parametrize(
    "ticket, message",
    [
        (b"garbage", "invalid ticket"),
        (json.dumps({"contract_id": CID, "tick_type": "bid_ask", "start_us": 5, "end_us": 1}).encode(),
         "ticket range is empty"),
        (json.dumps({"contract_id": CID, "tick_type": "nope", "start_us": 1, "end_us": 5}).encode(), "tick_type"),
    ],
)
def test_bad_ticket_gets_precise_error(raw, ticket, message):
    with pytest.raises(pa.ArrowInvalid, match=message):
        raw.do_get(flight.Ticket(ticket)).read_all()
    assert_good_query_still_works(raw)


def test_path_descriptor_is_refused(raw):
    with pytest.raises(pa.ArrowInvalid, match="descriptor must be a command"):
        raw.get_flight_info(flight.FlightDescriptor.for_path("ticks", "711280073"))
    assert_good_query_still_works(raw)


def test_client_raises_our_errors(client, store):
    from ibstream.core.errors import InvalidRequestError, NotFoundError, RequestTooLargeError

    store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14), 10))
    with pytest.raises(InvalidRequestError, match="naive datetime"):
        client.ticks(CID, "bid_ask", utc(2025, 1, 10).replace(tzinfo=None))
    with pytest.raises(NotFoundError, match="^contract_id 7 is not stored"):
        client.ticks(7, "bid_ask", utc(2025, 1, 10), utc(2025, 1, 11))
    with pytest.raises(RequestTooLargeError, match="^request too large"):
        client.ticks(CID, "bid_ask", utc(2020, 1, 10), utc(2025, 1, 11))
    assert client.ticks(CID, "bid_ask", utc(2025, 1, 10), utc(2025, 1, 11)).height == 10


def test_corrupt_archive_file_is_an_internal_error_and_serving_goes_on(store, raw):
    store.append(CID, "last", ticks(utc(2025, 1, 9, 14), 500, "last"))
    store.archive(now=utc(2025, 1, 10))
    (entry,) = store.index.archives(CID, "last", 0, 2**62)
    path = store.settings.archive_root / entry.file_path
    path.write_bytes(b"PAR1" + b"\0" * 64 + path.read_bytes()[-200:])
    command = {**GOOD, "tick_types": ["last"], "start": "2025-01-09T00:00:00Z"}
    with pytest.raises(flight.FlightInternalError, match=r"\[ibstream.damaged_data\] the archive file of 711280073/last "
                       r"hour 2025-01-09T14:00:00Z "
                       r"\(tick_type=last/.*\) cannot be read: .*ibstream verify"):
        raw.do_get(info(raw, command).endpoints[0].ticket).read_all()
    assert_good_query_still_works(raw)


def test_every_error_carries_its_code_for_clients_in_any_language(raw):
    with pytest.raises(pa.ArrowInvalid, match=r"^\[ibstream\.invalid_request\] invalid command: resolution: resolution was '2m'"):
        info(raw, {**GOOD, "resolution": "2m"})
    with pytest.raises(pa.ArrowKeyError, match=r"\[ibstream\.not_found\] contract_id 7 is not stored"):
        info(raw, {**GOOD, "contract_id": 7})
    with pytest.raises(pa.ArrowInvalid, match=r"\[ibstream\.request_too_large\] request too large"):
        info(raw, {**GOOD, "start": "2000-01-01T00:00:00Z"})


def test_the_client_raises_exactly_the_class_the_code_names(client):
    from ibstream.core.errors import CODES, from_wire, tagged

    for code, cls in CODES.items():
        back = from_wire(tagged(cls("what went wrong")))
        assert type(back) is cls and str(back) == "what went wrong", code
    assert from_wire("no tag here") is None
