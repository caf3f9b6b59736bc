"""A reader of a segment another store appends to reads on from where its last scan ended (not the whole file
again each time), with the same ticks as a fresh scan, also when the appended part is damaged."""

from __future__ import annotations

import pyarrow as pa

from ibstream.storage import Store
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, list_segments, scan_segment, stream_dir
from ibstream.storage.synthetic import MNQ
from tests.helpers import EVERYTHING, ticks, utc

T0 = utc(2025, 1, 10, 14, 1)


def test_a_growing_segment_is_read_on_exactly(settings):
    quotes = ticks(T0, 6_000)
    with Store(settings) as writer, Store(settings, read_only=True) as reader:
        for i in range(0, 6_000, 500):
            writer.append(MNQ.contract_id, "bid_ask", quotes.slice(i, 500))
            got = reader.read(MNQ.contract_id, "bid_ask", *EVERYTHING)
            assert got.equals(quotes.slice(0, i + 500))
        segment = list_segments(stream_dir(settings.buffer_root, StreamKey(MNQ.contract_id, TickType.BID_ASK)))[-1]
        first = scan_segment(segment)
        assert first.whole and first.batches
        resumed = scan_segment(segment, after=first)  # nothing appended since: nothing new
        assert resumed.batches == [] and resumed.valid_end == first.valid_end


def test_damage_in_the_appended_part_is_found_when_read_on(settings):
    quotes = ticks(T0, 2_000)
    with Store(settings) as writer, Store(settings, read_only=True) as reader:
        writer.append(MNQ.contract_id, "bid_ask", quotes.slice(0, 1_000))
        assert reader.read(MNQ.contract_id, "bid_ask", *EVERYTHING).num_rows == 1_000
        (segment,) = list_segments(stream_dir(settings.buffer_root, StreamKey(MNQ.contract_id, TickType.BID_ASK)))
        clean_end = scan_segment(segment).valid_end
        writer.append(MNQ.contract_id, "bid_ask", quotes.slice(1_000, 500))
        writer.append(MNQ.contract_id, "bid_ask", quotes.slice(1_500, 500))
        with open(segment, "r+b") as handle:  # flip bytes inside the first appended batch
            handle.seek(clean_end + 400)
            byte = handle.read(1)
            handle.seek(clean_end + 400)
            handle.write(bytes([byte[0] ^ 0xFF]))
        fresh = scan_segment(segment)
        assert fresh.damaged
        got = reader.read(MNQ.contract_id, "bid_ask", *EVERYTHING)
        assert got.num_rows == sum(b.num_rows for b in fresh.batches) == 1_500
        assert got.equals(pa.concat_tables([quotes.slice(0, 1_000), quotes.slice(1_500, 500)]))
