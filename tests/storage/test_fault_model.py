"""Stateful property test of the durability promise: through random appends, refused and torn
writes, crashes mid-write, flipped bytes in segments and archive files, archival, restarts and
``ibstream verify``, every acknowledged tick is served exactly once and in order, or lies inside
a span the store reports as damaged."""

from __future__ import annotations

import errno
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from ibstream.core.errors import StorageUnavailableError
from ibstream.core.times import from_us, hour_floor
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import io_faults
from ibstream.storage.maintenance import verify
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import EOS, StreamKey, encode_batch, list_segments, stream_dir
from ibstream.storage.synthetic import MNQ, synthetic_ticks

CID = MNQ.contract_id
KEY = StreamKey(CID, TickType.BID_ASK)
T0 = 1_736_517_600_000_000  # 2025-01-10 14:00 UTC
TAPE = synthetic_ticks(MNQ, "bid_ask", T0, 40_000, seed=7, rate_scale=0.1)  # ~1 tick/s
FOREVER = (from_us(0), from_us(T0 + 10**12))


def rows(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(name).to_pylist() for name in table.column_names)))


class FaultMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ibstream-faults-"))
        self.settings = Settings(data_root=self.root, rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0),
                                 fsync="none", segment_max_bytes=40_000)
        self.store = Store(self.settings)
        self.next = 0  # position in TAPE of the next tick to append
        self.flipped = False

    # -- writes --------------------------------------------------------------------------------

    @rule(count=st.integers(1, 600))
    def append(self, count):
        piece = TAPE.slice(self.next, count)
        if piece.num_rows:
            self.store.append(CID, "bid_ask", piece)
            self.next += piece.num_rows

    @rule(count=st.integers(1, 600), point=st.sampled_from(["segment.write", "segment.fsync", "segment.create"]),
          partial=st.none() | st.integers(1, 3_000))
    def refused_write(self, count, point, partial):
        piece = TAPE.slice(self.next, count)
        if not piece.num_rows:
            return
        io_faults.arm(point, errno.ENOSPC, partial_bytes=partial, times=1)
        try:
            self.store.append(CID, "bid_ask", piece)
            self.next += piece.num_rows  # the fault was not reached (no new segment, say)
        except StorageUnavailableError as refused:
            self.next += refused.acknowledged  # only what was acknowledged is in the model
        finally:
            io_faults.disarm()

    @rule(cut=st.integers(1, 4_000))
    def crash_mid_write(self, cut):
        """A kill -9 during a write: the newest segment ends in part of a message nobody acknowledged."""
        self.store.close()
        paths = list_segments(stream_dir(self.settings.buffer_root, KEY))
        if paths:
            newest = paths[-1]
            data = newest.read_bytes()
            if data.endswith(EOS):
                data = data[: -len(EOS)]
            message = encode_batch(TAPE.slice(self.next, 50).to_batches()[0], TickType.BID_ASK)
            newest.write_bytes(data + message[: min(cut, len(message) - 1)])
        self.store = Store(self.settings)

    # -- damage --------------------------------------------------------------------------------

    @rule(which=st.integers(0, 10**6), at=st.floats(0, 1), length=st.integers(1, 64))
    def flip_segment_bytes(self, which, at, length):
        self.store.close()
        paths = sorted(self.settings.buffer_root.rglob("*.arrows"))
        if paths:
            self._flip(paths[which % len(paths)], at, length)
        self.store = Store(self.settings)

    @rule(which=st.integers(0, 10**6), at=st.floats(0, 1), length=st.integers(1, 64))
    def flip_archive_bytes_then_verify(self, which, at, length):
        paths = sorted(self.settings.archive_root.rglob("*.parquet"))
        if not paths:
            return
        self.store.close()
        self._flip(paths[which % len(paths)], at, length)
        verify(self.settings)
        self.store = Store(self.settings)

    def _flip(self, path: Path, at: float, length: int) -> None:
        data = bytearray(path.read_bytes())
        if not data:
            return
        start = min(int(at * len(data)), len(data) - 1)
        for i in range(start, min(start + length, len(data))):
            data[i] ^= 0xA5
        path.write_bytes(bytes(data))
        self.flipped = True

    # -- the rest of a recorder's life ---------------------------------------------------------

    @rule()
    def archive_closed_hours(self):
        if self.next < TAPE.num_rows:
            self.store.archive(now=from_us(hour_floor(TAPE.column("ts")[self.next].value)))

    @rule()
    def restart(self):
        self.store.close()
        self.store = Store(self.settings)

    # -- the promise ---------------------------------------------------------------------------

    @invariant()
    def every_acknowledged_tick_once_in_order_or_reported_damaged(self):
        acknowledged = rows(TAPE.slice(0, self.next))
        served = rows(self.store.read(CID, "bid_ask", *FOREVER))
        spans = [(d["start"], d["end"]) for d in self.store.coverage(CID, "bid_ask", *FOREVER).to_pylist()
                 if d["status"] == "damaged"]
        if not self.flipped:
            assert served == acknowledged and not spans
            return
        position = 0  # served must be acknowledged ticks, in order, with only damaged ones left out
        for tick in acknowledged:
            if position < len(served) and served[position] == tick:
                position += 1
            else:
                assert any(start <= tick[0] <= end for start, end in spans), f"tick at {tick[0]} lost unreported"
        assert position == len(served), "a tick was served that was never acknowledged, or out of order"

    def teardown(self):
        io_faults.disarm()
        self.store.close()
        shutil.rmtree(self.root, ignore_errors=True)


FaultMachine.TestCase.settings = hypothesis_settings(max_examples=30, stateful_step_count=25, deadline=None)
test_acknowledged_ticks_survive_every_fault = FaultMachine.TestCase
