"""Tick types (with IB's names) and stream keys: what a stored stream is."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TickType(StrEnum):
    """The IB tick-by-tick types (``reqTickByTickData`` tickType in brackets)."""

    BID_ASK = "bid_ask"  # "BidAsk"
    LAST = "last"  # "Last"
    ALL_LAST = "all_last"  # "AllLast": time and sales including unreported/odd lots
    MID_POINT = "mid_point"  # "MidPoint"

    @property
    def ib_name(self) -> str:
        return {"bid_ask": "BidAsk", "last": "Last", "all_last": "AllLast", "mid_point": "MidPoint"}[self.value]

    @classmethod
    def parse(cls, value: str) -> "TickType":
        try:
            return cls(value)
        except ValueError:
            legal = ", ".join(t.value for t in cls)
            raise ValueError(f"tick_type was {value!r}; use any of {legal}") from None


@dataclass(frozen=True, order=True)
class StreamKey:
    """One stored stream: a contract and a tick type."""

    contract_id: int
    tick_type: TickType

    def __str__(self) -> str:
        return f"{self.contract_id}/{self.tick_type.value}"
