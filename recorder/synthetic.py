"""An in-process feed of the synthetic market (:mod:`ibstream.storage.synthetic`): it plays the
market in real time into a :class:`~ibstream.recorder.feed.TickSink`, one callback per tick (like
``ibapi``), for the CLI's ``record --synthetic``, tests and benches."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from decimal import Decimal

from ibstream.core.times import US_PER_SECOND, now_us
from ibstream.recorder.feed import TickSink
from ibstream.storage.schemas import TickType
from ibstream.storage.synthetic import MNQ, SyntheticContract, synthetic_tape


class SyntheticFeed:
    """Plays synthetic contracts in real time into a sink, one callback per tick (like ibapi)."""

    def __init__(self, contracts: Sequence[SyntheticContract] = (MNQ,), *, seed: int = 0, rate_scale: float = 30.0,
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
        for table in synthetic_tape(contract, tick_type, now_us(), seed=self.seed, rate_scale=self.rate_scale,
                                    chunk_rows=2_000):
            yield from table.to_pylist()

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
