"""IB API framing, both directions: a 4-byte big-endian length, then that many bytes.

The recorder's socket reader and the gateway simulator cut and build frames with these two
functions; what a frame's bytes hold (NUL-terminated fields) is theirs to read.
"""

from __future__ import annotations

import struct

MAX_FRAME_BYTES = 0xFFFFFF  # ibapi's MAX_MSG_LEN: a larger frame means the stream is out of step
_LENGTH = struct.Struct("!I")


class FrameTooLargeError(ValueError):
    """A length prefix over :data:`MAX_FRAME_BYTES`: the byte stream is out of step."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"frame of {size} bytes is over the {limit} byte limit")
        self.size, self.limit = size, limit


def frame(payload: bytes) -> bytes:
    """``payload`` with its length prefix."""
    return _LENGTH.pack(len(payload)) + payload


def split_frames(buffer: bytearray, limit: int = MAX_FRAME_BYTES) -> list[bytes]:
    """The complete frames' payloads at the start of ``buffer``, removed from it (a partial frame
    stays for the next read). Cuts by offset, so a large buffer costs linear time."""
    frames = []
    offset, end = 0, len(buffer)
    try:
        while end - offset >= 4:
            (size,) = _LENGTH.unpack_from(buffer, offset)
            if size > limit:
                raise FrameTooLargeError(size, limit)
            if end - offset - 4 < size:
                break
            frames.append(bytes(buffer[offset + 4:offset + 4 + size]))
            offset += 4 + size
    finally:
        del buffer[:offset]
    return frames
