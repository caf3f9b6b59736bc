"""Stateful property test: the store against an in-memory model, through random appends,
archivals, restarts and range queries."""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ibstream.core.times import US_PER_HOUR, from_us, hour_floor
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ, synthetic_ticks
from tests.helpers import between

CID = MNQ.contract_id
T0 = 1_736_517_600_000_000  # 2025-01-10 14:00 UTC


class StoreMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ibstream-model-"))
        self.settings = Settings(data_root=self.root, rotation_interval=timedelta(minutes=10),
                                 archive_delay=timedelta(0), fsync="none")
        self.store = Store(self.settings)
        self.model: list[pa.Table] = []
        self.next_us = T0
        self.round = 0

    @rule(count=st.integers(1, 3_000), gap_s=st.integers(0, 3 * 3600), rate=st.sampled_from([0.05, 1.0, 20.0]))
    def append(self, count, gap_s, rate):
        table = synthetic_ticks(MNQ, "bid_ask", self.next_us + gap_s * 1_000_000, count, seed=self.round,
                                rate_scale=rate)
        self.round += 1
        self.store.append(CID, "bid_ask", table)
        self.model.append(table)
        self.next_us = table.column("ts").cast(pa.int64())[-1].as_py()

    @rule()
    def archive_closed_hours(self):
        self.store.archive(now=from_us(hour_floor(self.next_us)))

    @rule()
    def restart(self):
        self.store.close()
        self.store = Store(self.settings)

    @rule(a=st.integers(-US_PER_HOUR, 12 * US_PER_HOUR), length=st.integers(1, 6 * US_PER_HOUR))
    def query(self, a, length):
        start, end = from_us(T0 + a), from_us(T0 + a + length)
        expected = between(self._all(), start, end)
        assert self.store.read(CID, "bid_ask", start, end).equals(expected)

    @invariant()
    def everything_is_there_once(self):
        stored = self.store.read(CID, "bid_ask", from_us(0), from_us(T0 + 10**12))
        assert stored.equals(self._all())

    def _all(self) -> pa.Table:
        return pa.concat_tables(self.model) if self.model else synthetic_ticks(MNQ, "bid_ask", T0, 0)

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)


StoreMachine.TestCase.settings = hypothesis_settings(max_examples=40, stateful_step_count=20, deadline=None)
test_store_matches_model = StoreMachine.TestCase
