"""IB API framing: a 4-byte big-endian length, then NUL-terminated ASCII fields.

The client opens with ``API\\0`` and one framed ``v{min}..{max}`` version range; from then on
every message in both directions is a frame whose first field is the message id
(``ibapi.message.IN`` from the gateway, ``ibapi.message.OUT`` to it).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from ibstream.core.framing import MAX_FRAME_BYTES, FrameTooLargeError, split_frames
from ibstream.core.framing import frame as length_prefixed

HANDSHAKE_PREFIX = b"API\0"


class WireError(ValueError):
    """Bytes that do not follow the IB API framing."""


def field(value: object) -> str:
    """One field as the gateway writes it: bools as 0/1, floats in shortest round-trip form."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def size_text(column: pa.ChunkedArray | pa.Array) -> list:
    """Sizes as integers when whole. Fractional sizes go out as plain decimals, which only API 163+
    clients decode (ibapi 9.81 reads sizes with int() and skips such a message as malformed)."""
    try:
        return pc.cast(column, pa.int64()).to_pylist()
    except pa.ArrowInvalid:
        return [format(value.normalize(), "f") for value in column.to_pylist()]


def frame(*fields: object) -> bytes:
    """A length-prefixed message of NUL-terminated fields."""
    return length_prefixed("".join(field(f) + "\0" for f in fields).encode("ascii", errors="backslashreplace"))


class FrameReader:
    """Splits a byte stream into frames; ``feed`` bytes, iterate complete frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        try:
            return split_frames(self._buffer, MAX_FRAME_BYTES)
        except FrameTooLargeError as exc:
            raise WireError(str(exc)) from None


def fields_of(payload: bytes) -> list[str]:
    """The fields of a frame's payload (the trailing NUL leaves an empty last piece)."""
    parts = payload.decode("ascii", errors="replace").split("\0")
    return parts[:-1] if parts and parts[-1] == "" else parts


def parse_version_range(text: str) -> tuple[int, int]:
    """``v100..157`` (optionally followed by connection options) -> (100, 157)."""
    head = text.split(" ", 1)[0]
    if not head.startswith("v") or ".." not in head:
        raise WireError(f"expected a version range like 'v100..157', got {text!r}")
    low, _, high = head[1:].partition("..")
    return int(low), int(high)
