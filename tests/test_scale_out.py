"""Beyond one machine, end to end: a recorder's store publishes to a real S3-compatible server
(moto), two read servers (`ibstream serve --replica`, separate processes with their own folders)
serve what is published, and a coordinator beside the recorder sends the published hours of each
tick query to them through Flight endpoint locations. Every tick arrives exactly once, through
our client and through plain pyarrow.flight, also with a read server gone."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from ibstream.clients import Client
from ibstream.core.times import to_us
from ibstream.flight_server import FlightServer
from ibstream.flight_server.commands import command
from ibstream.settings import Settings, ShardSpec
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import ROOT, append_in_batches, flight_answers, free_port, ticks, utc, wait_until

CID = MNQ.contract_id
FIRST = utc(2025, 1, 10, 20)
EVERYTHING = (utc(2025, 1, 1), utc(2025, 2, 1))




def read_server(url: str, root, port: int) -> subprocess.Popen:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")}
    process = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve", "--replica",
                                "--archive-url", url, "--data-root", str(root), "--flight-port", str(port)],
                               cwd=ROOT, env=environment | {"IBSTREAM_WARM_RECENT": "PT0S"})
    wait_until(lambda: flight_answers(port), timeout=60, what="a read server to listen")
    return process


@pytest.fixture
def deployment(tmp_path, s3):
    """Published hours Jan 10 20:00-24:00; Jan 11 00:00-02:00 archived after the publication; the rest
    buffered. Two read servers and a coordinator naming them."""
    settings = Settings(data_root=tmp_path / "recorder", rotation_interval=timedelta(minutes=15),
                        archive_delay=timedelta(0), fsync="none", flight_port=0, archive_url=s3.url(direct=True),
                        warm_recent=timedelta(0))
    quotes = ticks(FIRST, 30_000, rate_scale=0.1)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 11, 0, 30))
        store.publish(now=utc(2025, 1, 11, 1))
        store.archive(now=utc(2025, 1, 11, 2, 30))  # archived, not yet published: stays on the coordinator
    ports = [free_port(), free_port()]
    servers = [read_server(s3.url(direct=True), tmp_path / f"reader{i}", port) for i, port in enumerate(ports)]
    locations = [f"grpc://127.0.0.1:{port}" for port in ports]
    coordinator_settings = settings.model_copy(update={"shards": (ShardSpec(locations=tuple(locations)),)})
    store = Store(coordinator_settings, read_only=True)
    coordinator = FlightServer(store, "grpc://127.0.0.1:0", settings=coordinator_settings)
    try:
        yield quotes, coordinator, servers, locations
    finally:
        coordinator.shutdown()
        store.close()
        for process in servers:
            process.kill()
            process.wait(30)


def test_a_coordinator_sends_published_hours_to_read_servers_and_keeps_the_rest(deployment):
    quotes, coordinator, _, locations = deployment
    address = f"grpc://127.0.0.1:{coordinator.port}"
    with flight.connect(address) as plain:
        info = plain.get_flight_info(flight.FlightDescriptor.for_command(command(CID, "bid_ask", *EVERYTHING)))
        assert [[loc.uri.decode() for loc in e.locations] for e in info.endpoints] == [locations, []]
        parts = []
        for endpoint in info.endpoints:  # plain pyarrow: the first location, or this connection
            if endpoint.locations:
                with flight.connect(endpoint.locations[0]) as other:
                    parts.append(other.do_get(endpoint.ticket).read_all())
            else:
                parts.append(plain.do_get(endpoint.ticket).read_all())
    published = to_us(utc(2025, 1, 11))
    assert to_us(parts[0]["ts"][-1].as_py()) < published <= to_us(parts[1]["ts"][0].as_py())
    assert pa.concat_tables(parts).to_pydict() == quotes.to_pydict()
    with Client(address) as client:
        assert client.tables(CID, "bid_ask", *EVERYTHING)["bid_ask"].to_pydict() == quotes.to_pydict()


def test_with_a_read_server_gone_the_client_reads_from_the_next_location(deployment):
    quotes, coordinator, servers, _ = deployment
    servers[0].kill()
    servers[0].wait(30)
    with Client(f"grpc://127.0.0.1:{coordinator.port}") as client:
        got = client.tables(CID, "bid_ask", *EVERYTHING)["bid_ask"]
    assert got.to_pydict() == quotes.to_pydict()
