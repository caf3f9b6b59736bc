"""How sizes read in logs and CLI output."""

from __future__ import annotations


def byte_text(n: int) -> str:
    """A byte count for people: ``12.3 MB`` (MiB), or ``1.5 GB`` (GiB) from one GiB up."""
    return f"{n / 2**30:,.1f} GB" if n >= 2**30 else f"{n / 2**20:,.1f} MB"
