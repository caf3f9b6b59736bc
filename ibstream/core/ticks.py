"""Tick types (with IB's names) and stream keys: what a stored stream is."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from ibstream.core.errors import shown


class TickFamily(StrEnum):
    """What a tick type's rows are: trades (price, size), two-sided quotes, or a mid-point price."""

    TRADES = "trades"
    QUOTES = "quotes"
    MID = "mid"


class TickType(StrEnum):
    """The IB tick-by-tick types; IB's names (``reqTickByTickData``'s tickType) and wire codes
    (the ``tickByTick`` message's type field) are :attr:`ib_name` and :attr:`ib_code`."""

    BID_ASK = "bid_ask"
    LAST = "last"
    ALL_LAST = "all_last"  # time and sales including unreported and odd lots
    MID_POINT = "mid_point"

    @property
    def ib_name(self) -> str:
        return _IB[self][0]

    @property
    def ib_code(self) -> int:
        return _IB[self][1]

    @property
    def family(self) -> TickFamily:
        return _IB[self][2]

    @classmethod
    def from_ib_name(cls, name: str) -> "TickType | None":
        """The tick type IB calls ``name`` (e.g. ``"BidAsk"``), or None."""
        return next((t for t, (ib_name, _, _) in _IB.items() if ib_name == name), None)

    @classmethod
    def parse(cls, value: str) -> "TickType":
        try:
            return cls(value)
        except ValueError:
            legal = ", ".join(t.value for t in cls)
            raise ValueError(f"tick_type was {shown(value)}; use any of {legal}") from None


@dataclass(frozen=True, order=True)
class StreamKey:
    """One stored stream: a contract and a tick type."""

    contract_id: int
    tick_type: TickType

    def __str__(self) -> str:
        return f"{self.contract_id}/{self.tick_type.value}"


_IB: dict[TickType, tuple[str, int, TickFamily]] = {
    TickType.LAST: ("Last", 1, TickFamily.TRADES),
    TickType.ALL_LAST: ("AllLast", 2, TickFamily.TRADES),
    TickType.BID_ASK: ("BidAsk", 3, TickFamily.QUOTES),
    TickType.MID_POINT: ("MidPoint", 4, TickFamily.MID),
}
