"""Tick-to-subscriber latency of live streams: acknowledged tick -> batch received by a client.

A writer appends MNQ trades to a writable Store (fsync="batch") as the recorder does: a batch
every 20 ms at ~5,000 ticks/s, each tick stamped with the wall clock (``ts``) just before its
batch is appended. A live client (clients.LiveStream) measures, for every tick it receives,
receive time - ts: the acknowledgement (append + fsync) plus the delivery.

1. one process: recorder (writer), Flight server and client share the process (the writer's
   batches reach the live stream through an in-memory subscription);
2. separate processes: the server is `ibstream serve` on the same data root in its own process
   (it polls the store every IBSTREAM_LIVE_POLL_INTERVAL, 50 ms by default).

Targets: p99 < 50 ms in one process, < 250 ms across processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
from common import header, our_server, parse_args, serving, settings, target  # noqa: E402

from ibstream.clients import Client  # noqa: E402
from ibstream.core.times import now_us  # noqa: E402
from ibstream.storage import Store  # noqa: E402
from ibstream.storage.synthetic import MNQ, synthetic_ticks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RATE = 5_000  # ticks/s
BATCH_SECONDS = 0.02


def write_steadily(store: Store, seconds: float, stop: threading.Event) -> int:
    """Append RATE ticks/s in 20 ms batches, each stamped with the clock just before its append."""
    per_batch = int(RATE * BATCH_SECONDS)
    template = synthetic_ticks(MNQ, "last", 0, per_batch, seed=1)
    deadline, written, next_at = time.monotonic() + seconds, 0, time.monotonic()
    while time.monotonic() < deadline and not stop.is_set():
        stamp = now_us()
        batch = template.set_column(0, "ts", pa.array(np.full(per_batch, stamp), pa.int64()).cast(
            template.schema.field("ts").type))
        store.append(MNQ.contract_id, "last", batch)
        written += per_batch
        next_at += BATCH_SECONDS
        time.sleep(max(0.0, next_at - time.monotonic()))
    return written


def measure(location: str, store: Store, seconds: float) -> dict:
    """Latencies (ms) of every tick a live client receives while the writer runs."""
    delays: list[np.ndarray] = []
    client = Client(location)
    stream = client.live(MNQ.contract_id, "last", datetime.now(UTC))
    stop = threading.Event()

    def receive() -> None:
        for frame in stream:
            if frame.height:
                delays.append(now_us() - frame.get_column("ts").cast(int).to_numpy())

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    time.sleep(0.5)
    written = write_steadily(store, seconds, stop)
    time.sleep(0.5)
    stream.close()
    reader.join(5)
    client.close()
    received = np.concatenate(delays) / 1e3 if delays else np.array([np.nan])
    return {"written": written, "received": int(received.size),
            **{f"p{q}": float(np.percentile(received, q)) for q in (50, 90, 99)}, "max": float(received.max())}


def start_server(data_root: Path) -> tuple[subprocess.Popen, str]:
    from bench_ingest import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve",
                                "--data-root", str(data_root), "--flight-port", str(port)], cwd=ROOT, env=dict(os.environ))
    location = f"grpc://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with flight.connect(location) as probe:
                list(probe.list_actions())
            return process, location
        except flight.FlightUnavailableError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("the server did not start")


def report(name: str, run: dict) -> None:
    print(f"{name:<44} {run['written']:>8,} {run['received']:>9,} {run['p50']:>8.1f} {run['p90']:>8.1f} "
          f"{run['p99']:>8.1f} {run['max']:>8.1f}")


def main(quick: bool = False) -> dict:
    seconds = 3 if quick else 10
    header(f"live: tick acknowledged -> received by a live client, {RATE:,} ticks/s in 20 ms batches, {seconds} s")
    print(f"{'setup':<44} {'written':>8} {'received':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp:
        with Store(settings(Path(tmp), fsync="batch")) as store:
            store.append(MNQ.contract_id, "last", synthetic_ticks(MNQ, "last", now_us() - 60_000_000, 10, seed=2))
            with serving(our_server(store)) as location:
                results["one_process"] = measure(location, store, seconds)
            report("one process (recorder + server + client)", results["one_process"])
            server, location = start_server(store.settings.data_root)
            try:
                results["two_processes"] = measure(location, store, seconds)
            finally:
                server.terminate()
                server.wait()
            report("server in its own process (polls 50 ms)", results["two_processes"])
    target(f"p99 < 50 ms in one process ({results['one_process']['p99']:.1f} ms)", results["one_process"]["p99"] < 50)
    target(f"p99 < 250 ms across processes ({results['two_processes']['p99']:.1f} ms)",
           results["two_processes"]["p99"] < 250)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
