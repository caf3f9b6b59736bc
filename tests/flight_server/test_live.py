"""Live plus historical over Flight: exactly once across the seam, rotations, archival, a server
killed and restarted, and readers that stop reading."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from ibstream.core.errors import ServerBusyError, ServerUnavailableError
from ibstream.core.times import to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.live import Cursor
from ibstream.storage.schemas import schema_for
from ibstream.storage.synthetic import MNQ
from tests.helpers import Served, flight_answers, free_port, ticks, utc, wait_until

T0 = utc(2025, 1, 10, 12, 10)
ROOT = Path(__file__).resolve().parents[2]




def live_settings(root: Path, **overrides) -> Settings:
    return Settings(data_root=root / "data", rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0),
                    flight_port=0, fsync="none", **overrides)


def feed(store: Store, table: pa.Table, batch: int = 250, pause: float = 0.002, archive_at: int | None = None) -> None:
    """Append ``table`` as the recorder would, in small acknowledged batches; archive the closed
    hours once ``archive_at`` rows are in."""
    for offset in range(0, table.num_rows, batch):
        store.append(MNQ.contract_id, "last", table.slice(offset, batch))
        if archive_at is not None and offset <= archive_at < offset + batch:
            store.archive(now=utc(2025, 1, 10, 13, 1))
        time.sleep(pause)


def append_quotes(store: Store, quotes: pa.Table) -> None:
    for offset in range(0, quotes.num_rows, 50_000):
        store.append(MNQ.contract_id, "bid_ask", quotes.slice(offset, 50_000))


def raw_live_reader(client: flight.FlightClient, tick_type: str) -> flight.FlightStreamReader:
    """A live do_get with pyarrow alone, from the start of the test data's day."""
    command = {"version": 1, "contract_id": MNQ.contract_id, "tick_types": [tick_type],
               "start": "2025-01-10T00:00:00Z", "live": True}
    info = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(command).encode()))
    return client.do_get(info.endpoints[0].ticket)


def test_history_and_live_through_rotation_and_archival(tmp_path):
    everything = ticks(T0, 12_000, "last", seed=4, rate_scale=12_000 / 3600 / 1.5 / 1.2)  # ~70 min, past 13:00
    assert everything.column("ts")[-1].as_py() > utc(2025, 1, 10, 13, 5)
    history, later = everything.slice(0, 4_000), everything.slice(4_000)
    seen = []
    with Store(live_settings(tmp_path)) as store:
        feed(store, history, batch=1_000, pause=0)
        served = Served(store)
        try:
            live = served.client.history_and_live(MNQ.contract_id, "last", T0, on_update=seen.append)
            assert live.wait_caught_up(30)
            crossing = int(np.searchsorted(later.column("ts").cast(pa.int64()).to_numpy(),
                                           utc(2025, 1, 10, 13, 2).timestamp() * 1e6))
            feed(store, later, archive_at=crossing)  # hour 12 is archived while the stream runs
            wait_until(lambda: live.height == everything.num_rows, what="every tick")
            time.sleep(0.2)  # nothing more may come
            frame = live.frame
            live.stop()
        finally:
            served.close()
        assert store.index.archived_until_of(MNQ.contract_id, "last") == utc(2025, 1, 10, 13).timestamp() * 1e6
    assert live.error is None
    assert frame.to_arrow().equals(pa.Table.from_batches(everything.to_batches()).replace_schema_metadata(None)
                                   .cast(frame.to_arrow().schema))
    assert sum(piece.height for piece in seen) == everything.num_rows


def test_a_cursor_resumes_exactly_after_its_tick(tmp_path):
    table = ticks(T0, 3_000, "last", seed=5)
    ts = table.column("ts").cast(pa.int64()).to_numpy().copy()
    ts[1000:1010] = ts[1000]  # ten ticks in one microsecond: the cursor counts within it
    table = table.set_column(0, "ts", pa.array(ts).cast(table.schema.field("ts").type))
    with Store(live_settings(tmp_path)) as store:
        feed(store, table, batch=1_003, pause=0)
        served = Served(store)
        try:
            for position in (0, 999, 1_003, 1_005, 1_009, 2_999):
                cursor = Cursor(int(ts[position]), int(position - np.searchsorted(ts, ts[position]) + 1))
                stream = served.client.live(MNQ.contract_id, "last", cursor=str(cursor))
                frames = []
                for frame in stream:
                    frames.append(frame)
                    if stream.caught_up:
                        break
                stream.close()
                rest = pa.concat_tables([f.to_arrow() for f in frames]) if frames else None
                assert (rest.num_rows if rest is not None else 0) == 3_000 - position - 1, position
                if rest is not None and rest.num_rows:
                    assert rest.column("ts").cast(pa.int64()).to_numpy().tolist() == ts[position + 1:].tolist()
        finally:
            served.close()


@given(values=st.lists(st.integers(0, 6), min_size=1, max_size=60), cut=st.integers(0, 100),
       sizes=st.lists(st.integers(1, 9), min_size=1, max_size=12))
@hypothesis_settings(max_examples=200, deadline=None)
def test_cursor_arithmetic_matches_positions(values, cut, sizes):
    """After any prefix, ``Cursor.after`` names it and ``unseen`` of a read from its ts gives the rest,
    whatever the batch boundaries (a plain list is the reference)."""
    ts = np.sort(np.array(values, dtype=np.int64))
    table = pa.table({"ts": ts})
    cut = cut % len(ts)
    cursor = Cursor(-1)
    for batch in _batches(table.slice(0, cut + 1), sizes):
        cursor = cursor.after(batch)
    assert cursor == Cursor(int(ts[cut]), int(np.sum(ts[:cut + 1] == ts[cut])))
    read = table.filter(pa.compute.greater_equal(table.column("ts"), cursor.ts))
    rest = [v for b in cursor.unseen(_batches(read, sizes)) for v in b.column("ts").to_pylist()]
    assert rest == ts[cut + 1:].tolist()


def _batches(table: pa.Table, sizes: list[int]):
    offset, i = 0, 0
    while offset < table.num_rows:
        size = sizes[i % len(sizes)]
        yield table.slice(offset, size).combine_chunks().to_batches()[0] if table.slice(offset, size).num_rows \
            else None
        offset, i = offset + size, i + 1




def start_server(data_root: Path, port: int) -> subprocess.Popen:
    """``ibstream serve`` in its own process: a read-only store recorded into by this one."""
    env = {**os.environ, "IBSTREAM_LIVE_POLL_INTERVAL": "PT0.02S"}
    process = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve",
                                "--data-root", str(data_root), "--flight-port", str(port)], cwd=ROOT, env=env)
    wait_until(lambda: flight_answers(port), what="the server to listen")
    return process




def test_a_live_client_resumes_across_a_killed_server(tmp_path):
    everything = ticks(T0, 9_000, "last", seed=6)
    first, second, third = everything.slice(0, 3_000), everything.slice(3_000, 3_000), everything.slice(6_000)
    port = free_port()
    with Store(live_settings(tmp_path)) as store:
        feed(store, first, batch=1_000, pause=0)
        server = start_server(store.settings.data_root, port)
        try:
            from ibstream.clients import Client

            client = Client(f"grpc://127.0.0.1:{port}")
            live = client.history_and_live(MNQ.contract_id, "last", T0)
            assert live.wait_caught_up(30)
            feed(store, second)
            wait_until(lambda: live.height == 6_000, what="live ticks from the first server")
            server.send_signal(signal.SIGKILL)
            server.wait()
            feed(store, third)  # recorded while no server runs
            server = start_server(store.settings.data_root, port)
            wait_until(lambda: live.height == everything.num_rows, what="the rest after the restart")
            time.sleep(0.2)
            frame = live.frame
            live.stop()
            client.close()
        finally:
            server.kill()
            server.wait()
    assert live.stream.reconnects >= 1 and live.error is None
    assert frame.get_column("ts").to_list() == everything.column("ts").to_pylist()
    assert frame.drop("ts").to_arrow().equals(everything.drop(["ts"]).replace_schema_metadata(None)
                                              .cast(frame.drop("ts").to_arrow().schema))


def test_a_reader_that_stops_reading_stalls_nothing(tmp_path):
    """A live reader that never reads: the recorder's appends never wait for it, another reader
    gets every tick, and the stalled one is dropped with its cursor once it is too far behind.

    Its history (300k quotes, ~23 MB) is far more than gRPC buffers, so its server side is stuck
    sending history while the live ticks pile up in its bounded queue."""
    quotes = ticks(T0, 320_000, "bid_ask", seed=7, rate_scale=20)
    history, later = quotes.slice(0, 300_000), quotes.slice(300_000)
    with Store(live_settings(tmp_path, live_queue_rows=5_000)) as store:
        append_quotes(store, history)
        served = Served(store)
        try:
            stalled = raw_live_reader(served.client._flight, "bid_ask")  # opened, never read (yet)
            reading = served.client.history_and_live(MNQ.contract_id, "bid_ask", T0)
            assert reading.wait_caught_up(60)
            for offset in range(0, later.num_rows, 500):  # returns each time: nobody waits for the stalled reader
                store.append(MNQ.contract_id, "bid_ask", later.slice(offset, 500))
            wait_until(lambda: reading.height == quotes.num_rows, what="the reading client to get every tick")
            received = 0
            with pytest.raises(flight.FlightUnavailableError, match="fell more than 5,000 ticks behind the recorder"):
                while received <= quotes.num_rows:
                    received += stalled.read_chunk().data.num_rows
            assert received == history.num_rows  # its history, then the drop (it resumes from its cursor)
            reading.stop()
        finally:
            served.close()


def test_streams_past_the_limit_are_refused_as_busy(tmp_path):
    with Store(live_settings(tmp_path, max_streams=1)) as store:
        store.append(MNQ.contract_id, "last", ticks(T0, 100, "last"))
        served = Served(store)
        try:
            live = served.client.live(MNQ.contract_id, "last", T0)
            first = next(iter(live))
            assert first.height == 100
            with pytest.raises(ServerBusyError, match=r"^server busy: 1 streams are being served "
                                                      r"\(IBSTREAM_MAX_STREAMS\); retry shortly$"):
                served.client.ticks(MNQ.contract_id, "last", T0, T0 + timedelta(hours=1))  # the class, not the text
            raw = flight.connect(served.location)
            ticket = raw.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(
                {"version": 1, "contract_id": MNQ.contract_id, "tick_types": ["last"], "start": "2025-01-10T14:00:00Z",
                 "end": "2025-01-10T15:00:00Z"}).encode())).endpoints[0].ticket
            with pytest.raises(flight.FlightUnavailableError, match=r"\[ibstream\.server_busy\] server busy"):
                raw.do_get(ticket).read_all()  # what another language's client sees: the code in the message
            raw.close()
            live.close()
            wait_until(lambda: _ticks_served(served), what="the slot to be free again")
        finally:
            served.close()


def _ticks_served(served: Served) -> bool:
    try:
        return served.client.ticks(MNQ.contract_id, "last", T0, T0 + timedelta(hours=1)).height == 100
    except ServerUnavailableError:
        return False


def test_pyarrow_and_polars_read_a_live_stream_directly(tmp_path):
    """No ibstream client: pyarrow.flight reads batches and their cursors; polars takes the batches."""
    import polars as pl

    table = ticks(T0, 500, "last", seed=8)
    with Store(live_settings(tmp_path)) as store:
        store.append(MNQ.contract_id, "last", table)
        served = Served(store)
        try:
            command = json.dumps({"version": 1, "contract_id": MNQ.contract_id, "tick_types": ["last"],
                                  "start": "2025-01-10T12:00:00Z", "live": True}).encode()
            client = flight.connect(served.location)
            info = client.get_flight_info(flight.FlightDescriptor.for_command(command))
            reader = client.do_get(info.endpoints[0].ticket)
            frames, position = [], {}
            while not position.get("live"):
                chunk = reader.read_chunk()
                position = json.loads(chunk.app_metadata.to_pybytes())
                frames.append(pl.from_arrow(pa.Table.from_batches([chunk.data])))
            reader.cancel()
            assert pl.concat(frames).height == 500
            assert position["cursor"] == f"{table.column('ts').cast(pa.int64())[-1].as_py()}:1"
            assert schema_for("last").names == frames[0].columns
        finally:
            served.close()


def test_live_bars_close_as_they_close_and_mark_the_forming_one(tmp_path):
    """1-minute bars of a live stream, through a server restart: one row per bar in the end, equal
    to polars group_by_dynamic over every tick recorded. The bar being formed comes with
    ``forming`` true after each batch; these ticks are stamped in 2025, so once the stream is
    quiet its last bar's time has long passed and it is sent again as closed."""
    import polars as pl

    from tests.bar_reference import assert_bars_equal, reference_bars

    trades = ticks(T0, 6_000, "last", seed=12, rate_scale=3)
    with Store(live_settings(tmp_path)) as store:
        feed(store, trades.slice(0, 2_000), batch=1_000, pause=0)
        served = Served(store)
        try:
            updates = []
            bars = served.client.history_and_live(MNQ.contract_id, "last", T0, resolution="1m",
                                                  on_update=updates.append)
            assert bars.wait_caught_up(30)
            feed(store, trades.slice(2_000, 2_000), batch=100)
            first = served
            first.server.shutdown()  # the client rebuilds the last bar from its first tick
            first.thread.join()
            served = Served(store, port=int(first.location.rsplit(":", 1)[1]))
            feed(store, trades.slice(4_000), batch=100)
            last_bar = pl.from_arrow(trades).get_column("ts").dt.truncate("1m")[-1]
            wait_until(lambda: bars.height and bars.frame.get_column("ts")[-1] == last_bar
                       and bars.frame.get_column("trade_count").sum() == trades.num_rows
                       and not bars.frame.get_column("forming")[-1], what="every trade in a closed bar")
            frame = bars.frame
            bars.stop()
            first.client.close()
        finally:
            served.close()
    assert bars.stream.reconnects >= 1 and bars.error is None
    assert not any(frame.get_column("forming"))
    assert sum(update.get_column("forming").sum() for update in updates) >= 1  # forming rows came along the way (how
    # many depends on how the server coalesced the appends into batches)
    assert_bars_equal(frame.drop("forming"), reference_bars(pl.from_arrow(trades), "last", "1m"))


def test_the_bar_being_formed_now_is_marked_forming(tmp_path):
    from ibstream.core.times import now_us

    with Store(live_settings(tmp_path)) as store:
        stamped_now = ticks(T0, 50, "last", seed=13)
        stamp = pa.array([now_us()] * 50).cast(stamped_now.schema.field("ts").type)
        stamped_now = stamped_now.set_column(0, "ts", stamp)
        store.append(MNQ.contract_id, "last", stamped_now)
        served = Served(store)
        try:
            stream = served.client.live(MNQ.contract_id, "last", window="10m", resolution="1h")
            rows = next(frame for frame in stream if frame.height)  # at the seam: the bar so far
            stream.close()
        finally:
            served.close()
    assert rows.get_column("forming").to_list() == [True]  # an hour bar that started this hour is still open
    assert rows.get_column("trade_count").to_list() == [50]


def test_a_live_stream_from_a_future_start_sends_nothing_before_it(tmp_path):
    with Store(live_settings(tmp_path)) as store:
        store.append(MNQ.contract_id, "last", ticks(utc(2025, 1, 10, 11), 10, "last"))
        served = Served(store)
        try:
            stream = served.client.live(MNQ.contract_id, "last", utc(2025, 1, 10, 13))
            frames = iter(stream)
            assert next(frames).height == 0  # the seam: nothing stored from 13:00 on
            store.append(MNQ.contract_id, "last", ticks(utc(2025, 1, 10, 12), 100, "last", seed=1))  # before start
            after = ticks(utc(2025, 1, 10, 13), 50, "last", seed=2)
            store.append(MNQ.contract_id, "last", after)
            frame = next(frames)
            stream.close()
        finally:
            served.close()
    assert frame.get_column("ts").to_list() == after.column("ts").to_pylist()


def test_a_cursor_without_live_pages_exactly(tmp_path):
    table = ticks(T0, 100, "last", seed=3)
    with Store(live_settings(tmp_path)) as store:
        store.append(MNQ.contract_id, "last", table)
        served = Served(store)
        try:
            ts = table.column("ts").cast(pa.int64()).to_numpy()
            cursor = Cursor(int(ts[49]), int((ts[:50] == ts[49]).sum()))
            rest = served.client.tables(MNQ.contract_id, "last", cursor=str(cursor),
                                        end=T0 + timedelta(days=1))["last"]
        finally:
            served.close()
    assert rest.column("ts").cast(pa.int64()).to_pylist() == ts[50:].tolist()


def test_live_bars_send_each_closed_bar_once(tmp_path):
    """A bar closed by the clock is not sent closed again when the next bar's ticks arrive."""
    from ibstream.storage.live import LiveBars, LiveFeed
    from ibstream.storage.schemas import TickType
    from ibstream.storage.segments import StreamKey

    minute = ticks(T0, 400, "last", seed=14)
    ts = minute.column("ts").cast(pa.int64()).to_numpy()
    first_bar, next_bar = (minute.filter(pa.array(ts // 60_000_000 == ts[0] // 60_000_000 + k)) for k in (0, 1))
    with Store(live_settings(tmp_path)) as store:
        store.append(MNQ.contract_id, "last", first_bar)
        key = StreamKey(MNQ.contract_id, TickType.LAST)
        updates = LiveBars(LiveFeed(store, key, Cursor(to_us(T0))), "1m").batches(lambda: False)
        rows = [next(updates)[0], next(updates)[0]]  # history (the bar is forming), the seam (its time is long past)
        store.append(MNQ.contract_id, "last", next_bar)
        rows.append(next(updates)[0])
    sent = pa.Table.from_batches(rows).to_pydict()
    closed = [t for t, forming in zip(sent["ts"], sent["forming"]) if not forming]
    assert len(closed) == len(set(closed)) == 1
    assert sent["forming"][-1] and sent["trade_count"][-1] == next_bar.num_rows


def test_shutdown_does_not_wait_forever_for_a_reader_that_stopped(tmp_path, monkeypatch):
    from ibstream.flight_server import server as server_module

    monkeypatch.setattr(server_module, "SHUTDOWN_SECONDS", 1.0)
    quotes = ticks(T0, 300_000, "bid_ask", seed=7, rate_scale=20)  # ~23 MB: more than gRPC buffers
    with Store(live_settings(tmp_path)) as store:
        append_quotes(store, quotes)
        served = Served(store)
        stalled = raw_live_reader(flight.connect(served.location), "bid_ask")
        stalled.read_chunk()  # then never again
        stopping = threading.Thread(target=served.server.shutdown, daemon=True)
        stopping.start()
        stopping.join(60)
        assert not stopping.is_alive()
        served.client.close()
