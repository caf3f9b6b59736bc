"""Sharding through Flight's own mechanism: a coordinator names read servers in its endpoints'
locations, our client and plain pyarrow follow them, and a client reads an endpoint from the next
location when a server is gone (before or during its stream). Read servers are ``ibstream serve``
processes on the coordinator's data root; the coordinator is the recording process's server."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from ibstream.clients import Client
from ibstream.clients.client import read_endpoint, read_endpoints
from ibstream.core.errors import InvalidRequestError, RequestTooLargeError, ServerUnavailableError
from ibstream.core.ticks import TickType
from ibstream.core.times import from_us, to_us
from ibstream.flight_server import FlightServer
from ibstream.flight_server.auth import token_digest
from ibstream.flight_server.commands import Ticket, command
from ibstream.flight_server.server import shard_pieces
from ibstream.settings import Settings, ShardSpec
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import ROOT, append_in_batches, between, flight_answers, free_port, ticks, utc, wait_until

CID = MNQ.contract_id
OTHER = 265598  # a contract with a shard rule of its own, which MNQ's endpoints must not use
START, END = utc(2025, 1, 10, 13), utc(2025, 1, 10, 17)  # the queries' range: every tick recorded
HORIZON = utc(2025, 1, 10, 16)  # hours 13, 14 and 15 archived; the ticks from 16:00 buffered
TOKEN = "shard-reader-token-0123456789"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Iterator[tuple[Store, pa.Table]]:
    """The recording process's store: ~600k quotes (~38 MB) 13:40-16:35 UTC, hours up to 16:00 archived."""
    settings = Settings(data_root=tmp_path_factory.mktemp("shards") / "data", rotation_interval=timedelta(minutes=5),
                        archive_delay=timedelta(0), flight_port=0, fsync="none")
    table = ticks(utc(2025, 1, 10, 13, 40), 600_000, rate_scale=6)
    with Store(settings) as store:
        append_in_batches(store, table, batch=5_000)
        store.archive(now=utc(2025, 1, 10, 16, 30))
        assert table.column("ts")[-1].as_py() > HORIZON  # a buffered tail the read servers may not serve
        assert store.shardable_until(CID, "bid_ask") == to_us(HORIZON)
        yield store, table


@pytest.fixture(scope="module")
def readers(recorded) -> Iterator[list[str]]:
    """Three read servers (``ibstream serve``) on the recorder's data root: their locations."""
    store, _ = recorded
    with read_server(store) as a, read_server(store) as b, read_server(store) as c:
        yield [a.location, b.location, c.location]


class ReadServer:
    def __init__(self, process: subprocess.Popen, port: int):
        self.process, self.location = process, f"grpc://127.0.0.1:{port}"

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@contextmanager
def read_server(store: Store, **env: str) -> Iterator[ReadServer]:
    """``ibstream serve`` in its own process, read-only on ``store``'s data root (``env``: IBSTREAM_* settings)."""
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")} | env
    process = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve", "--data-root",
                                str(store.settings.data_root), "--flight-port", str(port)], cwd=ROOT, env=environment)
    try:
        wait_until(lambda: flight_answers(port) or process.poll() is not None, what="the read server to listen")
        assert process.poll() is None, "the read server exited"
        yield ReadServer(process, port)
    finally:
        process.kill()
        process.wait()




@contextmanager
def coordinator(store: Store, *shards: ShardSpec, **settings) -> Iterator[str]:
    """The recording process's Flight server with ``shards`` (and other ``settings``): its location."""
    server = FlightServer(store, "grpc://127.0.0.1:0",
                          settings=Settings(**{**dict(store.settings), "shards": shards, **settings}))
    with server:
        yield f"grpc://127.0.0.1:{server.port}"


def descriptor(start: datetime = START, end: datetime = END, **query) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(command(CID, "bid_ask", start, end, **query))


def endpoints(location: str, **query) -> list[tuple[dict, list[str]]]:
    """Each endpoint of the query as (its ticket's JSON, its locations)."""
    with flight.connect(location) as plain:
        info = plain.get_flight_info(descriptor(**query))
    return [(json.loads(e.ticket.ticket), [loc.uri.decode() for loc in e.locations]) for e in info.endpoints]


def expected(table: pa.Table) -> pa.Table:
    return between(table, START, END)


def assert_exact(served: pa.Table, reference: pa.Table) -> None:
    assert served.num_rows == reference.num_rows
    assert served.equals(reference.cast(served.schema)), "served ticks differ from written ticks"


def us(when: datetime) -> int:
    return to_us(when)


def failovers(caplog) -> list[str]:
    """The client's failover lines."""
    return [r.getMessage() for r in caplog.records if r.name == "ibstream.clients.client"]


# -- the coordinator's plan ----------------------------------------------------------------------

def test_the_published_part_goes_to_the_read_servers_and_the_buffered_tail_stays(recorded, readers):
    store, table = recorded
    a, b, c = readers
    rules = (ShardSpec(locations=(a, b), end=utc(2025, 1, 10, 14, 20)),
             ShardSpec(locations=(b, c), start=utc(2025, 1, 10, 14)),
             ShardSpec(locations=(c,), contract_ids=(OTHER,)))
    with coordinator(store, *rules) as location:
        plan = endpoints(location)
        with Client(location) as client:
            served = client.tables(CID, "bid_ask", START, END)["bid_ask"]
    cuts = [START, utc(2025, 1, 10, 14), utc(2025, 1, 10, 14, 20), HORIZON, END]
    assert [(t["start_us"], t["end_us"]) for t, _ in plan] == [(us(x), us(y)) for x, y in zip(cuts, cuts[1:])]
    assert [places for _, places in plan] == [[a, b], [a, b, c], [b, c], []]
    assert all("index_seq" not in t and t["skip"] == 0 for t, _ in plan)  # nothing published: no index to name
    assert_exact(served, expected(table))
    assert_exact(served, store.read(CID, "bid_ask", START, END))


def test_plain_pyarrow_following_the_first_location_reads_exactly_the_same(recorded, readers):
    store, table = recorded
    with coordinator(store, ShardSpec(locations=(readers[0], readers[1]))) as location:
        own = flight.connect(location)
        info = own.get_flight_info(descriptor())
        parts = []
        for endpoint in info.endpoints:
            server = flight.connect(endpoint.locations[0].uri.decode()) if endpoint.locations else own
            parts.append(server.do_get(endpoint.ticket).read_all())
        own.close()
    assert [len(e.locations) for e in info.endpoints] == [2, 0]
    assert info.total_records >= table.num_rows  # the estimate of the whole range, as without shards
    assert_exact(pa.concat_tables(parts), expected(table))


def test_a_client_that_ignores_locations_is_served_everything_by_the_coordinator(recorded, readers):
    store, table = recorded
    with coordinator(store, ShardSpec(locations=(readers[0],))) as location, flight.connect(location) as own:
        info = own.get_flight_info(descriptor())
        served = pa.concat_tables([own.do_get(e.ticket).read_all() for e in info.endpoints])
    assert [len(e.locations) for e in info.endpoints] == [1, 0]
    assert_exact(served, expected(table))


def test_the_read_endpoints_helper_follows_locations(recorded, readers):
    store, table = recorded
    with coordinator(store, ShardSpec(locations=(readers[2],))) as location, flight.connect(location) as own:
        tables = read_endpoints(own.get_flight_info(descriptor()), own)
    assert len(tables) == 2
    assert_exact(pa.concat_tables(tables), expected(table))


def test_bars_and_live_streams_stay_on_the_coordinator(recorded, readers):
    store, _ = recorded
    with coordinator(store, ShardSpec(locations=(readers[0],))) as location:
        bars = endpoints(location, resolution="1m")
        live = endpoints(location, end=None, live=True)
    assert [places for _, places in bars] == [[]] and bars[0][0]["end_us"] == us(END)
    assert [places for _, places in live] == [[]] and live[0][0]["live"] is True


# -- failover ------------------------------------------------------------------------------------

def test_a_dead_first_location_fails_over_to_the_next(recorded, readers, caplog):
    store, table = recorded
    dead = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    with coordinator(store, ShardSpec(locations=(dead, readers[0]))) as location, Client(location) as client:
        with caplog.at_level(logging.WARNING, "ibstream.clients.client"):
            served = client.tables(CID, "bid_ask", START, END)["bid_ask"]
    assert_exact(served, expected(table))
    assert [line.split(" failed ")[0] for line in failovers(caplog)] == [f"reading an endpoint from {dead}"]
    assert failovers(caplog)[0].endswith(f"; trying {readers[0]}")


def test_a_read_server_killed_before_the_query_fails_over(recorded, readers):
    store, table = recorded
    with read_server(store) as doomed:
        with coordinator(store, ShardSpec(locations=(doomed.location, readers[1]))) as location:
            with Client(location) as client:
                first = client.tables(CID, "bid_ask", START, END)["bid_ask"]  # from the doomed server
                doomed.kill()
                second = client.tables(CID, "bid_ask", START, END)["bid_ask"]  # its cached connection is dead
    assert_exact(first, expected(table))
    assert_exact(second, expected(table))


class KilledAfterFirstBatch:
    """A pyarrow connection to ``server`` whose stream kills the server once its first batch has arrived."""

    def __init__(self, server: ReadServer):
        self.server, self.connection = server, flight.connect(server.location)
        self.batches_before_kill = 0

    def do_get(self, ticket: flight.Ticket) -> KilledAfterFirstBatch:
        self.reader = self.connection.do_get(ticket)
        return self

    def read_all(self) -> pa.Table:
        first = self.reader.read_chunk().data
        self.batches_before_kill = 1
        self.server.kill()
        rest = self.reader.read_all()  # ~30 MB: far more than gRPC and the sockets buffer, so this fails
        return pa.concat_tables([pa.Table.from_batches([first]), rest])


def test_a_read_server_killed_mid_stream_gives_neither_duplicates_nor_gaps(recorded, readers, caplog):
    store, table = recorded
    with read_server(store) as doomed, coordinator(store, ShardSpec(locations=(doomed.location, readers[0]))) \
            as location, flight.connect(location) as own:
        info = own.get_flight_info(descriptor())
        killing = KilledAfterFirstBatch(doomed)
        connections = {doomed.location: killing, readers[0]: flight.connect(readers[0])}
        with caplog.at_level(logging.WARNING, "ibstream.clients.client"):
            parts = [read_endpoint(endpoint, own, connections.__getitem__) for endpoint in info.endpoints]
        connections[readers[0]].close()
    assert killing.batches_before_kill == 1 and doomed.process.poll() is not None
    assert len(failovers(caplog)) == 1 and "Stream removed" in failovers(caplog)[0]
    assert_exact(pa.concat_tables(parts), expected(table))


def test_every_location_gone_raises_unavailable_naming_them(recorded):
    store, _ = recorded
    dead = [f"grpc://127.0.0.1:{free_port()}", f"grpc://127.0.0.1:{free_port()}"]
    with coordinator(store, ShardSpec(locations=tuple(dead))) as location, Client(location) as client:
        with pytest.raises(ServerUnavailableError) as raised:
            client.tables(CID, "bid_ask", START, END)
    assert str(raised.value).startswith(f"no location of the endpoint answered ({dead[0]}, {dead[1]}); the last: ")
    assert "is the server running and reachable?" in str(raised.value)


def test_a_refusal_by_a_read_server_is_raised_not_failed_over(recorded, readers, caplog):
    """The same limits on every server: a read server run with a lower row limit refuses the endpoint,
    and that answer (not a server gone) reaches the caller without trying the next location."""
    store, _ = recorded
    with read_server(store, IBSTREAM_MAX_QUERY_ROWS="1000") as strict:
        with coordinator(store, ShardSpec(locations=(strict.location, readers[0]))) as location:
            with Client(location) as client, caplog.at_level(logging.WARNING, "ibstream.clients.client"):
                with pytest.raises(RequestTooLargeError, match="over the limit of 1,000 .IBSTREAM_MAX_QUERY_ROWS."):
                    client.tables(CID, "bid_ask", START, END)
    assert failovers(caplog) == []


# -- tickets, settings, tokens -------------------------------------------------------------------

def test_a_ticket_naming_an_index_is_served_by_a_server_without_one(served, store):
    store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14), 1_000))
    plain = Ticket(contract_id=CID, tick_type=TickType.BID_ASK, start_us=us(START), end_us=us(END))
    with_index = Ticket(contract_id=CID, tick_type=TickType.BID_ASK, start_us=us(START), end_us=us(END), index_seq=7)
    assert json.loads(with_index.to_bytes())["index_seq"] == 7 and "index_seq" not in json.loads(plain.to_bytes())
    read = [served.client._flight.do_get(flight.Ticket(t.to_bytes())).read_all() for t in (plain, with_index)]
    assert read[0].num_rows == 1_000 and read[1].equals(read[0])


def test_a_ticket_with_a_negative_index_seq_is_refused():
    ticket = Ticket(contract_id=CID, tick_type=TickType.BID_ASK, start_us=1, end_us=2)
    raw = ticket.to_bytes()[:-1] + b',"index_seq":-1}'
    with pytest.raises(InvalidRequestError, match="invalid ticket: index_seq: Input should be greater than or equal "
                                                  "to 0 .got -1."):
        Ticket.parse(raw)


def test_a_shard_location_that_is_not_a_flight_uri_is_refused_by_the_settings(tmp_path):
    with pytest.raises(ValidationError, match="shard location '10.0.0.2:8815' is not a Flight URI; use "
                                              "grpc://host:port or grpc\\+tls://host:port"):
        Settings(data_root=tmp_path, shards=[{"locations": ["10.0.0.2:8815"]}])


def test_the_clients_token_reaches_the_read_servers(recorded):
    store, table = recorded
    tokens = json.dumps([{"name": "reader", "role": "read", "sha256": token_digest(TOKEN)}])
    with read_server(store, IBSTREAM_TOKENS=tokens) as reader:
        with pytest.raises(flight.FlightUnauthenticatedError), flight.connect(reader.location) as anonymous:
            anonymous.do_get(flight.Ticket(Ticket(contract_id=CID, tick_type=TickType.BID_ASK, start_us=us(START),
                                                  end_us=us(HORIZON)).to_bytes())).read_all()
        with coordinator(store, ShardSpec(locations=(reader.location,)), tokens=json.loads(tokens)) as location:
            assert [places for _, places in endpoints_with_token(location)] == [[reader.location], []]
            with Client(location, token=TOKEN) as client:
                served = client.tables(CID, "bid_ask", START, END)["bid_ask"]
    assert_exact(served, expected(table))


def endpoints_with_token(location: str) -> list[tuple[dict, list[str]]]:
    headers = [(b"authorization", f"Bearer {TOKEN}".encode())]
    with flight.connect(location) as plain:
        info = plain.get_flight_info(descriptor(), flight.FlightCallOptions(headers=headers))
    return [(json.loads(e.ticket.ticket), [loc.uri.decode() for loc in e.locations]) for e in info.endpoints]


# -- the split, as a pure function ---------------------------------------------------------------

PLACES = ("grpc://a:1", "grpc://b:1", "grpc://c:1")
maybe_time = st.none() | st.integers(0, 100)


@st.composite
def rules(draw) -> ShardSpec:
    start, end = draw(maybe_time), draw(maybe_time)
    if start is not None and end is not None and end <= start:
        start, end = end, start + 1
    return ShardSpec(locations=tuple(draw(st.lists(st.sampled_from(PLACES), min_size=1, max_size=3))),
                     contract_ids=draw(st.none() | st.just((1,)) | st.just((2,)) | st.just((1, 2))),
                     start=None if start is None else from_us(start), end=None if end is None else from_us(end))


def reference(t: int, horizon: int | None, shards: list[ShardSpec]) -> tuple[str, ...]:
    """Where the tick at ``t`` (µs) of contract 1 is read from, by the rule's words."""
    if horizon is None or t >= horizon:
        return ()
    covering = [rule for rule in shards if (rule.contract_ids is None or 1 in rule.contract_ids)
                and (rule.start is None or to_us(rule.start) <= t) and (rule.end is None or t < to_us(rule.end))]
    return tuple(dict.fromkeys(place for rule in covering for place in rule.locations))


@given(start=st.integers(0, 99), length=st.integers(1, 100), skip=st.integers(0, 3), horizon=maybe_time,
       shards=st.lists(rules(), max_size=4), seq=st.none() | st.integers(0, 2**63 - 1))
@example(start=10, length=50, skip=2, horizon=40, seq=3,
         shards=[ShardSpec(locations=("grpc://a:1", "grpc://b:1"), end=from_us(30)),
                 ShardSpec(locations=("grpc://b:1", "grpc://c:1"), start=from_us(20))])
@example(start=10, length=50, skip=0, horizon=None, seq=None, shards=[ShardSpec(locations=("grpc://a:1",))])
def test_pieces_cover_the_range_exactly_and_say_where_each_tick_is_read(start, length, skip, horizon, shards, seq):
    ticket = Ticket(contract_id=1, tick_type=TickType.BID_ASK, start_us=start, end_us=start + length, skip=skip)
    pieces = shard_pieces(ticket, horizon, shards, seq)
    bounds = [(piece.start_us, piece.end_us) for piece, _ in pieces]
    assert bounds[0][0] == ticket.start_us and bounds[-1][1] == ticket.end_us
    assert all(end == next_start for (_, end), (next_start, _) in zip(bounds, bounds[1:]))  # contiguous, in order
    assert all(start < end for start, end in bounds)
    assert [piece.skip for piece, _ in pieces] == [skip] + [0] * (len(pieces) - 1)
    assert all(piece.index_seq == (seq if places else None) for piece, places in pieces)
    assert all(a[1] != b[1] for a, b in zip(pieces, pieces[1:]))  # neighbours alike are one piece
    for piece, places in pieces:
        assert piece.model_copy(update={"start_us": start, "end_us": start + length, "skip": skip,
                                        "index_seq": None}) == ticket  # nothing else changes
        assert all(reference(t, horizon, shards) == places for t in range(piece.start_us, piece.end_us))
