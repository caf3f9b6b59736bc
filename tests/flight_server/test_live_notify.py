"""Live streams served by another process than the recorder's: woken by each acknowledgement
(inotify on the stream's folder), and polling where no notification comes (turned off, or a
recorder that does not announce its acknowledgements, as an older version)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from ibstream.clients import Client
from ibstream.core.ticks import StreamKey, TickType
from ibstream.settings import Settings
from ibstream.storage import Store, segments
from ibstream.storage.live import Acknowledgements
from ibstream.storage.segments import list_segments, stream_dir
from ibstream.storage.synthetic import MNQ
from tests.helpers import flight_answers, free_port, ticks, utc, wait_until

T0 = utc(2025, 1, 10, 12, 10)
ROOT = Path(__file__).resolve().parents[2]
KEY = StreamKey(MNQ.contract_id, TickType.LAST)


def recorder_settings(root: Path) -> Settings:
    """Small segments, so that the live part crosses rotations."""
    return Settings(data_root=root / "data", segment_max_bytes=64 * 1024, archive_delay=timedelta(0),
                    flight_port=0, fsync="none")


def start_server(data_root: Path, port: int, **env: str) -> subprocess.Popen:
    """``ibstream serve`` in its own process on the data root this process records into."""
    process = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve",
                                "--data-root", str(data_root), "--flight-port", str(port)], cwd=ROOT,
                               env={**os.environ, **env})
    wait_until(lambda: flight_answers(port), what="the server to listen")
    return process


def live_through_another_process(tmp_path: Path, **env: str):
    """History, then live ticks appended in small batches across rotations: what a live client of
    a server in another process receives, and what was recorded."""
    everything = ticks(T0, 6_000, "last", seed=9)
    history, later = everything.slice(0, 1_000), everything.slice(1_000)
    port = free_port()
    with Store(recorder_settings(tmp_path)) as store:
        store.append(MNQ.contract_id, "last", history)
        server = start_server(store.settings.data_root, port, **env)
        try:
            client = Client(f"grpc://127.0.0.1:{port}")
            live = client.history_and_live(MNQ.contract_id, "last", T0)
            assert live.wait_caught_up(30)
            for offset in range(0, later.num_rows, 100):
                store.append(MNQ.contract_id, "last", later.slice(offset, 100))
            wait_until(lambda: live.height >= everything.num_rows, what="every live tick")
            frame = live.frame
            live.stop()
            client.close()
            rotated = len(list_segments(stream_dir(store.settings.buffer_root, KEY)))
        finally:
            server.kill()
            server.wait()
    assert rotated > 2 and live.error is None
    return frame, everything


def assert_exactly(frame, everything) -> None:
    assert frame.get_column("ts").to_list() == everything.column("ts").to_pylist()
    assert frame.drop("ts").to_arrow().equals(everything.drop(["ts"]).replace_schema_metadata(None)
                                              .cast(frame.drop("ts").to_arrow().schema))


def test_a_server_in_another_process_is_woken_by_each_acknowledgement(tmp_path):
    """It would poll only every ten minutes: every tick reaches the client all the same, once."""
    frame, everything = live_through_another_process(tmp_path, IBSTREAM_LIVE_POLL_INTERVAL="PT10M")
    assert_exactly(frame, everything)


@pytest.mark.parametrize("without", ["notifications turned off", "a recorder that does not announce"])
def test_without_notifications_the_server_polls(tmp_path, monkeypatch, without):
    if without == "a recorder that does not announce":
        monkeypatch.setattr(segments, "announce_acknowledged", lambda fd: None)
        env = {}
    else:
        env = {"IBSTREAM_LIVE_NOTIFY": "false"}
    frame, everything = live_through_another_process(tmp_path, IBSTREAM_LIVE_POLL_INTERVAL="PT0.02S", **env)
    assert_exactly(frame, everything)


def test_acknowledgements_in_a_folder_made_after_the_watch_began(tmp_path):
    """A stream with nothing recorded yet has no folder: its reader polls until the folder is
    there, then is woken by each acknowledgement, and by none before it."""
    settings = recorder_settings(tmp_path)
    acknowledgements = Acknowledgements(stream_dir(settings.buffer_root, KEY))
    try:
        assert not acknowledgements.wait(0)  # no folder yet
        with Store(settings) as store:
            store.append(MNQ.contract_id, "last", ticks(T0, 10, "last"))
            acknowledgements.wait(0)  # the watch begins
            assert not acknowledgements.wait(0)
            store.append(MNQ.contract_id, "last", ticks(utc(2025, 1, 10, 12, 11), 10, "last"))
            assert acknowledgements.wait(0)
            assert not acknowledgements.wait(0)  # one wake per acknowledgement, not one per wait
    finally:
        acknowledgements.close()


def test_turned_off_there_is_no_wake(tmp_path):
    settings = recorder_settings(tmp_path)
    with Store(settings) as store:
        store.append(MNQ.contract_id, "last", ticks(T0, 10, "last"))
        acknowledgements = Acknowledgements(stream_dir(settings.buffer_root, KEY), enabled=False)
        store.append(MNQ.contract_id, "last", ticks(utc(2025, 1, 10, 12, 11), 10, "last"))
        assert not acknowledgements.wait(0)
        acknowledgements.close()
