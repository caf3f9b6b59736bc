"""Segment writer: ticks appended to Arrow IPC *stream* files per contract and tick type.

Layout: ``{data_root}/buffer/{contract_id}/{tick_type}/{YYYYmmddTHHMMSS}Z-{seq:04d}.arrows``;
the name holds the UTC start of the rotation bucket the segment covers. Segments rotate at
UTC multiples of ``rotation_interval`` (which divides an hour, so a segment never straddles
an hour) and when they grow past ``segment_max_bytes``.

Group commit: :meth:`SegmentWriter.append` writes a whole batch, fsyncs it (policy
``fsync="batch"``) and only then returns: the ticks are *acknowledged*. A crash can only
leave a torn last message in the newest segment of a stream; :func:`recover_segment`
truncates it on the next start, and readers stop at it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from ibstream.errors import CorruptFileError, SealedHourError, TickOrderError
from ibstream.settings import Settings
from storage.failpoints import failpoint
from storage.schemas import TickType, schema_for
from storage.times import US_PER_SECOND, duration_us, iso

log = logging.getLogger(__name__)


SUFFIX = ".arrows"


@dataclass(frozen=True, order=True)
class StreamKey:
    """One stored stream: a contract and a tick type."""

    contract_id: int
    tick_type: TickType

    def __str__(self) -> str:
        return f"{self.contract_id}/{self.tick_type.value}"


# ---------------------------------------------------------------------------------------------
# Naming


def stream_dir(buffer_root: Path, key: StreamKey) -> Path:
    return buffer_root / str(key.contract_id) / key.tick_type.value


def segment_name(bucket_start_us: int, seq: int) -> str:
    stamp = datetime.fromtimestamp(bucket_start_us // US_PER_SECOND, UTC).strftime("%Y%m%dT%H%M%S")
    return f"{stamp}Z-{seq:04d}{SUFFIX}"


def segment_start_us(path: Path) -> int:
    """UTC start (microseconds) of the rotation bucket a segment file covers."""
    s = path.name  # YYYYmmddTHHMMSSZ-seq.arrows
    moment = datetime(int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[9:11]), int(s[11:13]), int(s[13:15]), tzinfo=UTC)
    return int(moment.timestamp()) * US_PER_SECOND


def list_segments(directory: Path) -> list[Path]:
    """The segment files of a stream, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))


def list_streams(buffer_root: Path) -> list[StreamKey]:
    keys = []
    if not buffer_root.is_dir():
        return keys
    for contract in buffer_root.iterdir():
        if not contract.name.isdigit():
            continue
        for tick_dir in contract.iterdir():
            if tick_dir.name in TickType._value2member_map_:
                keys.append(StreamKey(int(contract.name), TickType(tick_dir.name)))
    return sorted(keys)


# ---------------------------------------------------------------------------------------------
# Reading and recovery


def read_segment(path: Path, source: pa.NativeFile | None = None) -> tuple[list[pa.RecordBatch], int]:
    """Complete record batches of a segment (memory-mapped, zero-copy) and its valid length.

    Reading stops at the first incomplete message: a torn tail after a crash, or a batch that
    another process is writing right now. ``source`` is an already opened map of ``path``.
    """
    source = pa.memory_map(str(path), "r") if source is None else source
    source.seek(0)
    batches: list[pa.RecordBatch] = []
    valid = 0
    try:
        messages = pa.ipc.MessageReader.open_stream(source)
        schema_message = messages.read_next_message()
        schema = pa.ipc.read_schema(schema_message)
        valid = source.tell()
        while True:
            message = messages.read_next_message()
            batches.append(pa.ipc.read_record_batch(message, schema))
            valid = source.tell()
    except StopIteration:
        valid = source.tell()  # clean end: end-of-stream marker or end of file
    except (OSError, pa.ArrowInvalid) as exc:
        if valid == 0:
            size = path.stat().st_size
            if size == 0:
                return [], 0
            raise CorruptFileError(f"segment {path} has no readable schema ({exc}); move it aside") from exc
    return batches, valid


def recover_segment(path: Path) -> int:
    """Truncate a torn tail; returns the number of bytes dropped (0 when the file was whole)."""
    size = path.stat().st_size
    try:
        batches, valid = read_segment(path)
    except CorruptFileError:
        valid, batches = 0, []
    if valid == size:
        return 0
    if valid == 0:
        path.unlink()
        log.warning("removed segment %s: %d bytes with no complete schema (torn at creation)", path, size)
        return size
    with open(path, "r+b") as handle:
        handle.truncate(valid)
        os.fsync(handle.fileno())
    log.warning(
        "recovered segment %s: dropped a torn tail of %d bytes; kept %d batches (%d ticks)",
        path, size - valid, len(batches), sum(b.num_rows for b in batches),
    )
    return size - valid


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class _OpenSegment:
    path: Path
    bucket_start_us: int
    handle: object
    writer: pa.ipc.RecordBatchStreamWriter
    batches: list[pa.RecordBatch] = field(default_factory=list)

    def size(self) -> int:
        return self.handle.tell()


@dataclass
class StreamSnapshot:
    """What a reader may use of a stream at one instant: closed segments and the open tail."""

    closed: list[Path]
    open_batches: list[pa.RecordBatch]
    open_path: Path | None


class _Stream:
    def __init__(self, key: StreamKey, directory: Path, sealed_until_us: int):
        self.key = key
        self.directory = directory
        self.schema = schema_for(key.tick_type)
        self.write_lock = threading.Lock()  # one append / seal at a time
        self.state_lock = threading.Lock()  # guards what readers see
        self.open: _OpenSegment | None = None
        self.closed: list[Path] = list_segments(directory)
        self.last_ts = -(2**63)
        self.sealed_until_us = sealed_until_us
        self.acknowledged = 0
        self.subscribers: list = []  # storage.live.Subscription: offered each batch readers can see
        for path in reversed(self.closed):  # the newest segment may hold no batch (crash after creation)
            non_empty = [b for b in read_segment(path)[0] if b.num_rows]
            if non_empty:
                self.last_ts = non_empty[-1].column("ts").cast(pa.int64())[-1].as_py()
                break


class SegmentWriter:
    """Appends acknowledged batches to per-stream IPC segments. Thread-safe."""

    def __init__(self, settings: Settings, sealed_until: dict[StreamKey, int] | None = None):
        self.settings = settings
        self.root = settings.buffer_root
        self.interval_us = duration_us(settings.rotation_interval)
        self._sealed_until = dict(sealed_until or {})
        self._streams: dict[StreamKey, _Stream] = {}
        self._lock = threading.Lock()
        self.forget_listeners: list = []  # called with the paths of segments the archiver removed
        for key in list_streams(self.root):
            segments = list_segments(stream_dir(self.root, key))
            if segments:
                recover_segment(segments[-1])

    # -- public ------------------------------------------------------------------------------

    def append(self, contract_id: int, tick_type: TickType | str, data: pa.RecordBatch | pa.Table) -> int:
        """Write ticks durably; returns how many were acknowledged (all, or an error is raised).

        ``data`` must have the tick type's schema and ``ts`` non-decreasing, continuing from the
        stream's last acknowledged tick.
        """
        key = StreamKey(int(contract_id), TickType.parse(str(tick_type)))
        stream = self._stream(key)
        batch = _as_batch(data, stream.schema)
        if batch.num_rows == 0:
            return 0
        ts = batch.column("ts").cast(pa.int64()).to_numpy()
        with stream.write_lock:
            self._check_order(stream, ts)
            for piece, bucket in self._split_by_bucket(batch, ts):
                self._write(stream, piece, bucket)
            stream.last_ts = int(ts[-1])
            stream.acknowledged += batch.num_rows
        return batch.num_rows

    def seal(self, key: StreamKey, until_us: int) -> None:
        """Close the open segment if it lies before ``until_us`` and refuse ticks before it."""
        stream = self._stream(key)
        with stream.write_lock:
            stream.sealed_until_us = max(stream.sealed_until_us, until_us)
            if stream.open and stream.open.bucket_start_us < until_us:
                self._rotate(stream)

    def snapshot(self, key: StreamKey) -> StreamSnapshot:
        with self.stream_state(key) as snapshot:
            return snapshot

    @contextmanager
    def stream_state(self, key: StreamKey, subscription=None) -> Iterator[StreamSnapshot]:
        """A snapshot of the stream, with archival and rotation held off until the block exits.

        A ``subscription`` (:class:`storage.live.Subscription`) registered here is offered every
        batch acknowledged after the snapshot, and none in it.
        """
        stream = self._stream(key)
        with stream.state_lock:
            if subscription is not None:
                stream.subscribers.append(subscription)
            open_path = stream.open.path if stream.open else None
            batches = list(stream.open.batches) if stream.open else []
            yield StreamSnapshot(list(stream.closed), batches, open_path)

    def unsubscribe(self, key: StreamKey, subscription) -> None:
        stream = self._stream(key)
        with stream.state_lock:
            stream.subscribers = [s for s in stream.subscribers if s is not subscription]

    def forget_segments(self, key: StreamKey, paths: list[Path]) -> None:
        """Drop archived segments from the readers' view and delete them."""
        stream = self._stream(key)
        doomed = set(paths)
        with stream.state_lock:
            stream.closed = [p for p in stream.closed if p not in doomed]
        for listener in self.forget_listeners:
            listener(paths)
        for path in paths:
            path.unlink(missing_ok=True)

    def streams(self) -> list[StreamKey]:
        with self._lock:
            known = set(self._streams)
        return sorted(known | set(list_streams(self.root)))

    def schema(self, key: StreamKey) -> pa.Schema:
        return self._stream(key).schema

    def acknowledged(self, key: StreamKey) -> int:
        return self._stream(key).acknowledged

    def close(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            with stream.write_lock:
                if stream.open:
                    self._rotate(stream)

    # -- internals ---------------------------------------------------------------------------

    def _stream(self, key: StreamKey) -> _Stream:
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                directory = stream_dir(self.root, key)
                stream = _Stream(key, directory, self._sealed_until.get(key, -(2**63)))
                self._streams[key] = stream
            return stream

    def _check_order(self, stream: _Stream, ts: np.ndarray) -> None:
        if ts[0] < stream.last_ts or (ts.size > 1 and bool(np.any(ts[1:] < ts[:-1]))):
            raise TickOrderError(
                f"stream {stream.key}: ts must be non-decreasing; got {iso(int(ts.min()))} after "
                f"{iso(max(stream.last_ts, int(ts[0])))}. Stamp receive times monotonically "
                "(the recorder holds ts at the last value while the clock steps back)"
            )
        if ts[0] < stream.sealed_until_us:
            raise SealedHourError(
                f"stream {stream.key}: tick at {iso(int(ts[0]))} falls before {iso(stream.sealed_until_us)}, "
                "which is already archived to Parquet; late ticks cannot be appended"
            )

    def _split_by_bucket(self, batch: pa.RecordBatch, ts: np.ndarray):
        first = int(ts[0]) - int(ts[0]) % self.interval_us
        last = int(ts[-1]) - int(ts[-1]) % self.interval_us
        if first == last:
            yield batch, first
            return
        bounds = np.arange(first + self.interval_us, last + 1, self.interval_us)
        cuts = [0, *np.searchsorted(ts, bounds, side="left").tolist(), len(ts)]
        starts = [first, *bounds.tolist()]
        for (lo, hi), bucket in zip(zip(cuts[:-1], cuts[1:]), starts):
            if hi > lo:
                yield batch.slice(lo, hi - lo), bucket

    def _write(self, stream: _Stream, batch: pa.RecordBatch, bucket: int) -> None:
        segment = stream.open
        if segment and (segment.bucket_start_us != bucket or segment.size() >= self.settings.segment_max_bytes):
            self._rotate(stream)
            segment = None
        if segment is None:
            segment = self._create(stream, bucket)
        segment.writer.write_batch(batch)
        segment.handle.flush()
        failpoint("segment.before_fsync")
        if self.settings.fsync == "batch":
            os.fsync(segment.handle.fileno())
        with stream.state_lock:
            segment.batches.append(batch)
            for subscriber in stream.subscribers:
                subscriber.offer(batch)

    def _create(self, stream: _Stream, bucket: int) -> _OpenSegment:
        stream.directory.mkdir(parents=True, exist_ok=True)
        seq = 0
        if stream.closed and segment_start_us(stream.closed[-1]) == bucket:  # buckets never go back
            seq = int(stream.closed[-1].stem.rsplit("-", 1)[1]) + 1
        path = stream.directory / segment_name(bucket, seq)
        handle = open(path, "xb")
        writer = pa.ipc.new_stream(handle, stream.schema)
        handle.flush()
        if self.settings.fsync == "batch":
            os.fsync(handle.fileno())
            fsync_dir(stream.directory)
        segment = _OpenSegment(path, bucket, handle, writer)
        with stream.state_lock:
            stream.open = segment
        return segment

    def _rotate(self, stream: _Stream) -> None:
        segment = stream.open
        assert segment is not None
        segment.writer.close()  # writes the end-of-stream marker
        segment.handle.flush()
        if self.settings.fsync == "batch":
            os.fsync(segment.handle.fileno())
        segment.handle.close()
        with stream.state_lock:
            stream.closed.append(segment.path)
            stream.open = None


def _as_batch(data: pa.RecordBatch | pa.Table, schema: pa.Schema) -> pa.RecordBatch:
    if isinstance(data, pa.Table):
        data = data.combine_chunks().to_batches()[0] if data.num_rows else pa.RecordBatch.from_pylist([], schema)
    if not data.schema.equals(schema):
        if data.schema.names != schema.names:
            raise ValueError(
                f"batch columns were {data.schema.names}; expected {schema.names} "
                f"(schema of {schema.metadata[b'ibstream.tick_type'].decode()})"
            )
        try:
            data = data.cast(schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
            raise ValueError(f"batch does not fit the stored schema: {exc}") from exc
    return data


def ipc_bytes(table: pa.Table) -> bytes:
    """One Arrow IPC stream of ``table``, as bytes (pre-aggregates in the index, action results)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()
