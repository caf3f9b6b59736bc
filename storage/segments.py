"""Segment writer: ticks appended to Arrow IPC *stream* files per contract and tick type.

Layout: ``{data_root}/buffer/{contract_id}/{tick_type}/{YYYYmmddTHHMMSS}Z-{seq:04d}.arrows``;
the name holds the UTC start of the rotation bucket the segment covers and a sequence number
that grows with every segment a stream gets. Segments rotate at UTC multiples of
``rotation_interval`` (which divides an hour, so a segment never straddles an hour) and when
they grow past ``segment_max_bytes``. Readers order a stream's segments by their contents
(first and last ``ts``, then ``seq``), never by name alone, so a changed rotation interval or a
restored backup cannot reorder ticks.

Every record batch carries a CRC-32 of its whole IPC message in its custom metadata
(``ibstream.crc32``, eight hex digits, computed with the digits set to ``00000000``), so a
reader tells a torn tail (an incomplete last message: a crash mid-write) from damage (a complete
message that fails its checksum, anywhere). Plain Arrow readers ignore the key.

Group commit: :meth:`SegmentWriter.append` writes a whole batch, fsyncs it (policy
``fsync="batch"``) and only then returns: the ticks are *acknowledged*; the segment is then touched
(its mtime), which wakes live readers in other processes (storage/live.py). A failed write or fsync
(disk full, I/O error) is undone by truncating the segment back to its last acknowledged byte,
and is raised as :class:`~ibstream.core.errors.StorageUnavailableError`; nothing of it is
acknowledged. On start, :class:`SegmentWriter` checks every segment: a torn tail of a stream's
newest segment is cut (never acknowledged); damaged bytes anywhere are moved to the quarantine
with a note, the readable batches on both sides stay in service, and the damaged span is
reported (coverage ``damaged``).

Coalescing: a group commit is one IPC message, and each message carries ~550 B of flatbuffer
metadata (a field node and two buffer descriptors per column, the CRC key-value) whatever its
row count; at the recorder's 5 ms flushes a stream's commits hold one to a few dozen ticks, so
the open segment costs 70-570 B/tick against ~64 B/tick of column data (bench/bench_buffer.py).
Once a segment is closed, :meth:`SegmentWriter.coalesce_closed` (the archiver runs it after each
pass, off the ingest path) rewrites it as batches of ``batch_rows`` rows with ZSTD IPC body
compression (5-9 B/tick): copy written to ``<name>.arrows.tmp``, fsynced, read back and
compared row for row, renamed over the original, folder fsynced. A crash before the rename
leaves the original (recovery removes the copy); after it, the copy, which holds the same ticks.
Damaged segments are left as they are for the quarantine; a disk that refuses the copy leaves
the original in place (logged once per change). Plain Arrow readers (pyarrow, polars) read
compressed segments as they read the others.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa

from ibstream.core.errors import SealedHourError, StorageUnavailableError, TickOrderError
from ibstream.core.ticks import StreamKey, TickType
from ibstream.core.times import US_PER_SECOND, as_micros, duration_us, iso, now_us
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import failpoint, fsync, io_faults, write_all
from ibstream.storage.quarantine import Damage, damage_note, quarantine_file
from ibstream.storage.schemas import schema_for

log = logging.getLogger(__name__)


SUFFIX = ".arrows"
TMP_SUFFIX = ".tmp"
CRC_KEY = "ibstream.crc32"
FORMAT_KEY = b"ibstream.checksums"  # in a segment's schema: every batch carries CRC_KEY
PLACEHOLDER = b"00000000"
CONTINUATION = b"\xff\xff\xff\xff"
EOS = CONTINUATION + b"\x00\x00\x00\x00"
_CRC_VALUE = re.compile(rb"\x08\x00\x00\x00([0-9a-f]{8})\x00")  # a flatbuffer string of 8 hex digits
NO_TS = -(2**63)
_PLACEHOLDER_METADATA = {CRC_KEY: PLACEHOLDER.decode()}


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


def segment_seq(path: Path) -> int:
    return int(path.name[: -len(SUFFIX)].rsplit("-", 1)[1])


_SEGMENT_NAME = re.compile(r"\d{8}T\d{6}Z-\d+" + re.escape(SUFFIX))


def list_segments(directory: Path) -> list[Path]:
    """The segment files of a stream, by name (bucket, then seq); readers order them by :func:`stream_order`.
    Files whose names ibstream does not write are left alone (the writer reports them on start)."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _SEGMENT_NAME.fullmatch(p.name))


def foreign_files(directory: Path) -> list[Path]:
    """Files in a stream's folder that ibstream did not write (a copy, a note): never touched."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir()
                  if not _SEGMENT_NAME.fullmatch(p.name) and not p.name.endswith(SUFFIX + TMP_SUFFIX))


def list_streams(buffer_root: Path, contract_id: int | None = None) -> list[StreamKey]:
    """The streams with a buffer folder (only ``contract_id``'s, if given: one folder listed)."""
    keys: list[StreamKey] = []
    if not buffer_root.is_dir():
        return keys
    contracts = buffer_root.iterdir() if contract_id is None else [buffer_root / str(contract_id)]
    for contract in contracts:
        if not contract.name.isdigit() or not contract.is_dir():
            continue
        for tick_dir in contract.iterdir():
            if tick_dir.name in TickType._value2member_map_:
                keys.append(StreamKey(int(contract.name), TickType(tick_dir.name)))
    return sorted(keys)


def key_of(path: Path) -> StreamKey:
    """The stream a segment file belongs to, from its folders."""
    return StreamKey(int(path.parent.parent.name), TickType(path.parent.name))


# ---------------------------------------------------------------------------------------------
# Encoding


@lru_cache(maxsize=None)
def segment_schema(tick_type: TickType) -> pa.Schema:
    """The schema a segment file starts with: the tick type's, marked as carrying checksums."""
    schema = schema_for(tick_type)
    return schema.with_metadata({**schema.metadata, FORMAT_KEY: b"crc32"})


@lru_cache(maxsize=None)
def header_bytes(tick_type: TickType) -> bytes:
    return segment_schema(tick_type).serialize().to_pybytes()


def _crc(message: memoryview, at: int) -> int:
    """CRC-32 of a message with its eight checksum digits (at ``at``) read as the placeholder."""
    crc = zlib.crc32(message[:at])
    crc = zlib.crc32(PLACEHOLDER, crc)
    return zlib.crc32(message[at + 8:], crc)


@lru_cache(maxsize=None)
def _ipc_options(compression: str | None) -> pa.ipc.IpcWriteOptions:
    return pa.ipc.IpcWriteOptions(compression=compression)


def encode_batch(batch: pa.RecordBatch, tick_type: TickType, compression: str | None = None) -> bytes:
    """One IPC record-batch message of ``batch`` with its CRC-32 in its custom metadata; ``compression``
    (``"zstd"``, ``"lz4"``) compresses its body buffers (Arrow IPC body compression)."""
    sink = pa.BufferOutputStream()
    writer = pa.ipc.new_stream(sink, segment_schema(tick_type), options=_ipc_options(compression))
    writer.write_batch(batch, custom_metadata=_PLACEHOLDER_METADATA)
    writer.close()
    stream = sink.getvalue()
    message = memoryview(stream).cast("B")[len(header_bytes(tick_type)):stream.size - len(EOS)]
    metadata_end = 8 + struct.unpack_from("<i", message, 4)[0]
    found = _CRC_VALUE.search(message, 8, metadata_end)
    assert found is not None and found.group(1) == PLACEHOLDER
    at = found.start(1)
    return b"".join((message[:at], b"%08x" % _crc(message, at), message[at + 8:]))


# ---------------------------------------------------------------------------------------------
# Reading and checking


@dataclass
class SegmentScan:
    """What a segment file holds: its verified batches and, byte by byte, what is wrong with it.

    ``valid_end`` is the end of the last good message (where a torn tail starts); ``damaged``
    lists byte ranges ``[start, end)`` that failed their checksum or could not be decoded, each
    with the index of the batch that follows it.
    """

    path: Path
    size: int
    batches: list[pa.RecordBatch] = field(default_factory=list)
    valid_end: int = 0
    damaged: list[tuple[int, int, int]] = field(default_factory=list)  # (start, end, batch index after)
    torn_tail: int = 0  # bytes of an incomplete last message
    ended: bool = False  # has its end-of-stream marker
    header_ok: bool = True
    checksummed: bool = True  # written with per-batch checksums (older segments were not)

    @property
    def whole(self) -> bool:
        return not self.damaged and not self.torn_tail and self.header_ok

    def first_ts(self) -> int:
        return next((_ts(b, 0) for b in self.batches if b.num_rows), NO_TS)

    def last_ts(self) -> int:
        return next((_ts(b, -1) for b in reversed(self.batches) if b.num_rows), NO_TS)

    def rows(self) -> int:
        return sum(b.num_rows for b in self.batches)


def _ts(batch: pa.RecordBatch, row: int) -> int:
    return batch.column("ts").cast(pa.int64())[row].as_py()


class _Bad(Exception):
    """A message that is complete but fails its checksum or cannot be decoded."""


class _Incomplete(Exception):
    """A message that runs past the end of the file."""


def _message_at(data: memoryview, pos: int, schema: pa.Schema, checksummed: bool
                ) -> tuple[pa.RecordBatch | None, int]:
    """The batch at ``pos`` (None for the end-of-stream marker) and the message's length."""
    size = len(data)
    if size - pos < 8:
        raise _Incomplete
    if data[pos:pos + 4] != CONTINUATION:
        raise _Bad("no message marker")
    (length,) = struct.unpack_from("<i", data, pos + 4)
    if length == 0:
        return None, 8
    if length < 0 or length % 8:
        raise _Bad(f"implausible metadata length {length}")
    if pos + 8 + length > size:
        raise _Incomplete
    try:
        message = pa.ipc.read_message(pa.py_buffer(data[pos:]))
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        if "expected to be able to read" in str(exc).lower() or "end of" in str(exc).lower():
            raise _Incomplete from None
        raise _Bad(str(exc)) from None
    total = 8 + length + message.body.size
    if pos + total > size:
        raise _Incomplete
    if message.type != "record batch":
        raise _Bad(f"a {message.type} message where a record batch belongs")
    whole = data[pos:pos + total]
    found = _CRC_VALUE.search(whole, 8, 8 + length)
    if found is None:
        if checksummed:
            raise _Bad("no checksum")
    elif int(found.group(1), 16) != _crc(whole, found.start(1)):
        raise _Bad("checksum mismatch")
    try:
        batch = pa.ipc.read_record_batch(message, schema)
        batch.validate(full=not checksummed)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise _Bad(str(exc)) from None
    return batch, total


def _resync(data: memoryview, start: int, schema: pa.Schema, checksummed: bool) -> int | None:
    """The offset of the next good message after ``start`` (None: none in the file)."""
    rest = bytes(data[start + 1:])  # the rest of the file: small for a torn tail, copied once for damage
    at = 0
    while (at := rest.find(CONTINUATION, at)) != -1:
        offset = start + 1 + at
        try:
            batch, _ = _message_at(data, offset, schema, checksummed)
            if batch is not None or offset + 8 == len(data):
                return offset
        except (_Bad, _Incomplete):
            pass
        at += 1
    return None


def scan_segment(path: Path, source: pa.NativeFile | None = None, *, after: SegmentScan | None = None) -> SegmentScan:
    """Read and check a segment: every good batch, the torn tail, the damaged byte ranges.

    ``source`` is an already opened memory map of ``path``; a file another process is appending
    to reads up to its last complete message (a message in flight reads as a torn tail). ``after``,
    an earlier clean scan of the same growing file (see :func:`resumes`), makes this one read on from
    where that one ended: its ``batches`` are then only the ones appended since.
    """
    tick_type = key_of(path).tick_type
    schema = schema_for(tick_type)
    source = pa.memory_map(str(path), "r") if source is None else source
    data = memoryview(source.read_buffer(source.size()) if source.size() else b"").cast("B")
    source.seek(0)
    scan = SegmentScan(path, len(data))
    if not data:
        return scan
    if after is not None and resumes(after, len(data)):
        scan.checksummed = after.checksummed
        pos: int | None = after.valid_end
    else:
        pos = _header_end(data, tick_type, scan)
    if pos is None:  # unreadable header: find the first batch with the schema we know
        scan.header_ok = False
        found = _resync(data, 0, schema, True)
        if found is None:
            scan.damaged.append((0, len(data), 0))
            return scan
        scan.damaged.append((0, found, 0))
        pos = found
    scan.valid_end = pos
    while pos < len(data):
        try:
            batch, length = _message_at(data, pos, schema, scan.checksummed)
        except (_Incomplete, _Bad) as failed:
            found = _resync(data, pos, schema, scan.checksummed)
            if found is None and isinstance(failed, _Incomplete):
                scan.torn_tail = len(data) - pos  # the last message, cut short: a write a crash interrupted
                break
            scan.damaged.append((pos, len(data) if found is None else found, len(scan.batches)))
            if found is None:
                break
            pos = found
            continue
        pos += length
        if batch is None:
            scan.ended = True
            scan.valid_end = pos
            if pos < len(data):
                scan.damaged.append((pos, len(data), len(scan.batches)))
            break
        scan.batches.append(batch)
        scan.valid_end = pos
    return scan


def resumes(scan: SegmentScan, size: int) -> bool:
    """Whether a scan of a growing segment can be read on from its end once the file is ``size`` bytes: it
    was clean (header, checksums, no damage, no end marker) and the file did not shrink below it."""
    return scan.header_ok and not scan.damaged and not scan.ended and scan.valid_end <= size


def _header_end(data: memoryview, tick_type: TickType, scan: SegmentScan) -> int | None:
    expected = header_bytes(tick_type)
    if data[:len(expected)] == expected:
        return len(expected)
    if len(data) < 8 or data[:4] != CONTINUATION:
        return None
    (length,) = struct.unpack_from("<i", data, 4)
    if length <= 0 or 8 + length > len(data):
        return None
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(data[:8 + length]))
    except (pa.ArrowInvalid, OSError):
        return None
    if not schema.equals(schema_for(tick_type)):
        return None
    scan.checksummed = FORMAT_KEY in (schema.metadata or {})  # a segment written before checksums
    return 8 + length


def read_segment(path: Path, source: pa.NativeFile | None = None) -> tuple[list[pa.RecordBatch], int]:
    """The good record batches of a segment and where its last good message ends (see
    :func:`scan_segment`, which also says what is torn or damaged)."""
    scan = scan_segment(path, source)
    return scan.batches, scan.valid_end


def stream_order(first_ts: int, last_ts: int, path: Path) -> tuple[int, int, int]:
    """The sort key of a stream's segments: the order of their ticks (first and last ``ts``), then seq."""
    return first_ts, last_ts, segment_seq(path)


def damage_of(scan: SegmentScan, data_root: Path, bucket_us: int, interval_us: int, reason: str) -> list[Damage]:
    """The spans of ticks a scan's damaged byte ranges may have held."""
    key = key_of(scan.path)
    relative = scan.path.resolve().relative_to(data_root.resolve()).as_posix()
    spans = []
    for start, end, after in scan.damaged:
        if start == 0 and end == len(header_bytes(key.tick_type)):
            continue  # the schema alone was damaged: it holds no tick, and the known schema replaces it
        before = next((_ts(b, -1) for b in reversed(scan.batches[:after]) if b.num_rows), bucket_us)
        following = next((_ts(b, 0) for b in scan.batches[after:] if b.num_rows), bucket_us + interval_us - 1)
        spans.append(Damage(key.contract_id, key.tick_type.value, before, following, relative, "",
                            f"{reason}: bytes {start}-{end} of {scan.size}", now_us(), end - start))
    return spans


def announce_acknowledged(fd: int) -> None:
    """Touch an open segment once its batch is acknowledged: readers in other processes wake on the
    inode change (inotify ``IN_ATTRIB``, :class:`storage.live.Acknowledgements`) instead of polling.
    Best effort: the batch is durable already, and a reader that misses it polls."""
    try:
        os.utime(fd)
    except OSError:
        pass


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Coalescing closed segments

COALESCE_CODEC = "zstd"  # body compression of coalesced segments; the choice is measured in bench/bench_buffer.py


@dataclass(frozen=True)
class Coalesced:
    """What :func:`coalesce_segment` did to one segment."""

    path: Path
    ticks: int
    batches_before: int
    batches_after: int
    bytes_before: int
    bytes_after: int


def needs_coalescing(scan: SegmentScan, batch_rows: int) -> bool:
    """Whether a scanned segment is worth rewriting: whole (damage is left for the quarantine) and
    holding more batches than ``batch_rows``-row batches would need (small group commits)."""
    return scan.whole and scan.rows() > 0 and len(scan.batches) > -(-scan.rows() // batch_rows)


def coalesce_segment(path: Path, batch_rows: int, codec: str | None = COALESCE_CODEC,
                     scan: SegmentScan | None = None) -> Coalesced | None:
    """Rewrite a closed segment as few large batches (``batch_rows`` rows, ``codec`` body
    compression), holding exactly the same ticks; None when it is not worth it (see
    :func:`needs_coalescing`) or not whole.

    Crash-safe, and the original stays in place until its copy is proven: the copy is written
    beside it as ``<name>.arrows.tmp`` (which recovery removes: the original holds the ticks),
    fsynced, read back and compared row for row with the original, renamed over it, and the folder
    fsynced. A reader that mapped the original keeps reading it (its inode lives on until unmapped).
    Disk trouble raises ``OSError`` with the copy removed and the original untouched.
    """
    scan = scan_segment(path) if scan is None else scan
    if not needs_coalescing(scan, batch_rows):
        return None
    tick_type = key_of(path).tick_type
    original = pa.Table.from_batches(scan.batches, schema=schema_for(tick_type))
    pieces = original.combine_chunks().to_batches(max_chunksize=batch_rows)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        header = header_bytes(tick_type)
        write_all(fd, header, 0, "coalesce.write")
        offset = len(header)
        for i, piece in enumerate(pieces):
            message = encode_batch(piece, tick_type, codec)
            write_all(fd, message, offset, "coalesce.write")
            offset += len(message)
            if i == 0:
                failpoint("coalesce.mid_write")
        write_all(fd, EOS, offset, "coalesce.write")
        offset += len(EOS)
        fsync(fd, "coalesce.fsync")
        copy = scan_segment(tmp)
        if not (copy.whole and copy.ended and copy.size == offset
                and pa.Table.from_batches(copy.batches, schema=original.schema).equals(original)):
            raise AssertionError(f"the coalesced copy of {path} does not read back as its {original.num_rows} ticks")
        failpoint("coalesce.before_rename")
        os.replace(tmp, path)
        failpoint("coalesce.after_rename")
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)  # our own copy: the original holds every tick
        raise
    finally:
        os.close(fd)
    return Coalesced(path, original.num_rows, len(scan.batches), len(pieces), scan.size, offset)


# ---------------------------------------------------------------------------------------------
# Writing


@dataclass
class _OpenSegment:
    path: Path
    bucket_start_us: int
    fd: int
    offset: int  # end of the last acknowledged message: everything before it is durable
    batches: list[pa.RecordBatch] = field(default_factory=list)

    def size(self) -> int:
        return self.offset


@dataclass
class StreamSnapshot:
    """What a reader may use of a stream at one instant: closed segments (in ts order) and the open tail."""

    closed: list[Path]
    open_batches: list[pa.RecordBatch]
    open_path: Path | None


class _StreamState:
    def __init__(self, key: StreamKey, directory: Path, segments: list[tuple[Path, int, int]]):
        self.key = key
        self.directory = directory
        self.schema = schema_for(key.tick_type)
        self.write_lock = threading.Lock()  # one append / seal at a time
        self.state_lock = threading.Lock()  # guards what readers see
        self.open: _OpenSegment | None = None
        ordered = sorted(segments, key=lambda s: stream_order(s[1], s[2], s[0]))
        self.closed: list[Path] = [path for path, _, _ in ordered]  # in ts order
        self.next_seq = max((segment_seq(path) for path, _, _ in segments), default=-1) + 1
        self.last_ts = max((last for _, _, last in segments), default=NO_TS)
        self.sealed_until_us = NO_TS  # raised by SegmentWriter.seal (the store seals archived hours on start)
        self.acknowledged = 0
        self.subscribers: list = []  # storage.live.Subscription: offered each batch readers can see


DamageListener = Callable[[Damage], None]


class SegmentWriter:
    """Appends acknowledged batches to per-stream IPC segments. Thread-safe.

    On construction every segment is checked (:meth:`_recover`); ``on_damage`` is called with
    each damaged span found then or later (the store records them in the index).
    """

    def __init__(self, settings: StorageSettings, *, on_damage: DamageListener | None = None):
        self.settings = settings
        self.root = settings.buffer_root
        self.interval_us = duration_us(settings.rotation_interval)
        self._streams: dict[StreamKey, _StreamState] = {}
        self._lock = threading.Lock()
        self.on_damage = on_damage or (lambda damage: None)
        self.forget_listeners: list = []  # called with the paths of segments the archiver removed
        # called after each acknowledged group commit with (write seconds, fsync seconds; 0 when fsync is off)
        self.timing_listeners: list[Callable[[float, float], None]] = []
        self._rewrite_lock = threading.Lock()  # coalescing a closed segment vs removing it (never taken by append)
        self._coalesce_failing: str | None = None  # why the last coalescing stopped (disk), logged once per change
        self._settled: dict[Path, tuple[int, int, int]] = {}  # closed segments found not worth coalescing, by version
        self._recovered: dict[StreamKey, list[tuple[Path, int, int]]] = {
            key: self._recover(key) for key in list_streams(self.root)}

    # -- recovery ----------------------------------------------------------------------------

    def _recover(self, key: StreamKey) -> list[tuple[Path, int, int]]:
        """Check every segment of a stream: cut a torn tail of the newest, quarantine damage.
        Returns each segment's path with its first and last ``ts``."""
        directory = stream_dir(self.root, key)
        for leftover in directory.glob(f"*{SUFFIX}{TMP_SUFFIX}"):
            leftover.unlink()  # a segment being created holds only its schema, never a tick; a copy being
            if leftover.with_name(leftover.name[: -len(TMP_SUFFIX)]).exists():  # coalesced or repaired: its original does
                log.warning("removed %s: an unfinished rewrite (its segment, in place, holds every tick)", leftover)
            else:
                log.warning("removed %s: a segment whose creation was cut off (it held no tick)", leftover)
        for foreign in foreign_files(directory):
            log.warning("ignoring %s: not a segment name ibstream writes (YYYYmmddTHHMMSSZ-seq%s); it is left alone",
                        foreign, SUFFIX)
        scans = [scan_segment(path) for path in list_segments(directory)]
        newest = max(scans, key=lambda s: (segment_seq(s.path), s.path.name), default=None)
        kept = []
        for scan in scans:
            if scan is newest and scan.torn_tail and not scan.damaged and scan.header_ok:
                scan = self._cut_torn_tail(scan)  # the write a crash interrupted
            if not scan.whole:
                scan = self.repair(scan, "damaged on disk (found on start)")
            kept.append((scan.path, scan.first_ts(), scan.last_ts()))
        return kept

    def _cut_torn_tail(self, scan: SegmentScan) -> SegmentScan:
        with open(scan.path, "r+b") as handle:
            handle.truncate(scan.valid_end)
            os.fsync(handle.fileno())
        log.warning("recovered segment %s: cut a torn tail of %d bytes (a write the crash interrupted, never "
                    "acknowledged); kept %d batches (%d ticks)", scan.path, scan.torn_tail, len(scan.batches),
                    scan.rows())
        scan.size, scan.torn_tail = scan.valid_end, 0
        return scan

    def repair(self, scan: SegmentScan, reason: str) -> SegmentScan:
        """Quarantine a damaged segment and put back a clean copy of its readable batches.

        The original file goes to the quarantine untouched (with a note naming the damaged byte
        ranges and tick spans); the copy holds every batch that passed its checksum, closed.
        Crash-safe: the copy is written aside and renamed over the original only after the
        original is linked into the quarantine.
        """
        key = key_of(scan.path)
        bucket = segment_start_us(scan.path)
        if scan.torn_tail:  # in a segment that was closed: cut by something else, so possibly acknowledged
            scan.damaged.append((scan.valid_end, scan.size, len(scan.batches)))
        spans = damage_of(scan, self.settings.data_root, bucket, self.interval_us, reason)
        note = {"reason": reason, "damaged_bytes": [[s, e] for s, e, _ in scan.damaged],
                "kept_batches": len(scan.batches), "kept_ticks": scan.rows(),
                "lost_spans": [damage_note(d) for d in spans]}
        quarantined = quarantine_file(self.settings.data_root, scan.path, note, keep=True)
        relative = quarantined.relative_to(self.settings.data_root).as_posix()
        clean = scan.path.with_name(scan.path.name + TMP_SUFFIX)
        with open(clean, "wb") as handle:
            handle.write(header_bytes(key.tick_type))
            for batch in scan.batches:
                handle.write(encode_batch(batch, key.tick_type))
            handle.write(EOS)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(clean, scan.path)
        fsync_dir(scan.path.parent)
        for span in spans:
            self.on_damage(Damage(**{**span.__dict__, "quarantined": relative}))
        repaired = scan_segment(scan.path)
        return repaired

    # -- public ------------------------------------------------------------------------------

    def append(self, contract_id: int, tick_type: TickType | str, data: pa.RecordBatch | pa.Table) -> int:
        """Write ticks durably; returns how many were acknowledged (all, or an error is raised).

        ``data`` must have the tick type's schema and ``ts`` non-decreasing, continuing from the
        stream's last acknowledged tick. A write the disk refuses raises
        :class:`~ibstream.core.errors.StorageUnavailableError` with the count of leading ticks that
        were acknowledged (a batch that crosses a bucket is written in pieces); the rest left no
        byte behind.
        """
        key = StreamKey(int(contract_id), TickType.parse(str(tick_type)))
        stream = self._stream(key)
        batch = _as_batch(data, stream.schema)
        if batch.num_rows == 0:
            return 0
        ts = as_micros(batch.column("ts"))
        with stream.write_lock:
            self._check_order(stream, ts)
            done = 0
            for piece, bucket in self._split_by_bucket(batch, ts):
                try:
                    self._write(stream, piece, bucket)
                except OSError as exc:
                    raise StorageUnavailableError(
                        f"stream {key}: the disk refused {batch.num_rows - done} ticks ({exc}); "
                        f"{done} of the batch were acknowledged, nothing of the rest was kept on disk; "
                        "retry them once there is room",
                        acknowledged=done, errno=exc.errno) from exc
                done += piece.num_rows
                stream.last_ts = int(ts[done - 1])
                stream.acknowledged += piece.num_rows
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
        with self._rewrite_lock:
            for path in paths:
                path.unlink(missing_ok=True)

    def coalesce_closed(self) -> list[Coalesced]:
        """Rewrite every closed segment of small group commits as few large compressed batches
        (see :func:`coalesce_segment`), off the ingest path: appends go on meanwhile, readers
        read the old file or the new one, both holding the same ticks. The archiver calls it
        after each run. Damaged segments are left for the quarantine; a disk that refuses the
        copy stops the pass (logged once per change), leaving each segment as written.
        """
        done: list[Coalesced] = []
        self._settled = {p: v for p, v in self._settled.items() if p.exists()}
        for key in self.streams():
            stream = self._stream(key)
            with stream.state_lock:
                closed = list(stream.closed)
            for path in closed:
                try:
                    result = self._coalesce_one(stream, path)
                except OSError as exc:
                    if self._coalesce_failing is None:
                        log.warning("could not coalesce segment %s (%s); it stays as written (every tick readable), "
                                    "coalescing stops until a later run succeeds", path, exc)
                    self._coalesce_failing = str(exc)
                    return done
                except Exception:  # a bug: the segment stays as written and keeps serving
                    log.exception("coalescing segment %s failed; it stays as written", path)
                    continue
                if result is not None:
                    done.append(result)
        if self._coalesce_failing is not None:
            log.info("coalescing segments works again (it had stopped: %s)", self._coalesce_failing)
            self._coalesce_failing = None
        return done

    def _coalesce_one(self, stream: _StreamState, path: Path) -> Coalesced | None:
        with self._rewrite_lock:
            with stream.state_lock:
                if path not in stream.closed:
                    return None  # archived meanwhile
            try:
                stat = path.stat()
            except FileNotFoundError:
                return None
            version = (stat.st_size, stat.st_ino, stat.st_mtime_ns)
            if self._settled.get(path) == version:
                return None
            try:
                result = coalesce_segment(path, self.settings.batch_rows)
            except OSError:
                raise  # the disk: tried again on the next run
            except Exception:
                self._settled[path] = version  # a bug: logged once, not on every run
                raise
            if result is None:
                after = path.stat()
                self._settled[path] = (after.st_size, after.st_ino, after.st_mtime_ns)
                return None
        after = path.stat()
        self._settled[path] = (after.st_size, after.st_ino, after.st_mtime_ns)
        log.info("coalesced segment %s: %d ticks, %d batches -> %d, %d -> %d bytes (%.1f -> %.1f B/tick)",
                 path, result.ticks, result.batches_before, result.batches_after, result.bytes_before,
                 result.bytes_after, result.bytes_before / result.ticks, result.bytes_after / result.ticks)
        return result

    def streams(self) -> list[StreamKey]:
        with self._lock:
            known = set(self._streams)
        return sorted(known | set(list_streams(self.root)))

    def schema(self, key: StreamKey) -> pa.Schema:
        return self._stream(key).schema

    def acknowledged(self, key: StreamKey) -> int:
        return self._stream(key).acknowledged

    def last_ts(self, key: StreamKey) -> int:
        """The ``ts`` of the stream's last acknowledged tick in the buffer (``-2**63`` if none)."""
        return self._stream(key).last_ts

    def close(self) -> None:
        with self._lock:
            streams = list(self._streams.values())
        for stream in streams:
            with stream.write_lock:
                if stream.open:
                    self._rotate(stream)

    # -- internals ---------------------------------------------------------------------------

    def _stream(self, key: StreamKey) -> _StreamState:
        with self._lock:
            stream = self._streams.get(key)
            if stream is None:
                directory = stream_dir(self.root, key)
                segments = self._recovered.pop(key, [])
                stream = _StreamState(key, directory, segments)
                self._streams[key] = stream
            return stream

    def _check_order(self, stream: _StreamState, ts: np.ndarray) -> None:
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

    def _write(self, stream: _StreamState, batch: pa.RecordBatch, bucket: int) -> None:
        segment = stream.open
        if segment and (segment.bucket_start_us != bucket or segment.offset >= self.settings.segment_max_bytes):
            self._rotate(stream)
            segment = None
        if segment is None:
            segment = self._open(stream, self._create(stream, bucket))
        message = encode_batch(batch, stream.key.tick_type)
        if os.fstat(segment.fd).st_size != segment.offset:
            segment = self._replace_changed(stream, segment)
        try:
            started = time.perf_counter()
            write_all(segment.fd, message, segment.offset, "segment.write")
            written = time.perf_counter()
            failpoint("segment.before_fsync")
            if self.settings.fsync == "batch":
                fsync(segment.fd, "segment.fsync")
            synced = time.perf_counter()
        except OSError:
            self._undo(stream, segment)
            raise
        segment.offset += len(message)
        announce_acknowledged(segment.fd)
        for listener in self.timing_listeners:
            listener(written - started, synced - written if self.settings.fsync == "batch" else 0.0)
        with stream.state_lock:
            segment.batches.append(batch)
            for subscriber in stream.subscribers:
                subscriber.offer(batch)

    def _undo(self, stream: _StreamState, segment: _OpenSegment) -> None:
        """Cut a failed write off the segment; if even that fails, close the segment for good."""
        try:
            os.ftruncate(segment.fd, segment.offset)
            if self.settings.fsync == "batch":
                os.fsync(segment.fd)
        except OSError as exc:
            try:  # overwriting bytes already allocated needs no room: the failed message can never read back
                os.pwrite(segment.fd, b"\0" * 8, segment.offset)
                os.fsync(segment.fd)
            except OSError:
                pass
            log.error("could not cut a failed write off %s (%s); closing it at its last acknowledged byte %d "
                      "(recovery treats what follows as damage and quarantines it)", segment.path, exc, segment.offset)
            os.close(segment.fd)
            with stream.state_lock:
                stream.closed.append(segment.path)
                stream.open = None

    def _replace_changed(self, stream: _StreamState, segment: _OpenSegment) -> _OpenSegment:
        """Another process changed the open segment (truncated it, say): write its acknowledged
        batches, still held in memory, to a new segment, then quarantine the changed file. If the
        rewrite fails, the changed segment stays open and the next append tries again."""
        size = os.fstat(segment.fd).st_size
        replacement = self._create(stream, segment.bucket_start_us)
        try:
            messages = b"".join(encode_batch(b, stream.key.tick_type) for b in segment.batches)
            write_all(replacement.fd, messages, replacement.offset, "segment.write")
            fsync(replacement.fd, "segment.fsync")
        except OSError:
            os.close(replacement.fd)
            replacement.path.unlink(missing_ok=True)  # ours, and incomplete: the batches are still in memory
            raise
        replacement.offset += len(messages)
        replacement.batches = segment.batches
        note = {"reason": f"changed by something else while open: {size} bytes where {segment.offset} were written",
                "rewritten_batches": len(segment.batches), "rewritten_to": replacement.path.name}
        quarantine_file(self.settings.data_root, segment.path, note)
        os.close(segment.fd)
        log.error("segment %s was changed by another process; its %d acknowledged batches were rewritten from "
                  "memory to %s", segment.path, len(segment.batches), replacement.path.name)
        return self._open(stream, replacement)

    def _create(self, stream: _StreamState, bucket: int) -> _OpenSegment:
        """A new segment holding the schema: written aside, fsynced, then renamed into place."""
        stream.directory.mkdir(parents=True, exist_ok=True)
        path = stream.directory / segment_name(bucket, stream.next_seq)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        header = header_bytes(stream.key.tick_type)
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            io_faults.raise_if_armed("segment.create")
            write_all(fd, header, 0, "segment.write")
            if self.settings.fsync == "batch":
                fsync(fd, "segment.fsync")
            os.rename(tmp, path)
            if self.settings.fsync == "batch":
                fsync_dir(stream.directory)
        except OSError:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        stream.next_seq += 1
        return _OpenSegment(path, bucket, fd, len(header))

    def _open(self, stream: _StreamState, segment: _OpenSegment) -> _OpenSegment:
        with stream.state_lock:
            stream.open = segment
        return segment

    def _rotate(self, stream: _StreamState) -> None:
        """Close the open segment with its end-of-stream marker (a segment without one reads the same)."""
        segment = stream.open
        assert segment is not None
        try:
            write_all(segment.fd, EOS, segment.offset, "segment.write")
            if self.settings.fsync == "batch":
                fsync(segment.fd, "segment.fsync")
        except OSError as exc:
            log.warning("could not end segment %s with its end-of-stream marker (%s); it reads the same without",
                        segment.path, exc)
            try:
                os.ftruncate(segment.fd, segment.offset)
            except OSError:
                pass
        os.close(segment.fd)
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
