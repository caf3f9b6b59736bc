"""Load: many parallel do_get readers while the recorder ingests at a steady rate.

The server process (this one) runs the whole recording service: the gateway simulator (its own
process) offers ~5,000 ticks/s over the IB wire protocol, ibapi -> recorder -> store, and the
Flight server on the same store, which also holds one archived synthetic MNQ day (1.5M quotes).
Readers are separate processes, each in a loop for the measurement window:

* full-day: the archived day's bid_ask ticks (get_flight_info + do_get + read_all);
* tail: the last minute of the stream being recorded (window "1m");
* live: a live subscription from the start of the window; at the end its ticks are checked
  against the store: exactly the ticks between its start and its cursor, none twice.

Phases: ingest alone; ingest + 32 readers (16 full-day, 8 tail, 8 live); then 16 full-day
readers against our server and against a bare pyarrow.flight server serving the same table
from memory (no ingest), in turn for two windows each, for the throughput ratio.
Goals: zero errors and zero lost or duplicated ticks at 32 readers; full-day throughput at 16
readers >= 0.8x the bare server's (issue 19: >= 0.95x); ingest rate down by no more than 20% under load.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
from bench_ingest import start_simulator  # noqa: E402
from common import (  # noqa: E402
    DAY_START,
    QUICK_HOURS,
    BareServer,
    archived_store,
    day_ticks,
    header,
    our_server,
    parse_args,
    serving,
    target,
)

from ibstream.app import RecordingService  # noqa: E402
from ibstream.core.times import to_us  # noqa: E402
from ibstream.recorder.ib import IBFeed  # noqa: E402
from ibstream.settings import ContractSpec  # noqa: E402
from ibstream.storage import Store  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402

SPEED = 300  # the simulated MNQ market at 300x: about 3,000 ticks a second, in bursts
WINDOWS = 2  # full-day windows per server in the throughput phase, our server and the bare one in turn


def reader(kind: str, location: str, day: tuple[datetime, datetime], begin: float, seconds: float, results) -> None:
    """One reader process: loop ``kind`` queries from ``begin`` (wall clock) for ``seconds``."""
    import pyarrow.flight as flight

    from ibstream.clients import Client
    from ibstream.flight_server.commands import command

    client = Client(location)
    out = {"kind": kind, "ops": 0, "bytes": 0, "rows": 0, "errors": [], "latency": []}
    time.sleep(max(0.0, begin - time.time()))
    deadline = time.monotonic() + seconds
    try:
        if kind == "live":
            start = datetime.now(UTC)
            stream = client.live(MNQ.contract_id, "bid_ask", start)
            for frame in stream:
                out["rows"] += frame.height
                if time.monotonic() > deadline:
                    break
            stream.close()
            out |= {"start_us": to_us(start), "cursor": stream.cursor, "reconnects": stream.reconnects}
        while kind != "live" and time.monotonic() < deadline:
            started = time.perf_counter()
            if kind == "bare_day":  # the bare server serves its one table for any ticket
                table = client._flight.do_get(flight.Ticket(b"day")).read_all()
            elif kind == "full_day":
                descriptor = flight.FlightDescriptor.for_command(command(MNQ.contract_id, "bid_ask", start=day[0],
                                                                         end=day[1]))
                ticket = client._flight.get_flight_info(descriptor).endpoints[0].ticket
                table = client._flight.do_get(ticket).read_all()
            else:
                table = client.tables(MNQ.contract_id, "bid_ask", window="1m")["bid_ask"]
            out["latency"].append(time.perf_counter() - started)
            out["ops"] += 1
            out["rows"] += table.num_rows
            out["bytes"] += table.nbytes
    except Exception as exc:  # noqa: BLE001 - every failure is a counted error
        out["errors"].append(f"{type(exc).__name__}: {str(exc)[:200]}")
    client.close()
    results.put(out)


def run_readers(kinds: list[str], location: str, day, seconds: float, during=None) -> list[dict]:
    """Start one process per reader, all beginning together; ``during(begin, seconds)`` runs here
    meanwhile (to measure the recorder over exactly the readers' window)."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    begin = time.time() + 4 + 0.3 * len(kinds)  # every process imported and connected by then
    processes = [context.Process(target=reader, args=(kind, location, day, begin, seconds, results))
                 for kind in kinds]
    for process in processes:
        process.start()
    if during is not None:
        during(begin, seconds)
    outs = [results.get(timeout=begin - time.time() + seconds + 120) for _ in processes]
    for process in processes:
        process.join()
    return outs


def ingest_rate(service: RecordingService, seconds: float, begin: float | None = None) -> float:
    """Ticks/s the recorder acknowledged over ``seconds`` from ``begin`` (wall clock; default now)."""
    time.sleep(max(0.0, (begin or 0) - time.time()))
    before, started = sum(service.recorder.acknowledged.values()), time.perf_counter()
    time.sleep(seconds)
    return (sum(service.recorder.acknowledged.values()) - before) / (time.perf_counter() - started)


def check_live(store, outs: list[dict]) -> tuple[int, int]:
    """(live readers whose ticks were exactly the store's, live readers checked)."""
    from ibstream.storage.live import Cursor

    exact = 0
    live = [o for o in outs if o["kind"] == "live" and not o["errors"] and o.get("cursor")]
    for out in live:
        cursor = Cursor.parse(out["cursor"])
        stored = store.plan(MNQ.contract_id, "bid_ask", out["start_us"], cursor.ts + 1).read_all()
        ts = stored.column("ts").cast("int64").to_numpy()
        expected = int((ts < cursor.ts).sum()) + cursor.n
        exact += expected == out["rows"]
    return exact, len(live)


def summarize(name: str, outs: list[dict], seconds: float, windows: int = 1) -> dict:
    """Throughput per reader kind over ``windows`` windows of ``seconds`` each (the same readers in each)."""
    seconds *= windows
    by_kind: dict[str, list[dict]] = {}
    for out in outs:
        by_kind.setdefault(out["kind"], []).append(out)
    errors = [e for o in outs for e in o["errors"]]
    print(f"{name}: {len(outs) // windows} readers, {len(errors)} errors" + (f" (first: {errors[0]})" if errors else ""))
    summary = {"errors": len(errors)}
    for kind, group in sorted(by_kind.items()):
        ops, rows, mb = (sum(o[k] for o in group) for k in ("ops", "rows", "bytes"))
        latencies = sorted(x for o in group for x in o["latency"])
        line = f"  {kind:<9} x{len(group) // windows:<3} {rows / seconds:>12,.0f} ticks/s"
        if latencies:
            p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
            line += (f" {mb / 1e6 / seconds:>8.0f} MB/s {ops:>6} queries, latency p50 "
                     f"{statistics.median(latencies) * 1e3:.1f} ms p99 {p99 * 1e3:.1f} ms")
        print(line)
        summary[kind] = {"mb_per_s": mb / 1e6 / seconds, "rows_per_s": rows / seconds}
    return summary


def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    seconds = 5 if quick else 15
    mixed = ["full_day"] * (4 if quick else 16) + ["tail"] * (2 if quick else 8) + ["live"] * (2 if quick else 8)
    full = ["full_day"] * (4 if quick else 16)
    day = (DAY_START, DAY_START + timedelta(hours=hours))
    header(f"load: readers in their own processes, recorder ingesting the simulated MNQ market at {SPEED}x, "
           f"{seconds} s windows")
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        table = day_ticks("bid_ask", hours=hours)
        store, _, _ = archived_store(Path(tmp), [table], fsync="none")
        settings = store.settings
        store.close()
        simulator, port = start_simulator(SPEED)
        settings = settings.model_copy(update={
            "ib_port": port, "contracts": (ContractSpec(con_id=MNQ.contract_id, tick_types=("bid_ask", "last")),),
            "ib_resubscribe_pause": timedelta(0)})
        try:
            with RecordingService(settings, IBFeed(settings)) as service:
                time.sleep(3)
                results["ingest_alone"] = ingest_rate(service, seconds)
                print(f"ingest alone: {results['ingest_alone']:,.0f} ticks/s acknowledged")
                loaded = []
                outs = run_readers(mixed, service.location, day, seconds,
                                   during=lambda begin, span: loaded.append(ingest_rate(service, span, begin)))
                results["ingest_loaded"] = loaded[0]
                results["mixed"] = summarize(f"ingest + {len(mixed)} mixed readers", outs, seconds)
                service.recorder.flush()
                exact, live = check_live(service.store, outs)
                print(f"  live readers with exactly the stored ticks (no loss, no duplicate): {exact} of {live}")
                print(f"ingest under load: {results['ingest_loaded']:,.0f} ticks/s acknowledged "
                      f"({results['ingest_loaded'] / results['ingest_alone']:.2f}x of alone)")
                results["live_exact"] = (exact, live)
            batches = pa.Table.from_batches(table.to_batches(max_chunksize=settings.batch_rows))
            runs: dict[str, list[dict]] = {"ours": [], "bare": []}
            with Store(settings, read_only=True) as reading, serving(our_server(reading)) as ours, \
                    serving(BareServer(batches)) as bare:
                for _ in range(WINDOWS):  # in turn: what the noisy host does to one it does to the other
                    runs["ours"] += run_readers(full, ours, day, seconds)
                    runs["bare"] += run_readers(["bare_day"] * len(full), bare, day, seconds)
            results["ours"] = summarize(f"{len(full)} full-day readers, our server ({WINDOWS} windows, in turn with "
                                        "the bare server's)", runs["ours"], seconds, WINDOWS)
            results["bare"] = summarize(f"{len(full)} full-day readers, bare server (same batches in memory)",
                                        runs["bare"], seconds, WINDOWS)
        finally:
            simulator.terminate()
            simulator.wait()
    ratio = results["ours"]["full_day"]["mb_per_s"] / results["bare"]["bare_day"]["mb_per_s"]
    print(f"full-day throughput ours / bare at {len(full)} readers: {ratio:.2f}")
    drop = 1 - results["ingest_loaded"] / results["ingest_alone"]
    exact, live = results["live_exact"]
    target(f"{len(mixed)} readers with zero errors and exact live streams ({results['mixed']['errors']} errors, "
           f"{exact}/{live} exact)", results["mixed"]["errors"] == 0 and exact == live)
    target(f"full-day throughput >= 0.8x bare ({ratio:.2f}x)", ratio >= 0.8)
    target(f"issue 19: full-day throughput >= 0.95x bare at {len(full)} readers ({ratio:.2f}x)", ratio >= 0.95)
    target(f"ingest drops <= 20% under load ({drop:.0%})", drop <= 0.2)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
