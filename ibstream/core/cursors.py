"""Cursors: positions in a stream that a reader resumes from exactly."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ibstream.core.errors import InvalidRequestError, shown
from ibstream.core.times import as_micros, in_range_us

MAX_CURSOR_N = 2**31  # ticks with one time a cursor can count


@dataclass(frozen=True)
class Cursor:
    """The position after the ``n``-th tick (1-based) with time ``ts`` (µs); ``n = 0``: before them."""

    ts: int
    n: int = 0

    def __str__(self) -> str:
        return f"{self.ts}:{self.n}"

    @classmethod
    def parse(cls, text: str) -> "Cursor":
        try:
            ts, n = (int(part) for part in text.split(":"))
        except (AttributeError, ValueError, TypeError):
            raise InvalidRequestError(
                f"cursor was {shown(text)}; use the 'cursor' of a batch's app_metadata, \"<ts microseconds>:<n>\", "
                "e.g. \"1736519400123456:1\"") from None
        if not 0 <= n <= MAX_CURSOR_N:
            raise InvalidRequestError(f"cursor was {shown(text)}; its tick count n must be from 0 to {MAX_CURSOR_N}")
        try:
            in_range_us(ts, name="the cursor's time")
        except ValueError as exc:
            raise InvalidRequestError(f"cursor was {shown(text)}: {exc}") from None
        return cls(ts, n)

    def after(self, batch: pa.RecordBatch) -> "Cursor":
        """The cursor after ``batch`` (ts-ordered ticks that follow this cursor)."""
        if batch.num_rows == 0:
            return self
        ts = as_micros(batch.column("ts"))
        last = int(ts[-1])
        run = int(len(ts) - np.searchsorted(ts, last, side="left"))
        return Cursor(last, self.n + run if last == self.ts else run)

    def unseen(self, batches) -> Iterator[pa.RecordBatch]:
        """The ticks after this cursor from ``batches``: a read that starts at ``ts`` (so its first
        ``n`` ticks with that time are the ones already seen)."""
        skip = self.n
        for batch in batches:
            ts = as_micros(batch.column("ts"))
            first = int(np.searchsorted(ts, self.ts, side="left"))
            equal = int(np.searchsorted(ts, self.ts, side="right")) - first
            taken = min(skip, equal)
            skip = skip - taken if first + equal == len(ts) else 0
            rest = batch.slice(first + taken)
            if rest.num_rows:
                yield rest
