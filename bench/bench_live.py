"""Tick-to-subscriber latency of live streams: tick acknowledged -> batch received by a client.

A writer appends MNQ trades to a writable Store (fsync="batch") as the recorder does: a batch
every 20 ms at ~5,000 ticks/s, each batch's ticks stamped with one wall-clock ``ts`` just before
the append; the moment the append returns (the batch is acknowledged) is noted against that
stamp. A live client (clients.LiveStream) notes when it receives each tick; a tick's latency is
received - acknowledged (delivery only: the append and its fsync are bench_ingest's business).

1. one process: recorder (writer), Flight server and client share the process (the writer's
   batches reach the live stream through an in-memory subscription; a tick may arrive before
   its append has returned, hence latencies at or just below 0);
2. separate processes: the server is `ibstream serve` on the same data root in its own process;
   it wakes on each acknowledgement (inotify, IBSTREAM_LIVE_NOTIFY) and reads the store;
3. the same with IBSTREAM_LIVE_NOTIFY=false: the baseline, reading the store every
   IBSTREAM_LIVE_POLL_INTERVAL (50 ms), which is also what a reader without inotify does.

Targets: p99 < 50 ms in one process, <= 20 ms across processes (woken), < 250 ms polling.
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


def write_steadily(store: Store, seconds: float) -> dict[int, int]:
    """Append RATE ticks/s in 20 ms batches, each stamped with the clock just before its append;
    returns when each stamp's batch was acknowledged (stamp -> microseconds)."""
    per_batch = int(RATE * BATCH_SECONDS)
    template = synthetic_ticks(MNQ, "last", 0, per_batch, seed=1)
    deadline, acknowledged, next_at = time.monotonic() + seconds, {}, time.monotonic()
    while time.monotonic() < deadline:
        stamp = now_us()
        batch = template.set_column(0, "ts", pa.array(np.full(per_batch, stamp), pa.int64()).cast(
            template.schema.field("ts").type))
        store.append(MNQ.contract_id, "last", batch)
        acknowledged[stamp] = now_us()
        next_at += BATCH_SECONDS
        time.sleep(max(0.0, next_at - time.monotonic()))
    return acknowledged


def measure(location: str, store: Store, seconds: float) -> dict:
    """Latencies (ms), acknowledged -> received, of every tick a live client receives while the writer runs."""
    received: list[tuple[np.ndarray, int]] = []  # (ts of the ticks, when they arrived)
    client = Client(location)
    stream = client.live(MNQ.contract_id, "last", datetime.now(UTC))

    def receive() -> None:
        for frame in stream:
            if frame.height:
                received.append((frame.get_column("ts").cast(int).to_numpy(), now_us()))

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    time.sleep(0.5)
    acknowledged = write_steadily(store, seconds)
    time.sleep(0.5)
    stream.close()
    reader.join(5)
    client.close()
    delays = [at - np.array([acknowledged.get(t, np.nan) for t in ts]) for ts, at in received]
    ms = np.concatenate(delays) / 1e3 if delays else np.array([np.nan])
    ms = ms[~np.isnan(ms)]  # the ticks written before the run
    return {"written": len(acknowledged) * int(RATE * BATCH_SECONDS), "received": int(ms.size),
            **{f"p{q}": float(np.percentile(ms, q)) for q in (50, 90, 99)}, "max": float(ms.max())}


def start_server(data_root: Path, **env: str) -> tuple[subprocess.Popen, str]:
    from bench_ingest import free_port

    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve",
                                "--data-root", str(data_root), "--flight-port", str(port)], cwd=ROOT,
                               env={**os.environ, **env})
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


SETUPS = (  # name, label, environment of the server process (None: the server runs in the recorder's process)
    ("one_process", "one process (recorder + server + client)", None),
    ("two_processes", "server in its own process (woken)", {}),
    ("two_processes_polling", "server in its own process (polls 50 ms)", {"IBSTREAM_LIVE_NOTIFY": "false"}),
)


def main(quick: bool = False) -> dict:
    seconds = 3 if quick else 10
    header(f"live: tick acknowledged -> received by a live client, {RATE:,} ticks/s in 20 ms batches, {seconds} s")
    print(f"{'setup':<44} {'written':>8} {'received':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    results = {}
    for name, label, env in SETUPS:
        # a store of its own each: another process reads the open segment whole, so a setup run on
        # a segment the previous one filled would pay for its ticks
        with tempfile.TemporaryDirectory(prefix="bench-live-") as tmp, \
                Store(settings(Path(tmp), fsync="batch")) as store:
            store.append(MNQ.contract_id, "last", synthetic_ticks(MNQ, "last", now_us() - 60_000_000, 10, seed=2))
            if env is None:
                with serving(our_server(store)) as location:
                    results[name] = measure(location, store, seconds)
            else:
                server, location = start_server(store.settings.data_root, **env)
                try:
                    results[name] = measure(location, store, seconds)
                finally:
                    server.terminate()
                    server.wait()
        report(label, results[name])
    target(f"p99 < 50 ms in one process ({results['one_process']['p99']:.1f} ms)", results["one_process"]["p99"] < 50)
    target(f"p99 <= 20 ms across processes, woken ({results['two_processes']['p99']:.1f} ms)",
           results["two_processes"]["p99"] <= 20)
    target(f"p99 < 250 ms across processes, polling ({results['two_processes_polling']['p99']:.1f} ms)",
           results["two_processes_polling"]["p99"] < 250)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
