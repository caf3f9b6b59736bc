"""Reconnect cost: seconds and ticks lost per stream per dropped connection.

The gateway simulator runs its markets on the wall clock (``market_clock=True``): each stream
trades whether anyone is subscribed or not, so the ticks lost across a drop are exactly those
the market made (``sim.market``) that were never written to the recorder (``sim.sent``). The
gateway drops every connection every ``INTERVAL`` seconds (longer than IB's 15 s rule, so a
resubscription never has to wait for it) while the recorder streams the default four streams
(MNQ and AAPL, bid_ask and last) at a known rate. Per drop and stream: seconds from the drop to
the first tick received again (an upper bound: it includes the wait for the market's next tick,
long on a quiet stream), and the market's ticks in that span never sent (the exact loss).

Baseline, same run: the old policy, which the settings still express: the first attempt after
``ib_reconnect_initial`` (1 s) and the backoff reset only after 60 s connected
(``ib_reconnect_delay=1 s, ib_reconnect_stable=60 s``), so drops less than a minute apart wait
1, 2, 4 ... s. Now: ``ib_reconnect_delay=0``, ``ib_reconnect_stable=5 s`` (the defaults).
"""

from __future__ import annotations

import logging
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, parse_args  # noqa: E402

from ibstream.app import RecordingService  # noqa: E402
from ibstream.core.times import from_us, now_us  # noqa: E402
from ibstream.recorder.ib import IBFeed  # noqa: E402
from ibstream.settings import Settings  # noqa: E402
from ibstream.simulator.gateway import GatewaySimulator  # noqa: E402
from ibstream.simulator.market import SIM_AAPL, SIM_MNQ  # noqa: E402

STREAMS = [(c.con_id, t) for c in (SIM_MNQ, SIM_AAPL) for t in ("bid_ask", "last")]
NAMES = {SIM_MNQ.con_id: "MNQ", SIM_AAPL.con_id: "AAPL"}
SPEED = 20
INTERVAL = 16.0  # seconds between drops: past IB's 15 s per-instrument rule


def run(policy: dict, drops: int) -> dict:
    """Record through ``drops`` dropped connections under a reconnect ``policy``; per stream lists of
    (seconds, ticks) lost, and the streams' rate."""
    with GatewaySimulator(speed=SPEED, market_clock=True, send_interval=0.005) as sim, \
            tempfile.TemporaryDirectory(prefix="bench-reconnect-") as tmp:
        settings = Settings(data_root=Path(tmp) / "data", flight_port=0, fsync="none", ib_port=sim.port,
                            ib_resubscribe_pause=timedelta(seconds=15), **policy)
        with RecordingService(settings, IBFeed(settings)) as service:
            while not all(sim.sent(cid, tt) is not None for cid, tt in STREAMS):
                time.sleep(0.01)
            started = now_us()
            drop_times = []
            for _ in range(drops):
                time.sleep(INTERVAL)
                drop_times.append(now_us())
                sim.drop_connections()
            time.sleep(INTERVAL)
            ended = now_us()
            connections = service.feed.connections
    lost: dict[tuple[int, str], list[tuple[float, int]]] = {}
    rates = {}
    for cid, tt in STREAMS:
        sent = sim.sent(cid, tt).column("ts").cast("int64").to_numpy()
        market = sim.market(cid, tt, from_us(started), from_us(ended)).column("ts").cast("int64").to_numpy()
        rates[(cid, tt)] = market.size / ((ended - started) / 1e6)
        for drop in drop_times:
            after = sent[sent >= drop]
            back = int(after[0]) if after.size else ended
            missing = np.setdiff1d(market[(market >= drop) & (market < back)], sent, assume_unique=False)
            lost.setdefault((cid, tt), []).append(((back - drop) / 1e6, int(missing.size)))
    return {"lost": lost, "rates": rates, "connections": connections}


def main(quick: bool = False) -> dict:
    for name in ("ibstream.recorder.ib", "ibstream.simulator.gateway"):
        logging.getLogger(name).setLevel(logging.ERROR)
    drops = 1 if quick else 3
    header(f"reconnect cost: {drops} dropped connection(s) {INTERVAL:.0f} s apart, simulator market on the wall clock "
           f"(speed {SPEED})")
    policies = {"baseline (1 s, backoff reset after 60 s)": dict(ib_reconnect_initial=timedelta(seconds=1),
                                                                  ib_reconnect_delay=timedelta(seconds=1),
                                                                  ib_reconnect_stable=timedelta(seconds=60)),
                "now (at once, backoff reset after 5 s)": dict(ib_reconnect_initial=timedelta(seconds=1))}
    results = {name: run(policy, drops) for name, policy in policies.items()}
    first = next(iter(results.values()))
    print("rates (ticks/s): " + ", ".join(f"{NAMES[c]} {t} {r:,.1f}" for (c, t), r in first["rates"].items()))
    print(f"{'policy':<42} {'stream':<13} {'s lost per drop':>22} {'ticks lost per drop':>22}")
    summary = {}
    for name, result in results.items():
        for (cid, tt), spans in result["lost"].items():
            seconds = [s for s, _ in spans]
            ticks = [n for _, n in spans]
            print(f"{name:<42} {NAMES[cid] + ' ' + tt:<13} {' '.join(f'{s:.2f}' for s in seconds):>22} "
                  f"{' '.join(str(n) for n in ticks):>22}")
        every = [s for spans in result["lost"].values() for s, _ in spans]
        every_ticks = [n for spans in result["lost"].values() for _, n in spans]
        summary[name] = (statistics.mean(every), statistics.mean(every_ticks))
    (base_s, base_n), (now_s, now_n) = summary.values()
    print(f"mean per drop and stream: baseline {base_s:.2f} s / {base_n:.1f} ticks; now {now_s:.2f} s / "
          f"{now_n:.1f} ticks ({base_s / now_s if now_s else float('inf'):.1f}x less time lost)")
    return {"summary": summary, "results": {k: v["lost"] for k, v in results.items()}}


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
