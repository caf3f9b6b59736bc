"""Continuous futures: ``ROOT.c.N`` names the N-th expiry of ``ROOT`` by the recorded roll schedule.

``MNQ.c.0`` is the front contract (the expiry the recorder rolled into last), ``MNQ.c.1`` the one
after it, and so on, the way Databento spells calendar-rolled continuous contracts. The schedule is
what the recorder did (``Store.rolls``), not a rule applied afterwards: a changed roll setting never
rewrites history. Prices are unadjusted; each row names the expiry it came from.

Over time the schedule is a list of pieces ``(contract_id, start_us, end_us)``; the first piece
reaches back to the start of time (ticks recorded by ``con_id`` before the first roll belong to the
first front) and the last one forward to the end of time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ibstream.core.errors import InvalidRequestError, shown

PATTERN = re.compile(r"^(?P<root>[A-Z0-9][A-Z0-9_-]{0,15})\.c\.(?P<rank>[0-9])$")
EXAMPLE = "MNQ.c.0 (the front MNQ future by the recorded roll schedule; MNQ.c.1 the next expiry)"


@dataclass(frozen=True)
class Continuous:
    root: str
    rank: int

    @classmethod
    def parse(cls, text: object) -> "Continuous":
        match = PATTERN.match(text) if isinstance(text, str) else None
        if match is None:
            raise InvalidRequestError(f"continuous contract {shown(text, 40)} is not ROOT.c.N with N from 0 to 9; "
                                      f"use e.g. {EXAMPLE}")
        return cls(match["root"], int(match["rank"]))

    def __str__(self) -> str:
        return f"{self.root}.c.{self.rank}"

    def pieces(self, fronts: Sequence[tuple[int, int]], start_us: int, end_us: int) -> list[tuple[int, int, int]]:
        """``(contract_id, start_us, end_us)`` of this continuous contract within [start_us, end_us), in time
        order, from ``fronts``: the schedule's (active_from_us, contract_id) rows, oldest first. While row
        k is the front, rank N is row k + N; where no such row is known yet there is no piece. A row naming
        the same contract as the one before it (a restarted recorder records its front again) continues it."""
        fronts = [row for i, row in enumerate(fronts) if i == 0 or row[1] != fronts[i - 1][1]]
        pieces: list[tuple[int, int, int]] = []
        for k, (active_from, _) in enumerate(fronts):
            if k + self.rank >= len(fronts):
                break
            begin = active_from if k else start_us
            until = fronts[k + 1][0] if k + 1 < len(fronts) else end_us
            begin, until = max(begin, start_us), min(until, end_us)
            if begin < until:
                contract_id = fronts[k + self.rank][1]
                if pieces and pieces[-1][0] == contract_id and pieces[-1][2] == begin:
                    pieces[-1] = (contract_id, pieces[-1][1], until)
                else:
                    pieces.append((contract_id, begin, until))
        return pieces
