"""Shared test helpers: times, reference filters, synthetic ticks, a Flight server on loopback, waiting."""

from __future__ import annotations

import errno
import os
import random
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight

from ibstream.clients import Client
from ibstream.core.times import to_us
from ibstream.flight_server import FlightServer
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ, SyntheticContract, synthetic_ticks


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=UTC)


def between(table: pa.Table, start: datetime, end: datetime) -> pa.Table:
    """Reference filter: rows with start <= ts < end."""
    ts = table.column("ts")
    return table.filter(pc.and_(pc.greater_equal(ts, pa.scalar(start, ts.type)), pc.less(ts, pa.scalar(end, ts.type))))


def ticks(start: datetime, count: int, tick_type: str = "bid_ask", *, seed: int = 0, rate_scale: float = 1.0) -> pa.Table:
    return synthetic_ticks(MNQ, tick_type, to_us(start), count, seed=seed, rate_scale=rate_scale)


def market(contract: SyntheticContract, tick_type: str, start: datetime, end: datetime, per_second: float,
           *, seed: int = 0) -> pa.Table:
    """Synthetic ticks of ``contract`` at about ``per_second`` over [start, end)."""
    base = contract.quotes_per_second if tick_type in ("bid_ask", "mid_point") else contract.trades_per_second
    count = int((end - start).total_seconds() * per_second * 1.5) + 10
    table = synthetic_ticks(contract, tick_type, to_us(start), count, seed=seed, rate_scale=per_second / base)
    return between(table, start, end)


def append_in_batches(store: Store, table: pa.Table, batch: int = 997, contract_id: int = MNQ.contract_id) -> None:
    tick_type = table.schema.metadata[b"ibstream.tick_type"].decode()
    for offset in range(0, table.num_rows, batch):
        store.append(contract_id, tick_type, table.slice(offset, batch))


ROOT = Path(__file__).resolve().parents[1]  # the repository
EVERYTHING = (datetime(2000, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))


class Served:
    """A Flight server over a store, on a free loopback port, with a client."""

    def __init__(self, store: Store, port: int = 0):
        self.server = FlightServer(store, f"grpc://127.0.0.1:{port}")
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()
        self.location = f"grpc://127.0.0.1:{self.server.port}"
        self.client = Client(self.location)

    def close(self) -> None:
        self.client.close()
        self.server.shutdown()
        self.thread.join()


def wait_until(condition, timeout: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def free_port() -> int:
    """A loopback TCP port nothing listens on (yet), for a server another process starts.

    Taken below the kernel's ephemeral range (where port-0 servers of the other pytest-xdist worker
    land) and from this worker's own block, so no other test binds it before that process does."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    low = 20_000 + 2_000 * (worker % 6)
    for port in random.sample(range(low, low + 2_000), 2_000):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError(f"no free loopback port in {low}..{low + 1_999}")


def flight_answers(port: int) -> bool:
    """Whether a Flight server listens on loopback ``port`` (one that asks for a token counts)."""
    try:
        with flight.connect(f"grpc://127.0.0.1:{port}") as probe:
            list(probe.list_actions())
    except flight.FlightUnavailableError:
        return False
    except flight.FlightUnauthenticatedError:
        pass
    return True


def ibstream(*args: str, **env: str) -> subprocess.CompletedProcess:
    """The CLI as an operator runs it: a subprocess with only the ``IBSTREAM_*`` settings given here."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")} | env
    return subprocess.run([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", *args], cwd=ROOT,
                          env=environment, capture_output=True, text=True, timeout=120)


def fill(path: Path) -> None:
    """Write zeros to ``path`` until its filesystem is full."""
    with open(path, "wb", buffering=0) as handle:
        for size in (1 << 16, 1 << 10, 1):
            try:
                while True:
                    handle.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
