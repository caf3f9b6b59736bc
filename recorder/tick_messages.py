"""IB's TICK_BY_TICK messages (id 99) decoded in one pass, exactly as ``ibapi`` decodes them.

The recorder's hot path. ``ibapi`` 9.81's ``Decoder.interpret`` splits the frame, looks the handler
up, decodes field by field through ``utils.decode`` (one debug-log call each) and builds a
``TickAttribBidAsk`` before the callback. :func:`decode_tick_by_tick` does the same conversions
(``int(field or 0)``, ``float(field or 0)``, text with ``errors="backslashreplace"``, the attribute
bits of the mask) on one ``split``, about 2.5x as fast (``bench/bench_ingest.py``), and hands back
the values in the order of :class:`~recorder.feed.TickSink`'s methods.

It takes only the well-formed messages of the three tick types the recorder records: the exact
number of fields, a trailing separator, values that convert. Anything else returns None and goes
through ``ibapi``'s own decoder, so every oddity (missing or extra fields, tick type 0, bad
numbers) is handled exactly as ``ibapi`` handles it. ``tests/recorder/test_tick_messages.py``
holds the two equal on generated messages, valid and malformed (the ``ibapi`` version is pinned).
"""

from __future__ import annotations

HEAD = b"99\0"  # IN.TICK_BY_TICK and its separator: how every tick-by-tick frame starts
LAST, ALL_LAST, BID_ASK, MID_POINT = 1, 2, 3, 4  # the message's tick type field
_FIELDS = {LAST: 10, ALL_LAST: 10, BID_ASK: 10, MID_POINT: 6}  # pieces of split(b"\0"), the empty last one included


def decode_tick_by_tick(text: bytes) -> tuple | None:
    """``(req_id, tick_type, time, values)`` of a TICK_BY_TICK frame, ``values`` as the sink takes them:
    BidAsk ``(bid, ask, bid_size, ask_size, bid_past_low, ask_past_high)``; Last / AllLast
    ``(price, size, exchange, special_conditions, past_limit, unreported)``; MidPoint ``(mid_point,)``.
    None when ``ibapi`` should decode it (see the module)."""
    fields = text.split(b"\0")
    try:
        kind = int(fields[2] or 0)
        if len(fields) != _FIELDS.get(kind) or fields[-1]:
            return None
        head = int(fields[1] or 0), kind, int(fields[3] or 0)
        if kind == BID_ASK:
            mask = int(fields[8] or 0)
            return (*head, (float(fields[4] or 0), float(fields[5] or 0), int(fields[6] or 0), int(fields[7] or 0),
                            mask & 1 != 0, mask & 2 != 0))
        if kind == MID_POINT:
            return (*head, (float(fields[4] or 0),))
        mask = int(fields[6] or 0)
        return (*head, (float(fields[4] or 0), int(fields[5] or 0), fields[7].decode(errors="backslashreplace"),
                        fields[8].decode(errors="backslashreplace"), mask & 1 != 0, mask & 2 != 0))
    except (ValueError, IndexError):
        return None
