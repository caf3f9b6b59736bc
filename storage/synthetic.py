"""A seeded synthetic market, MNQ-like and AAPL-like, as tables of the stored tick schema.

Prices walk on the contract's grid (0.25 for MNQ, 0.01 for AAPL); quote updates arrive in
bursts with quiet spells (exponential gaps whose rate itself varies); trades print at the
bid or the ask. :func:`synthetic_ticks` makes a whole table at once (history, benches);
:func:`synthetic_tape` makes the same market endlessly, a table at a time: the gateway
simulator sends it over IB's wire and :class:`~ibstream.recorder.synthetic.SyntheticFeed`
plays it in process, both through this one loop.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ibstream.core.ticks import TickFamily
from ibstream.core.times import US_PER_SECOND
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
    per_second = (contract.quotes_per_second if tick_type.family is not TickFamily.TRADES
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


def synthetic_tape(contract: SyntheticContract, tick_type: TickType | str, origin_us: int = 0, *, seed: int = 0,
                   rate_scale: float = 1.0, chunk_rows: int = 4_096) -> Iterator[pa.Table]:
    """The market of one stream from ``origin_us`` on, endlessly, ``chunk_rows`` ticks a table, ``ts``
    and ``ib_time`` as int64 microseconds (``ts``: when each tick is due)."""
    for round_ in itertools.count():
        table = synthetic_ticks(contract, tick_type, origin_us, chunk_rows, seed=seed + round_, rate_scale=rate_scale)
        table = table.set_column(0, "ts", table.column("ts").cast(pa.int64()))
        table = table.set_column(1, "ib_time", table.column("ib_time").cast(pa.int64()))
        yield table
        origin_us = table.column("ts")[-1].as_py()
