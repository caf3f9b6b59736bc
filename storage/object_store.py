"""The archive on an object store (placeholder while it is built)."""

from __future__ import annotations


class Publisher:
    seq: int | None = None

    def horizon(self, contract_id: int, tick_type: str) -> int | None:
        return None


class Replica:
    seq: int | None = None

    def require(self, seq: int) -> None:
        pass
