"""A query repeated over closed hours is answered from its first plan, until the data under it changes.

The server keeps the FlightInfo of a pinned query (explicit start and end, contracts by id) whose
every range is archived, and the tickets it issued need no second check at do_get. A backfill (or
retention, compaction, a new index: whatever clears the result cache) makes it plan afresh; a ticket
it did not issue is checked as before; a query that moves with now is never kept. A server beside the
recorder (its own read-only store, as `ibstream serve` runs) sees the recorder's backfill at its next query.
"""

from __future__ import annotations

from datetime import timedelta

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from ibstream.core.times import to_us
from ibstream.flight_server.commands import Ticket, command
from ibstream.storage import Store
from tests.helpers import Served, between, utc
from tests.storage.test_backfill import CID, FIRST, from_ib, merged, outside, record, scenario, settings_at

CLOSED = (FIRST, utc(2025, 1, 11, 3))  # every hour of it archived (the last tick is at about 02:40)


def read(plain: flight.FlightClient, info: flight.FlightInfo) -> pa.Table:
    return pa.concat_tables([plain.do_get(e.ticket).read_all() for e in info.endpoints]).replace_schema_metadata(None)


@pytest.fixture
def recorded(tmp_path):
    market, g0, g1 = scenario(utc(2025, 1, 10, 23, 20), utc(2025, 1, 10, 23, 40))
    settings = settings_at(tmp_path / "data", max_query_span=timedelta(days=3650))  # open ends reach 2025 from now
    record(settings, market, g0, g1)
    with Store(settings) as store:
        served = Served(store)
        with flight.connect(served.location) as plain:
            yield store, served.server, plain, market, g0, g1
        served.close()


def test_a_backfill_under_a_kept_plan_is_seen_by_the_next_query(recorded):
    store, server, plain, market, g0, g1 = recorded
    descriptor = flight.FlightDescriptor.for_command(command(CID, "bid_ask", *CLOSED))
    live = between(outside(market, g0, g1), *CLOSED).replace_schema_metadata(None)
    first = plain.get_flight_info(descriptor)
    assert server._planned.info(descriptor.command) is not None  # kept: closed and pinned
    again = plain.get_flight_info(descriptor)
    assert (first.total_records, again.total_records) == (live.num_rows, live.num_rows)
    assert [e.ticket for e in again.endpoints] == [e.ticket for e in first.endpoints]
    assert read(plain, again).equals(live)

    store.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
    assert server._planned.info(descriptor.command) is None  # the backfill cleared it
    after = plain.get_flight_info(descriptor)
    complete = between(merged(market, g0, g1), *CLOSED).replace_schema_metadata(None)
    assert after.total_records == complete.num_rows > live.num_rows
    assert read(plain, after).equals(complete)


def test_a_ticket_the_server_did_not_issue_is_still_checked(recorded):
    store, _, plain, market, g0, g1 = recorded
    descriptor = flight.FlightDescriptor.for_command(command(CID, "bid_ask", *CLOSED))
    issued = Ticket.parse(plain.get_flight_info(descriptor).endpoints[0].ticket.ticket)
    forged = issued.model_copy(update={"start_us": to_us(utc(1971, 1, 1))})  # decades: past the span limit
    with pytest.raises(pa.ArrowInvalid, match="spans more than 3650 days"):
        plain.do_get(flight.Ticket(forged.to_bytes())).read_all()
    elsewhere = issued.model_copy(update={"contract_id": 42})
    with pytest.raises(pa.ArrowKeyError, match="contract_id 42 is not stored"):
        plain.do_get(flight.Ticket(elsewhere.to_bytes())).read_all()
    assert read(plain, plain.get_flight_info(descriptor)).num_rows == between(outside(market, g0, g1), *CLOSED).num_rows


@pytest.mark.parametrize("query", [
    dict(start=CLOSED[0]),  # to now
    dict(window="7d"),
    dict(start=CLOSED[0], end=CLOSED[1] + timedelta(days=400)),  # reaches past what is archived
], ids=["open-end", "window", "past-the-archive"])
def test_a_query_that_moves_with_now_or_reaches_past_the_archive_is_not_kept(recorded, query):
    _, server, plain, *_ = recorded
    descriptor = flight.FlightDescriptor.for_command(command(CID, "bid_ask", **query))
    plain.get_flight_info(descriptor)
    assert server._planned.info(descriptor.command) is None


def test_a_server_beside_the_recorder_sees_its_backfill_at_the_next_query(tmp_path):
    market, g0, g1 = scenario(utc(2025, 1, 10, 23, 20), utc(2025, 1, 10, 23, 40))
    settings = settings_at(tmp_path / "data")
    record(settings, market, g0, g1)
    live = between(outside(market, g0, g1), *CLOSED).replace_schema_metadata(None)
    complete = between(merged(market, g0, g1), *CLOSED).replace_schema_metadata(None)
    with Store(settings) as recorder, Store(settings, read_only=True) as beside:
        served = Served(beside)
        try:
            ticks = flight.FlightDescriptor.for_command(command(CID, "bid_ask", *CLOSED))
            bars = dict(resolution="1m")
            with flight.connect(served.location) as plain:
                assert read(plain, plain.get_flight_info(ticks)).equals(live)
                assert read(plain, plain.get_flight_info(ticks)).equals(live)  # from the kept plan and the cache
                minutes = served.client.tables(CID, "bid_ask", *CLOSED, **bars)["bid_ask"]
                assert beside.cache.hits >= 1 and served.server._planned.info(ticks.command) is not None

                recorder.backfill(CID, "bid_ask", g0, g1, from_ib(market, g0, g1), status="backfilled")
                after = plain.get_flight_info(ticks)
                assert after.total_records == complete.num_rows
                assert read(plain, after).equals(complete)
                again = served.client.tables(CID, "bid_ask", *CLOSED, **bars)["bid_ask"]
                assert again.equals(recorder.bars(CID, "bid_ask", *map(to_us, CLOSED), "1m"))
                assert not again.equals(minutes)  # the gap's minutes are in them now
        finally:
            served.close()
