"""A seeded synthetic market: MNQ-like and AAPL-like ticks for the demo, tests and benches.

Prices walk on the contract's grid (0.25 for MNQ, 0.01 for AAPL); quote updates arrive in
bursts with quiet spells (exponential gaps whose rate itself varies); trades print at the
bid or the ask. :func:`synthetic_ticks` makes a whole table at once (history, benches);
:class:`SyntheticFeed` plays the same market in real time into a :class:`~recorder.feed.TickSink`.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import pyarrow as pa

from ibstream.core.times import US_PER_SECOND, now_us
from ibstream.recorder.feed import TickSink
from ibstream.storage.schemas import TickType, schema_for


@dataclass(frozen=True)
class SyntheticContract:
    contract_id: int
    symbol: str
    tick_size: float
    start_price: float
    quotes_per_second: float
    trades_per_second: float
    exchanges: tuple[str, ...]


MNQ = SyntheticContract(711280073, "MNQ", 0.25, 21_000.0, 15.0, 1.5, ("CME",))
AAPL = SyntheticContract(265598, "AAPL", 0.01, 230.0, 8.0, 2.0, ("NASDAQ", "ARCA", "IEX", "EDGX"))
CONTRACTS = {c.contract_id: c for c in (MNQ, AAPL)}


def _arrival_times(rng: np.random.Generator, start_us: int, count: int, per_second: float) -> np.ndarray:
    """Bursty arrivals: exponential gaps whose rate switches between busy and quiet spells."""
    regime = np.repeat(rng.choice([0.3, 1.0, 3.0], size=count // 500 + 1), 500)[:count]
    gaps = rng.exponential(US_PER_SECOND / (per_second * regime)).astype(np.int64)
    return start_us + np.cumsum(gaps)


def _prices(rng: np.random.Generator, contract: SyntheticContract, count: int) -> np.ndarray:
    steps = rng.choice([-1, 0, 0, 0, 1], size=count)
    grid = np.round(contract.start_price / contract.tick_size) + np.cumsum(steps)
    return grid * contract.tick_size


def synthetic_ticks(contract: SyntheticContract, tick_type: TickType | str, start_us: int, count: int,
                    *, seed: int = 0, rate_scale: float = 1.0) -> pa.Table:
    """``count`` ticks of one type from ``start_us`` on, as a table of the stored schema."""
    tick_type = TickType(tick_type)
    rng = np.random.default_rng([seed, contract.contract_id, list(TickType).index(tick_type)])
    per_second = (contract.quotes_per_second if tick_type in (TickType.BID_ASK, TickType.MID_POINT)
                  else contract.trades_per_second) * rate_scale
    ts = _arrival_times(rng, start_us, count, per_second)
    columns: dict[str, object] = {"ts": ts, "ib_time": ts - ts % US_PER_SECOND - US_PER_SECOND * (rng.random(count) < 0.05)}
    bid = _prices(rng, contract, count)
    spread = contract.tick_size * rng.choice([1, 1, 1, 2], size=count)
    if tick_type is TickType.BID_ASK:
        columns |= {
            "bid_price": bid, "ask_price": bid + spread,
            "bid_size": rng.integers(1, 40, count), "ask_size": rng.integers(1, 40, count),
            "bid_past_low": rng.random(count) < 0.001, "ask_past_high": rng.random(count) < 0.001,
        }
    elif tick_type is TickType.MID_POINT:
        columns |= {"mid_point": bid + spread / 2}
    else:
        at_ask = rng.random(count) < 0.5
        columns |= {
            "price": np.where(at_ask, bid + spread, bid),
            "size": rng.geometric(0.35, count),
            "exchange": np.array(contract.exchanges)[rng.integers(0, len(contract.exchanges), count)],
            "special_conditions": np.where(rng.random(count) < 0.02, "I", ""),
            "past_limit": np.zeros(count, dtype=bool),
            "unreported": rng.random(count) < (0.01 if tick_type is TickType.ALL_LAST else 0.0),
        }
    schema = schema_for(tick_type)
    arrays = []
    for f in schema:
        values = columns[f.name]
        if pa.types.is_decimal(f.type):
            arrays.append(pa.array(values).cast(pa.int32()).cast(f.type))
        else:
            arrays.append(pa.array(values).cast(f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class SyntheticFeed:
    """Plays synthetic contracts in real time into a sink, one callback per tick (like ibapi)."""

    def __init__(self, contracts: list[SyntheticContract] = (MNQ,), *, seed: int = 0, rate_scale: float = 30.0,
                 tick_types: tuple[TickType, ...] = (TickType.BID_ASK, TickType.LAST)):
        self.contracts = list(contracts)
        self.seed = seed
        self.rate_scale = rate_scale
        self.tick_types = tick_types
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0

    def start(self, sink: TickSink) -> None:
        self._stop.clear()
        self._sink = sink
        for contract in self.contracts:
            for tick_type in self.tick_types:
                sink.on_stream_state(contract.contract_id, tick_type, True, "subscribed")
        self._thread = threading.Thread(target=self._run, args=(sink,), name="synthetic-feed", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            for contract in self.contracts:
                for tick_type in self.tick_types:
                    self._sink.on_stream_state(contract.contract_id, tick_type, False, "recorder_stopped")

    def _schedule(self, contract: SyntheticContract, tick_type: TickType):
        """Rows of one stream, endlessly, with ``ts`` as the time each is due (microseconds)."""
        origin, chunk = now_us(), 2_000
        for round_ in itertools.count():
            table = synthetic_ticks(contract, tick_type, origin, chunk, seed=self.seed + round_,
                                    rate_scale=self.rate_scale)
            table = table.set_column(0, "ts", table.column("ts").cast(pa.int64()))
            table = table.set_column(1, "ib_time", table.column("ib_time").cast(pa.int64()))
            yield from table.to_pylist()
            origin = table.column("ts")[-1].as_py()

    def _run(self, sink: TickSink) -> None:
        streams = [(c, t, self._schedule(c, t)) for c in self.contracts for t in self.tick_types]
        heads = [next(schedule) for _, _, schedule in streams]
        while not self._stop.is_set():
            now = now_us()
            for i, (contract, tick_type, schedule) in enumerate(streams):
                while heads[i]["ts"] <= now:
                    self._deliver(sink, contract, tick_type, heads[i])
                    heads[i] = next(schedule)
            self._stop.wait(0.005)

    def _deliver(self, sink: TickSink, contract: SyntheticContract, tick_type: TickType, row: dict) -> None:
        ib_time = row["ib_time"] // US_PER_SECOND
        if tick_type is TickType.BID_ASK:
            sink.on_bid_ask(contract.contract_id, ib_time, row["bid_price"], row["ask_price"],
                            int(row["bid_size"]), int(row["ask_size"]), row["bid_past_low"], row["ask_past_high"])
        elif tick_type is TickType.MID_POINT:
            sink.on_mid_point(contract.contract_id, ib_time, row["mid_point"])
        else:
            sink.on_trade(contract.contract_id, tick_type, ib_time, row["price"], Decimal(row["size"]),
                          row["exchange"], row["special_conditions"], row["past_limit"], row["unreported"])
        self.sent += 1
