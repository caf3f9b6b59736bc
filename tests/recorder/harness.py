"""The IB recording harness: gateway simulator -> IBFeed -> Recorder -> Store -> Flight server."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import polars as pl

from ibstream.app import RecordingService
from ibstream.recorder.ib import IBFeed
from ibstream.settings import Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ
from tests.helpers import EVERYTHING, wait_until

MNQ, AAPL = SIM_MNQ.con_id, SIM_AAPL.con_id
TODAY = (datetime.now(UTC) - timedelta(days=1), datetime.now(UTC) + timedelta(days=1))  # within the span limit
STREAMS = [(MNQ, "bid_ask"), (MNQ, "last"), (AAPL, "bid_ask"), (AAPL, "last")]


def ib_settings(tmp_path, gateway: GatewaySimulator, **overrides) -> Settings:
    values = dict(
        data_root=tmp_path / "data", flight_port=0, fsync="none", ib_port=gateway.port,
        ib_heartbeat=timedelta(milliseconds=300), ib_reconnect_initial=timedelta(milliseconds=50),
        ib_resubscribe_pause=timedelta(0), ib_limit_retry=timedelta(milliseconds=300),
        ib_connect_timeout=timedelta(seconds=3),
    )
    return Settings(**(values | overrides))


class Recording:
    """Gateway simulator -> IBFeed -> Recorder -> Store -> Flight server, plus a client."""

    def __init__(self, settings: Settings, gateway: GatewaySimulator):
        from ibstream.clients import Client

        self.gateway = gateway
        self.feed = IBFeed(settings)
        self.service = RecordingService(settings, self.feed).__enter__()
        self.client = Client(self.service.location)
        self.sent_before = gateway.sent_count()  # sent to earlier recorders

    @property
    def acknowledged(self) -> int:
        return sum(self.service.recorder.acknowledged.values())

    def settle(self) -> None:
        """Stop the market and wait until every tick sent is acknowledged."""
        self.gateway.pause()
        time.sleep(0.05)
        wait_until(lambda: self.acknowledged == self.gateway.sent_count() - self.sent_before, what="all sent ticks acknowledged")

    def wait_for_ticks(self, count: int) -> None:
        start = self.acknowledged
        wait_until(lambda: self.acknowledged >= start + count, what=f"{count} more ticks")

    def status(self, contract_id: int, tick_type: str) -> str:
        return next(state for (name, tt), state in self.feed.status().items()
                    if name == f"conId {contract_id}" and tt == tick_type)

    def coverage(self, contract_id: int, tick_type: str) -> list[tuple[str, str]]:
        self.service.recorder.flush()
        table = self.service.store.coverage(contract_id, tick_type, *EVERYTHING)
        return list(zip(table.column("status").to_pylist(), table.column("reason").to_pylist()))

    def assert_served_equals_sent(self, streams=STREAMS) -> None:
        for contract_id, tick_type in streams:
            served = self.client.ticks(contract_id, tick_type, *TODAY)
            sent = self.gateway.sent(contract_id, tick_type)
            assert sent is not None and sent.num_rows > 0, f"nothing sent on {contract_id} {tick_type}"
            assert served.height == sent.num_rows, (contract_id, tick_type)
            assert served.drop("ts").equals(pl.from_arrow(sent).drop("ts")), (contract_id, tick_type)
            assert served["ts"].is_sorted()

    def close(self) -> None:
        self.client.close()
        self.service.__exit__(None, None, None)
