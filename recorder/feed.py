"""The interface between a tick source and the recorder.

A feed delivers ticks by calling a :class:`TickSink` (the :class:`~recorder.recorder.Recorder`)
from its own thread, the way ``ibapi``'s ``EWrapper.tickByTick*`` callbacks do. The synthetic
feed implements it now; the IB gateway feed replaces it without touching the recorder.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Protocol

from ibstream.storage.index import ContractDetails
from ibstream.storage.schemas import TickType

Size = int | Decimal


class TickSink(Protocol):
    def on_bid_ask(self, contract_id: int, ib_time: int, bid_price: float, ask_price: float,
                   bid_size: Size, ask_size: Size, bid_past_low: bool, ask_past_high: bool) -> None: ...

    def on_trade(self, contract_id: int, tick_type: TickType, ib_time: int, price: float, size: Size,
                 exchange: str, special_conditions: str, past_limit: bool, unreported: bool) -> None: ...

    def on_mid_point(self, contract_id: int, ib_time: int, mid_point: float) -> None: ...

    def on_stream_state(self, contract_id: int, tick_type: TickType | str, recording: bool, reason: str,
                        at_us: int | None = None) -> None:
        """A stream started (``recording``) or stopped being received; ``reason`` names why; ``at_us`` when, if
        not now (a dropped connection: after the last message received, since anything later is lost)."""

    def on_contract_details(self, details: ContractDetails) -> None:
        """The source described a contract (exchange, trading hours, time zone)."""

    def on_roll(self, root: str, contract_id: int, active_from_us: int) -> None:
        """The continuous future ``root`` (e.g. MNQ) is ``contract_id`` from ``active_from_us`` until the next roll."""


class TickFeed(Protocol):
    """A source of ticks: ``start`` begins delivering to the sink, ``stop`` ends it."""

    def start(self, sink: TickSink) -> None: ...

    def stop(self) -> None: ...
