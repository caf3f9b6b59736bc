"""Bytes per tick of the IPC buffer: why small group commits cost ~500 B/tick, and what bounds it.

The recorder flushes every 20 ms, so at a stream's usual rates each acknowledged group commit
(one Arrow IPC record-batch message in a segment) holds one to a few hundred ticks. Synthetic
MNQ ticks at 50, 500 and 5,000 ticks/s are cut into 20 ms group commits and appended through
the store's own SegmentWriter; the segments' bytes are then broken down message by message:

* flatbuffer metadata: the message's header (field nodes, buffer offsets, lengths) with the
  8-byte continuation + length prefix, less the CRC framing;
* CRC framing: the ``ibstream.crc32`` custom-metadata key-value pair every message carries;
* raw column bytes: what the columns hold (8 B per clock, price; 16 B per decimal size; a bit
  per flag; offsets + characters of strings);
* validity bitmaps (none: the columns are non-nullable and Arrow writes no bitmap without nulls);
* padding: every body buffer is padded to 8 bytes (a 1-tick flag column takes 8 bytes, not 1);
* per segment: the schema message and the end-of-stream marker.

Options, every one measured on the same ticks in the same run, as ratios to the baseline (the
current per-commit segments): per-commit IPC body compression (LZ4, ZSTD), coalescing a closed
segment into large batches (uncompressed, LZ4, ZSTD; one batch, or batch_rows / 4,096 rows), a
shorter rotation, and the hourly Parquet archive for reference. "after" is the store's own
coalescing (SegmentWriter.coalesce_closed, run by the archiver) on the segments written.
Last, the buffer's size per stream at its peak (an hour of ticks waiting for archival, plus
archive_delay and one check interval), before and after, for rotation intervals 15, 5, 1 min.
"""

from __future__ import annotations

import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from common import DAY_START_US, header, parse_args, settings  # noqa: E402

from ibstream.core.ticks import TickType  # noqa: E402
from ibstream.storage.archive import parquet_options  # noqa: E402
from ibstream.storage.segments import (  # noqa: E402
    COALESCE_CODEC,
    EOS,
    SegmentWriter,
    encode_batch,
    header_bytes,
    list_segments,
    scan_segment,
    segment_schema,
    stream_dir,
)
from ibstream.storage.synthetic import MNQ, synthetic_ticks  # noqa: E402

RATES = (50, 500, 5_000)  # ticks per second of one stream
FLUSH_US = 20_000  # the recorder's flush_interval
TICK_TYPES = ("bid_ask", "last")
ROTATIONS_MIN = (15, 5, 1)
ARCHIVE_LAG_S = 60 + 30  # archive_delay + archive_check_interval (defaults)


def group_commits(tick_type: str, rate: int, seconds: int) -> tuple[pa.Table, list[pa.RecordBatch]]:
    """``seconds`` of ticks at ``rate`` per second, cut into the recorder's 20 ms flushes."""
    base = MNQ.quotes_per_second if tick_type == "bid_ask" else MNQ.trades_per_second
    count = int(rate * seconds * 1.3) + 10
    table = synthetic_ticks(MNQ, tick_type, DAY_START_US, count, seed=rate, rate_scale=rate / base)
    ts = table.column("ts").cast(pa.int64()).to_numpy()
    table = table.slice(0, int(np.searchsorted(ts, DAY_START_US + seconds * 1_000_000))).combine_chunks()
    ts = ts[:table.num_rows]
    window = ts // FLUSH_US
    cuts = [0, *np.flatnonzero(window[1:] != window[:-1]) + 1, table.num_rows]
    batches = [table.slice(lo, hi - lo).combine_chunks().to_batches()[0] for lo, hi in zip(cuts[:-1], cuts[1:])]
    return table, batches


def raw_bytes(batch: pa.RecordBatch) -> tuple[int, int]:
    """What the columns hold (unpadded) and the validity bitmaps Arrow writes (only with nulls)."""
    raw = validity = 0
    n = batch.num_rows
    for column in batch.columns:
        kind = column.type
        if pa.types.is_boolean(kind):
            raw += -(-n // 8)
        elif pa.types.is_string(kind):
            raw += 4 * (n + 1) + (pc.sum(pc.binary_length(column)).as_py() or 0) if n else 0
        else:
            raw += n * kind.bit_width // 8
        validity += -(-n // 8) if column.null_count else 0
    return raw, validity


def crc_framing(tick_type: TickType) -> int:
    """Metadata bytes the per-message CRC key-value adds (the same for every message)."""
    one = pa.RecordBatch.from_pylist(synthetic_ticks(MNQ, tick_type, DAY_START_US, 1).to_pylist(),
                                     schema=segment_schema(tick_type))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, segment_schema(tick_type)) as writer:
        writer.write_batch(one)
    plain = sink.getvalue().size - len(header_bytes(tick_type)) - len(EOS)
    return len(encode_batch(one, tick_type)) - plain


def breakdown(batches: list[pa.RecordBatch], tick_type: TickType, segments: int) -> dict[str, int]:
    parts = dict.fromkeys(("flatbuffer", "crc", "raw", "validity", "padding", "segment"), 0)
    crc = crc_framing(tick_type)
    for batch in batches:
        message = encode_batch(batch, tick_type)
        metadata = 8 + struct.unpack_from("<i", message, 4)[0]
        raw, validity = raw_bytes(batch)
        parts["flatbuffer"] += metadata - crc
        parts["crc"] += crc
        parts["raw"] += raw
        parts["validity"] += validity
        parts["padding"] += len(message) - metadata - raw - validity
    parts["segment"] = segments * (len(header_bytes(tick_type)) + len(EOS))
    return parts


def encoded(batches: list[pa.RecordBatch], tick_type: TickType, codec: str | None) -> int:
    return sum(len(encode_batch(b, tick_type, codec)) for b in batches)


def coalesced(table: pa.Table, tick_type: TickType, rows: int | None, codec: str | None) -> int:
    pieces = table.to_batches(max_chunksize=rows or table.num_rows)
    return encoded(pieces, tick_type, codec) + len(header_bytes(tick_type)) + len(EOS)


def parquet_bytes(table: pa.Table, root: Path, base_settings) -> int:
    path = root / "hour.parquet"
    options = parquet_options(base_settings, table.schema)
    pq.write_table(table, path, **options)
    return path.stat().st_size


def run(tick_type: str, rate: int, seconds: int, tmp: Path) -> dict:
    kind = TickType(tick_type)
    table, batches = group_commits(tick_type, rate, seconds)
    n = table.num_rows
    store_settings = settings(tmp / f"{tick_type}-{rate}", fsync="none")  # 15-min rotation: one segment here
    writer = SegmentWriter(store_settings)
    started = time.perf_counter()
    for batch in batches:
        writer.append(MNQ.contract_id, tick_type, batch)
    writer.close()
    append_s = time.perf_counter() - started
    paths = list_segments(stream_dir(store_settings.buffer_root, writer.streams()[0]))
    before = sum(p.stat().st_size for p in paths)
    parts = breakdown(batches, kind, len(paths))
    assert sum(parts.values()) == before, (parts, before)
    started = time.perf_counter()
    for path in paths:
        scan_segment(path)
    scan_before = time.perf_counter() - started
    options = {
        "per commit (now)": before,
        "per commit, LZ4 body": encoded(batches, kind, "lz4") + parts["segment"],
        "per commit, ZSTD body": encoded(batches, kind, "zstd") + parts["segment"],
        "per commit, 1-min rotation": before - parts["segment"] + -(-seconds // 60) * (len(header_bytes(kind)) + len(EOS)),
        "coalesced, 1 batch, uncompressed": coalesced(table, kind, None, None),
        "coalesced, 1 batch, LZ4": coalesced(table, kind, None, "lz4"),
        "coalesced, 1 batch, ZSTD": coalesced(table, kind, None, "zstd"),
        f"coalesced, {store_settings.batch_rows:,} rows, ZSTD": coalesced(table, kind, store_settings.batch_rows, "zstd"),
        "coalesced, 4,096 rows, ZSTD": coalesced(table, kind, 4_096, "zstd"),
        "Parquet archive (reference)": parquet_bytes(table, tmp, store_settings),
    }
    reopened = SegmentWriter(store_settings)
    started = time.perf_counter()
    done = reopened.coalesce_closed()
    coalesce_s = time.perf_counter() - started
    after = sum(p.stat().st_size for p in paths)
    started = time.perf_counter()
    after_rows = sum(scan_segment(path).rows() for path in paths)
    scan_after = time.perf_counter() - started
    assert after_rows == n and len(done) == len(paths)
    options[f"after: SegmentWriter.coalesce_closed ({COALESCE_CODEC})"] = after
    return dict(n=n, commits=len(batches), parts=parts, crc=crc_framing(kind), options=options, append_s=append_s,
                coalesce_s=coalesce_s, scan_before=scan_before, scan_after=scan_after, segments=len(paths))


def main(quick: bool = False) -> dict:
    seconds = 30 if quick else 300
    results: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-buffer-") as tmp:
        for tick_type in TICK_TYPES:
            for rate in RATES:
                results[(tick_type, rate)] = run(tick_type, rate, seconds, Path(tmp))
    header(f"buffer: {seconds} s per stream and rate, 20 ms group commits, through SegmentWriter (fsync none)")
    columns = [(t, r) for t in TICK_TYPES for r in RATES]
    labels = [f"{t} {r}/s" for t, r in columns]
    print(f"{'':<44}" + "".join(f"{label:>14}" for label in labels))
    print(f"{'ticks per group commit (mean)':<44}" + "".join(
        f"{results[c]['n'] / results[c]['commits']:>14.1f}" for c in columns))
    print(f"{'per group commit: metadata B (CRC B)':<44}" + "".join(
        f"{(results[c]['parts']['flatbuffer'] + results[c]['parts']['crc']) / results[c]['commits']:>9.0f} "
        f"({results[c]['crc']:>2})" for c in columns))
    print("-- where the bytes of a segment go now, B/tick --")
    names = {"flatbuffer": "IPC flatbuffer metadata (+8 B prefix)", "crc": "CRC framing (custom metadata)",
             "raw": "raw column bytes", "validity": "validity bitmaps", "padding": "8-byte buffer padding",
             "segment": "schema message + end-of-stream"}
    for part, name in names.items():
        print(f"{name:<44}" + "".join(f"{results[c]['parts'][part] / results[c]['n']:>14.1f}" for c in columns))
    print("-- options, B/tick (x: smaller than per commit) --")
    for option in results[columns[0]]["options"]:
        cells = []
        for c in columns:
            value = results[c]["options"][option]
            base = results[c]["options"]["per commit (now)"]
            cells.append(f"{value / results[c]['n']:>7.1f} {base / value:>5.1f}x")
        print(f"{option:<44}" + "".join(f"{cell:>14}" for cell in cells))
    print("-- time --")
    for label, field in (("append, s (all commits)", "append_s"), ("coalesce_closed, s", "coalesce_s"),
                         ("scan_segment before, ms", "scan_before"), ("scan_segment after, ms", "scan_after")):
        scale = 1e3 if "ms" in label else 1
        print(f"{label:<44}" + "".join(f"{results[c][field] * scale:>14.2f}" for c in columns))
    print("-- buffer per stream at its peak (MB): an hour + archive lag; the open segment is per commit --")
    print(f"{'':<44}" + "".join(f"{label:>14}" for label in labels))
    after_key = f"after: SegmentWriter.coalesce_closed ({COALESCE_CODEC})"
    for c in columns:
        results[c]["b_commit"] = results[c]["options"]["per commit (now)"] / results[c]["n"]
        results[c]["b_after"] = results[c]["options"][after_key] / results[c]["n"]
    print(f"{'before (any rotation)':<44}" + "".join(
        f"{results[(t, r)]['b_commit'] * r * (3600 + ARCHIVE_LAG_S) / 1e6:>14.1f}" for t, r in columns))
    for minutes in ROTATIONS_MIN:
        open_s = minutes * 60 + 30  # the open segment, and until the next archiver run coalesces it
        print(f"{f'after, rotation {minutes} min':<44}" + "".join(
            f"{(results[(t, r)]['b_commit'] * open_s + results[(t, r)]['b_after'] * (3600 + ARCHIVE_LAG_S)) * r / 1e6:>14.1f}"
            for t, r in columns))
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
