"""``ibstream demo``: the whole chain on an embedded gateway simulator, no IB account needed.

1. two hours of synthetic MNQ history are written and archived to Parquet;
2. the gateway simulator plays a live MNQ market (hundreds of quotes, tens of trades a
   second, 0.25 grid) over the IB API wire protocol on loopback; the recorder receives it
   through the real ``ibapi`` client and writes IPC segments while the Flight server serves;
3. the client queries history + live over Flight and the summary checks that every tick
   the gateway sent came back exactly once; a live client that followed the recording
   (history, then each trade as it was acknowledged) holds the same trades.
"""

from __future__ import annotations

import tempfile
import time
from datetime import timedelta
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc

from ibstream.app import RecordingService, run_for
from ibstream.clients.client import Client
from ibstream.core.times import US_PER_HOUR, from_us, hour_floor, now_us
from ibstream.recorder.ib import IBFeed
from ibstream.settings import ContractSpec, Settings
from ibstream.simulator.gateway import GatewaySimulator
from ibstream.storage.schemas import TickType
from ibstream.storage.store import Store
from ibstream.storage.synthetic import MNQ, synthetic_ticks

TICK_TYPES = (TickType.BID_ASK, TickType.LAST)
SPEED = 30  # the simulated market runs 30x its realistic rate: ~450 quotes and ~45 trades a second


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def write_history(store: Store, end_us: int) -> dict[str, int]:
    """Two hours of synthetic MNQ ticks before ``end_us``, archived; returns counts per type."""
    start = end_us - 2 * US_PER_HOUR
    counts = {}
    for tick_type, count in ((TickType.BID_ASK, 100_000), (TickType.LAST, 10_000)):
        table = synthetic_ticks(MNQ, tick_type, start, count, seed=1)
        table = table.filter(pc.less(table.column("ts"), pa.scalar(end_us, pa.int64()).cast(table.schema.field("ts").type)))
        for offset in range(0, table.num_rows, 10_000):
            store.append(MNQ.contract_id, tick_type, table.slice(offset, 10_000))
        counts[tick_type.value] = table.num_rows
    store.archive()
    return counts


def run_demo(seconds: float = 8.0, data_root: Path | None = None, port: int = 0) -> bool:
    root = data_root or Path(tempfile.mkdtemp(prefix="ibstream-demo-"))
    gateway = GatewaySimulator(speed=SPEED).start()
    settings = Settings(
        data_root=root, rotation_interval=timedelta(seconds=5), archive_delay=timedelta(0),
        archive_check_interval=timedelta(seconds=5), flight_port=port, ib_port=gateway.port,
        contracts=(ContractSpec(con_id=MNQ.contract_id, tick_types=tuple(t.value for t in TICK_TYPES)),),
    )
    try:
        return _run(settings, gateway, seconds)
    finally:
        gateway.stop()


def _run(settings: Settings, gateway: GatewaySimulator, seconds: float) -> bool:
    history_end = hour_floor(now_us())
    with Store(settings) as store:
        history = write_history(store, history_end)
        bytes_per_tick = {
            t: info[3] / info[2] for (cid, t), info in store.index.archive_summary().items()
        }
    print(f"ibstream demo — data in {settings.data_root}")
    print(f"history: {history['bid_ask']:,} quotes and {history['last']:,} trades archived to Parquet "
          f"({bytes_per_tick['bid_ask']:.1f} and {bytes_per_tick['last']:.1f} bytes/tick)")

    with RecordingService(settings, IBFeed(settings)) as service:
        print(f"live: gateway simulator {gateway.host}:{gateway.port} -> ibapi -> recorder -> segments; "
              f"Flight server at {service.location}; recording for {seconds:.0f} s ...")
        watcher = Client(service.location)  # a live client: history, then each trade as it is acknowledged
        live = watcher.history_and_live(MNQ.contract_id, "last", from_us(history_end - 2 * US_PER_HOUR))
        run_for(service, seconds)
        gateway.pause()
        sent_tables = {t.value: gateway.sent(MNQ.contract_id, t) for t in TICK_TYPES}
        sent = {name: _rows(table) for name, table in sent_tables.items()}
        wait_for(lambda: sum(service.recorder.acknowledged.values()) >= sum(sent.values()))
        service.recorder.flush()
        acknowledged = {k.tick_type.value: n for k, n in service.recorder.acknowledged.items()}
        print(f"gateway sent {sum(sent.values()):,} ticks over the wire; the recorder acknowledged "
              f"{sum(acknowledged.values()):,}")
        with Client(service.location) as client:
            started = time.perf_counter()
            frames = client.ticks(MNQ.contract_id, [t.value for t in TICK_TYPES], from_us(history_end - 2 * US_PER_HOUR))
            elapsed = time.perf_counter() - started
            streams = client.streams()
            bars = client.bars(MNQ.contract_id, "last", "1m", from_us(history_end - 2 * US_PER_HOUR))
            sessions = client.session_times(MNQ.contract_id)
        wait_for(lambda: live.height >= frames["last"].height)
        live.stop()
        watcher.close()
    bars_exact = _report_bars(bars, frames["last"], sessions)
    live_client_exact = live.frame.equals(frames["last"])
    print(f"\nlive client (history_and_live, started before recording): {live.height:,} trades, the same as the "
          f"query after the fact: {'yes' if live_client_exact else 'NO'}")
    live_exact = all(_same_ticks(frames[name].filter(pl.col("ts") >= from_us(history_end)), table)
                     for name, table in sent_tables.items())
    print(f"live ticks served equal the ticks the gateway sent, field by field: {'yes' if live_exact else 'NO'}")
    return _report(frames, history, acknowledged, elapsed, streams) and live_exact and bars_exact and live_client_exact


def _report_bars(bars: pl.DataFrame, trades: pl.DataFrame, sessions: pl.DataFrame) -> bool:
    """1-minute bars of the same trades: counts and volume add up to the ticks served."""
    exact = (bars["trade_count"].sum() == trades.height and bars["volume"].sum() == trades["size"].sum())
    with pl.Config(tbl_rows=6, tbl_cols=8, tbl_width_chars=140):
        print(f"\n1-minute trade bars over Flight: {bars.height} bars of {bars['trade_count'].sum():,} trades "
              f"(= the trades served: {'yes' if exact else 'NO'}); latest:")
        print(bars.tail(3))
        print("\nMNQ sessions of the current trading day, from the hours the gateway reported (reqContractDetails):")
        print(sessions)
    return exact


def _same_ticks(served: pl.DataFrame, sent: pa.Table | None) -> bool:
    """Every field but ``ts`` (the receive time, which only the recorder knows) is equal."""
    if sent is None:
        return served.height == 0
    return served.drop("ts").equals(pl.DataFrame(sent).drop("ts"))


def _rows(table: pa.Table | None) -> int:
    return 0 if table is None else table.num_rows


def _report(frames: dict[str, pl.DataFrame], history: dict[str, int], acknowledged: dict[str, int],
            elapsed: float, streams: pl.DataFrame) -> bool:
    print(f"\nquery over Flight: history + live in {elapsed * 1e3:.0f} ms")
    exact = True
    for name, frame in frames.items():
        expected = history[name] + acknowledged.get(name, 0)
        ok = frame.height == expected and frame["ts"].is_sorted() and frame["ts"].n_unique() <= frame.height
        exact &= ok
        print(f"  {name:8s} {frame.height:>8,} ticks served = {history[name]:,} history + "
              f"{acknowledged.get(name, 0):,} live acknowledged  {'OK' if ok else 'MISMATCH'}   "
              f"first {frame['ts'].min()!s}  last {frame['ts'].max()!s}")
    with pl.Config(tbl_rows=5, tbl_cols=8, tbl_width_chars=140):
        print("\nlatest quotes:")
        print(frames["bid_ask"].tail(5))
        print("\nlatest trades:")
        print(frames["last"].tail(5))
        print("\nstored streams (list_flights):")
        print(streams)
    print("\nevery acknowledged tick served exactly once:", "yes" if exact else "NO")
    return exact
