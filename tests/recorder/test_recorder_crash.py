"""SIGKILL of the recorder process mid-stream, then a restart: no acknowledged tick lost, none doubled."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa

from ibstream.settings import Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.simulator.market import SIM_MNQ
from ibstream.storage import Store
from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
CID = SIM_MNQ.con_id
TICK_TYPES = ("bid_ask", "last")

RECORDER = textwrap.dedent(
    """
    from datetime import timedelta
    from pathlib import Path
    from ibstream.app import RecordingService, run_for
    from ibstream.settings import ContractSpec, Settings
    from ibstream.recorder.ib import IBFeed

    settings = Settings(
        data_root=Path({root!r}), flight_port=0, fsync="batch", ib_port={port}, rotation_interval=timedelta(seconds=1),
        ib_resubscribe_pause=timedelta(0), contracts=(ContractSpec(con_id={cid}, tick_types={types!r}),))
    service = RecordingService(settings, IBFeed(settings))
    acknowledged = service.recorder.acknowledged
    service.recorder.ack_listeners.append(
        lambda key, batch: print("ACK", key.tick_type.value, acknowledged[key], flush=True))
    with service:
        run_for(service, 0)  # until SIGTERM, like `ibstream record`
    """
)


class RecorderProcess:
    """``RecordingService`` + ``IBFeed`` in a child process, printing its acknowledged counts."""

    def __init__(self, root: Path, port: int):
        code = RECORDER.format(root=str(root), port=port, cid=CID, types=TICK_TYPES)
        self.process = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        self.acked = {t: 0 for t in TICK_TYPES}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            _, tick_type, count = line.split()
            self.acked[tick_type] = int(count)

    def kill(self) -> dict[str, int]:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join()
        return dict(self.acked)  # the last counts it printed: acknowledged before it died

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=30) == 0
        self._reader.join()


def test_sigkill_mid_stream_then_restart_loses_and_doubles_nothing(tmp_path):
    root = tmp_path / "data"
    with GatewaySimulator(speed=150) as gateway:
        first = RecorderProcess(root, gateway.port)
        wait_until(lambda: first.acked["bid_ask"] >= 3_000, timeout=60, what="ticks before the kill")
        acked_before_kill = first.kill()
        wait_until(lambda: gateway.session_count() == 0, what="the gateway to notice the dead recorder")
        sent_before_restart = {t: gateway.sent(CID, t).num_rows for t in TICK_TYPES}

        second = RecorderProcess(root, gateway.port)
        wait_until(lambda: second.acked["bid_ask"] >= 1_000, timeout=60, what="ticks after the restart")
        gateway.pause()
        wait_until(lambda: all(second.acked[t] == gateway.sent(CID, t).num_rows - sent_before_restart[t]
                               for t in TICK_TYPES), timeout=60, what="the restarted recorder to catch up")
        second.terminate()
        sent = {t: gateway.sent(CID, t) for t in TICK_TYPES}

    now = datetime.now(UTC)
    with Store(Settings(data_root=root), read_only=True) as store:
        for tick_type in TICK_TYPES:
            stored = store.read(CID, tick_type, now - timedelta(days=1), now + timedelta(days=1))
            n1, total = sent_before_restart[tick_type], sent[tick_type].num_rows
            kept = stored.num_rows - (total - n1)  # ticks of the killed run that were stored
            assert acked_before_kill[tick_type] <= kept <= n1, (tick_type, acked_before_kill, kept, n1)
            expected = pa.concat_tables([sent[tick_type].slice(0, kept), sent[tick_type].slice(n1)])
            assert pl.from_arrow(stored).drop("ts").equals(pl.from_arrow(expected).drop("ts")), tick_type
        coverage = store.coverage(CID, "bid_ask", now - timedelta(days=1), now + timedelta(days=1))
        assert list(zip(coverage["status"].to_pylist(), coverage["reason"].to_pylist())) == [
            ("recorded", "subscribed"), ("gap", "recorder_crashed"), ("recorded", "subscribed"),
            ("gap", "recorder_stopped")]
