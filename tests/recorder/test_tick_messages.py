"""The recorder's one-pass TICK_BY_TICK decoder against ``ibapi``'s own: on every generated frame it
takes, the values are the ones ``ibapi``'s callback receives; a frame it leaves is decoded by ``ibapi``."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from ibapi import comm
from ibapi.decoder import Decoder
from ibapi.server_versions import MAX_CLIENT_VER
from ibapi.wrapper import EWrapper

from ibstream.recorder.tick_messages import decode_tick_by_tick


class _Recorded(EWrapper):
    """What ibapi hands the callbacks, in the sink's order (as recorder/ib.py's callbacks pass it on)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def tickByTickBidAsk(self, reqId, time, bidPrice, askPrice, bidSize, askSize, tickAttribBidAsk):
        self.calls.append((reqId, 3, time, (bidPrice, askPrice, bidSize, askSize, tickAttribBidAsk.bidPastLow,
                                            tickAttribBidAsk.askPastHigh)))

    def tickByTickAllLast(self, reqId, tickType, time, price, size, tickAttribLast, exchange, specialConditions):
        self.calls.append((reqId, tickType, time, (price, size, exchange, specialConditions, tickAttribLast.pastLimit,
                                                   tickAttribLast.unreported)))

    def tickByTickMidPoint(self, reqId, time, midPoint):
        self.calls.append((reqId, 4, time, (midPoint,)))

    def error(self, *args):
        self.calls.append(("error", *args))


def by_ibapi(text: bytes) -> tuple[list[tuple], type | None]:
    wrapper = _Recorded()
    try:
        Decoder(wrapper, MAX_CLIENT_VER).interpret(comm.read_fields(text))
    except Exception as exc:  # what the recorder's message loop would log and skip
        return wrapper.calls, type(exc)
    return wrapper.calls, None


def same(a: tuple, b: tuple) -> bool:
    """Equal, and of the same types (1 vs 1.0 vs True differ; NaN equals NaN)."""
    return repr(a) == repr(b) and [type(v) for v in a[3]] == [type(v) for v in b[3]]


numbers = st.one_of(st.integers(-2**63, 2**63).map(str), st.floats(allow_nan=True).map(repr),
                    st.decimals(allow_nan=False, allow_infinity=False, places=4).map(str), st.just(""))
text = st.one_of(st.text(st.characters(codec="utf-8", exclude_characters="\0"), max_size=8).map(lambda s: s.encode()),
                 st.binary(max_size=6).map(lambda b: b.replace(b"\0", b"")), st.sampled_from([b"ISLAND", b"", b"CME"]))


@st.composite
def frames(draw, well_formed: bool = False) -> bytes:
    """A well-formed frame of a random tick type; unless ``well_formed``, with up to three of its fields
    replaced by any number or text, dropped or added, its tick type changed, or its last separator gone."""
    ints = st.integers(0, 2**31).map(str).map(str.encode)
    prices, mask = st.floats(0, 1e6, allow_nan=False).map(repr).map(str.encode), st.sampled_from([b"0", b"1", b"2", b"3"])
    kind = draw(st.sampled_from([b"1", b"2", b"3", b"4"]))
    values = {b"1": [prices, ints, mask, text, text], b"2": [prices, ints, mask, text, text],
              b"3": [prices, prices, ints, ints, mask], b"4": [prices]}[kind]
    fields = [b"99", draw(ints), kind, draw(ints)] + [draw(v) for v in values]
    if well_formed:
        return b"\0".join(fields) + b"\0"
    anything = st.one_of(numbers.map(str.encode), text)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(1, len(fields)))
        change = draw(st.sampled_from(["replace", "drop", "add", "kind"]))
        if change == "kind":
            fields[2] = draw(st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"", b"x", b" 3"]))
        elif change == "add" or at == len(fields):
            fields.insert(at, draw(anything))
        elif change == "drop":
            del fields[at]
        else:
            fields[at] = draw(anything)
    return b"\0".join(fields) + draw(st.sampled_from([b"\0", b"\0", b""]))


@settings(max_examples=3000, deadline=None)
@given(frames())
def test_every_frame_it_takes_decodes_as_ibapi_decodes_it(frame):
    ours = decode_tick_by_tick(frame)
    if ours is None:
        return  # left to ibapi: the recorder calls ibapi's decoder on it, so the behaviour is ibapi's
    calls, raised = by_ibapi(frame)
    assert raised is None and len(calls) == 1 and same(ours, calls[0]), (frame, ours, calls, raised)


@settings(max_examples=1000, deadline=None)
@given(frames(well_formed=True))
def test_it_takes_every_well_formed_tick(frame):
    ours = decode_tick_by_tick(frame)
    assert ours is not None, frame
    (expected,), raised = by_ibapi(frame)
    assert raised is None and same(ours, expected)


def test_exact_values_of_each_tick_type():
    assert decode_tick_by_tick(b"99\x007\x003\x001733000000\x0021000.25\x0021000.5\x004\x0012\x003\x00") == (
        7, 3, 1733000000, (21000.25, 21000.5, 4, 12, True, True))
    assert decode_tick_by_tick(b"99\x008\x001\x001733000001\x00189.5\x00100\x002\x00ISLAND\x00 T\x00") == (
        8, 1, 1733000001, (189.5, 100, "ISLAND", " T", False, True))
    assert decode_tick_by_tick(b"99\x009\x004\x001733000002\x00189.505\x00") == (9, 4, 1733000002, (189.505,))
    assert decode_tick_by_tick(b"99\x009\x004\x001733000002\x00189.505") is None  # no trailing separator: ibapi's
    assert decode_tick_by_tick(b"99\x009\x000\x001733000002\x00") is None  # tick type 0: ibapi's no-op
