"""Import an IB-Stream storage root (github: lakowske/ib-stream) into the store: ``ibstream import``.

IB-Stream writes every tick twice, one file per contract, tick type and hour of **IB's time**::

    {root}/v3/json/YYYY/MM/DD/HH/{cid}_{tick_type}_{hour_epoch_s}.jsonl      one JSON object a line
    {root}/v3/protobuf/YYYY/MM/DD/HH/{cid}_{tick_type}_{hour_epoch_s}.pb     4-byte big-endian length, then
                                                                              a ``TickMessage`` (its
                                                                              ``tick_message_v3.proto``)

A record: ``ts`` (IB's time, µs, whole seconds), ``st`` (the receive time, µs), ``cid``, ``tt``,
``rid``, then ``p s`` (trades), ``bp bs ap as`` (quotes) or ``mp`` (mid-point), and the flags
``bpl aph upt``; an optional key is absent when null or false. Its ``st`` becomes our ``ts``, its
``ts`` our ``ib_time``.

What happens to each tick (``proto_docs/storage-layout.md``, "Importing IB-Stream"):

* **One copy imported, the other cross-checked.** The JSON copy is imported; the protobuf copy is
  decoded (by :func:`decode_tick_message`, a small decoder written from the schema: no protobuf
  dependency) and compared record by record. Where they disagree the JSON record is kept and the
  disagreement reported; a record only one copy holds (a torn tail, a lost write) is imported once.
  A file present in one copy only is imported from that copy.
* **Each (stream, UTC hour of ``st``) becomes one archive file** through the archiver's own atomic
  path (:meth:`Archiver.publish_hour`: ``.tmp`` + fsync + rename + fsync, then one index
  transaction with its ``tick_archives`` row, statistics, 1-minute bars and coverage), so a kill
  leaves the hour imported whole or not at all (``Archiver.recover`` adopts a renamed file). An
  hour gathers ticks from the files of its neighbouring IB hours too (``st`` and ``ts`` differ by
  up to :data:`MAX_SKEW_US`); it is sorted by ``st``, stably (file order, then line order, for ties).
* **Never a tick twice.** An hour our store already holds (archived or buffered by our recorder,
  or expired by retention) is not imported: its IB-Stream ticks are counted and reported, with
  how many fall outside our ``recorded`` coverage (we never rewrite a published hour). In other
  hours, ticks inside our own ``recorded`` coverage are dropped (counted). An hour imported before
  is skipped: that makes a re-run import nothing and an interrupted run continue where it stopped.
  Hours that have not ended ``archive_delay`` ago are left for a later run.
* **What v3 never stored.** Trades get ``exchange = ''``, ``special_conditions = ''`` and
  ``past_limit = false``; the hour's coverage rows say ``recorded`` with reason
  :data:`IMPORT_REASON` over the imported span (first to last imported tick), which tells these
  from real empty values, and the file's ``ibstream.archive`` metadata has ``source``: the root,
  the copy and the fields v3 lacks. Mid-point records without ``mp`` (IB-Stream loses the price)
  are counted, never imported; one that has ``mp`` is imported.
* **Sizes** arrive as floats and become ``decimal128(18, 8)``: exactly the decimal IB sent
  whenever that had at most 8 decimals and 15 significant digits (the shortest text that reads
  back as the float is then that decimal). Any other size is rounded to 8 decimals and reported;
  one no decimal(18, 8) holds (NaN, infinite, 10^10 or more) skips its tick, reported.
* **v2 files** (``v2/json``, ``v2/protobuf``) are counted and reported as not imported.
"""

from __future__ import annotations

import json
import logging
import math
import re
import struct
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import numpy as np
import pyarrow as pa

from ibstream.core.errors import DamagedDataError, InvalidRequestError
from ibstream.core.ticks import TickFamily
from ibstream.core.times import MAX_US, US_PER_HOUR, as_micros, duration_us, hour_floor, iso, now_us
from ibstream.storage.archive import Archiver, coverage_rows, file_facts
from ibstream.storage.failpoints import failpoint
from ibstream.storage.index import ArchiveEntry, CoverageInterval, Index
from ibstream.storage.schemas import SIZE, TIMESTAMP, TickType, schema_for
from ibstream.storage.segments import StreamKey, list_segments, segment_start_us, stream_dir

log = logging.getLogger(__name__)

IMPORT_REASON = "imported_ib_stream_v3"  # coverage reason of imported spans: exchange etc. unknown there
SOURCE_KIND = "ib_stream_v3"  # ``source.kind`` in an imported file's ibstream.archive metadata
MISSING_FIELDS = {  # what v3 never stores, per family, with the value the stored schema gets instead
    TickFamily.TRADES: {"exchange": "", "special_conditions": "", "past_limit": False},
    TickFamily.QUOTES: {},
    TickFamily.MID: {},
}
MAX_SKEW_US = US_PER_HOUR  # |st - ts| beyond this: the tick's hour may already be done (counted, skipped)
SIZE_PLACES = 8
SIZE_LIMIT = 10**10  # decimal128(18, 8) holds 10 integer digits
EXAMPLES_KEPT = 5  # examples kept per kind of problem, for the summary

_NAME = re.compile(r"(\d+)_(bid_ask|last|all_last|mid_point)_(\d+)\.(jsonl|pb)")
_COPIES = (("json", "jsonl"), ("protobuf", "pb"))
_FLAGS = ("bpl", "aph", "upt")
_REQUIRED = {TickFamily.QUOTES: ("bp", "bs", "ap", "as"), TickFamily.TRADES: ("p", "s"), TickFamily.MID: ("mp",)}

Progress = Callable[[Iterable, str, int], Iterable]


def _quiet(items: Iterable, description: str, total: int) -> Iterable:
    return items


# -- the protobuf copy -----------------------------------------------------------------------------

# TickMessage (tick_message_v3.proto): field number -> (name, wire type). 0: varint, 1: 64-bit, 2: bytes
_FIELDS = {1: ("ts", 0), 2: ("st", 0), 3: ("cid", 0), 4: ("tt", 2), 5: ("rid", 0), 10: ("p", 1), 11: ("s", 1),
           12: ("bp", 1), 13: ("bs", 1), 14: ("ap", 1), 15: ("as", 1), 16: ("mp", 1), 20: ("bpl", 0),
           21: ("aph", 0), 22: ("upt", 0)}
_BOOLS = {"bpl", "aph", "upt"}
_DOUBLE = struct.Struct("<d")
_LENGTH = struct.Struct(">I")


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def decode_tick_message(data: bytes) -> dict:
    """One serialized ``TickMessage`` as the record IB-Stream's JSON copy holds for it: the same keys,
    the core fields always (proto3 leaves out zeros), the optional ones when present, flags only when
    true. Unknown fields are skipped; a malformed message raises ValueError."""
    record: dict = {"ts": 0, "st": 0, "cid": 0, "tt": "", "rid": 0}
    pos, end = 0, len(data)
    fields, unpack = _FIELDS, _DOUBLE.unpack_from
    while pos < end:
        tag = data[pos]
        if tag < 0x80:  # one-byte tags: fields 1-15
            pos += 1
        else:
            tag, pos = _varint(data, pos)
        number, wire = tag >> 3, tag & 7
        value: int | float | bytes
        if wire == 0:
            value = data[pos] if pos < end else -1
            if value < 0x80 and value >= 0:
                pos += 1
            else:
                value, pos = _varint(data, pos)
        elif wire == 1:
            if pos + 8 > end:
                raise ValueError("truncated double")
            value = unpack(data, pos)[0]
            pos += 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            if pos + size > end:
                raise ValueError("truncated string")
            value = bytes(data[pos:pos + size])
            pos += size
        elif wire == 5:
            pos += 4
            continue
        else:
            raise ValueError(f"wire type {wire}")
        known = fields.get(number)
        if known is None:
            continue
        name, expected = known
        if wire != expected:
            raise ValueError(f"field {name} has wire type {wire}, not {expected}")
        if isinstance(value, bytes):
            record[name] = value.decode()
        elif name in _BOOLS:
            if value:
                record[name] = True
            else:
                record.pop(name, None)
        elif isinstance(value, int):
            record[name] = value - (1 << 64) if value >= 1 << 63 else value  # int64/int32: two's complement
        else:
            record[name] = value
    if pos > end:
        raise ValueError("truncated field")
    return record


def _encode_varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_tick_message(record: dict) -> bytes:
    """A record (the JSON copy's keys) as a serialized ``TickMessage``, as IB-Stream's writer makes
    it: for tests and the benchmark, which write IB-Stream roots."""
    out = bytearray()
    for number, (name, wire) in _FIELDS.items():
        value = record.get(name)
        if value is None or (name in _BOOLS and not value) or (number <= 5 and not value):
            continue
        out += _encode_varint(number << 3 | wire)
        if wire == 0:
            out += _encode_varint(int(value))
        elif wire == 1:
            out += _DOUBLE.pack(float(value))
        else:
            raw = str(value).encode()
            out += _encode_varint(len(raw)) + raw
    return bytes(out)


def write_ib_stream_v3(root: Path, records: Iterable[dict], *, copies: tuple[str, ...] = ("json", "protobuf")) -> int:
    """Append records to an IB-Stream v3 root in its layout (files by stream and hour of ``ts``), both
    copies: for tests and the benchmark. Returns how many records were written."""
    groups: dict[tuple[str, int, str, int], list[dict]] = defaultdict(list)
    count = 0
    for record in records:
        hour_s = record["ts"] // 1_000_000 // 3600 * 3600
        groups[(f"{datetime.fromtimestamp(hour_s, UTC):%Y/%m/%d/%H}", record["cid"], record["tt"], hour_s)].append(
            record)
        count += 1
    for (folder, cid, tick_type, hour_s), group in groups.items():
        for copy, ext in _COPIES:
            if copy not in copies:
                continue
            path = root / "v3" / copy / folder / f"{cid}_{tick_type}_{hour_s}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            if copy == "json":
                with open(path, "a") as handle:
                    handle.writelines(json.dumps({k: v for k, v in r.items() if v is not None and v is not False},
                                                 separators=(",", ":")) + "\n" for r in group)
            else:
                with open(path, "ab") as handle:
                    for r in group:
                        message = encode_tick_message(r)
                        handle.write(_LENGTH.pack(len(message)) + message)
    return count


# -- finding and reading the files -----------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    """One stream's hour of IB-Stream files (either copy may be missing)."""

    key: StreamKey
    hour_us: int  # the hour of IB's time the files hold
    json: Path | None = None
    protobuf: Path | None = None


@dataclass(frozen=True)
class SourceRoot:
    root: Path
    files: list[SourceFile]
    v2_files: int
    unrecognised: list[str]


def scan_root(root: Path) -> SourceRoot:
    """The v3 files of an IB-Stream root by stream and hour; InvalidRequestError if ``root`` is not one."""
    expected = ("expected an IB-Stream storage root: the folder holding v3/json/YYYY/MM/DD/HH/"
                "{contract_id}_{tick_type}_{hour_epoch}.jsonl and v3/protobuf/.../*.pb (and maybe v2/)")
    if not root.is_dir():
        raise InvalidRequestError(f"{root} is not a folder; {expected}")
    folders = [root / version / copy for version in ("v3", "v2") for copy in ("json", "protobuf")]
    if not any(folder.is_dir() for folder in folders):
        hint = ""
        if root.name in ("v3", "v2", "json", "protobuf"):
            hint = f"; give the folder above it ({root.parent if root.name in ('v3', 'v2') else root.parent.parent})"
        raise InvalidRequestError(f"{root} is not an IB-Stream storage root (it has no v3/json, v3/protobuf, v2/json "
                                  f"or v2/protobuf folder){hint}; {expected}")
    pairs: dict[tuple[StreamKey, int], dict[str, Path]] = defaultdict(dict)
    unrecognised: list[str] = []
    for copy, ext in _COPIES:
        base = root / "v3" / copy
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*")):
            if not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            match = _NAME.fullmatch(path.name)
            hour_s = int(match.group(3)) if match else -1
            folder = path.parent.relative_to(base).as_posix()
            if (match is None or match.group(4) != ext or hour_s % 3600 or not 0 < int(match.group(1)) < 2**31
                    or hour_s * 1_000_000 > MAX_US or folder != f"{datetime.fromtimestamp(hour_s, UTC):%Y/%m/%d/%H}"):
                unrecognised.append(relative)
                continue
            key = StreamKey(int(match.group(1)), TickType(match.group(2)))
            pairs[(key, hour_s * 1_000_000)][copy] = path
    files = [SourceFile(key, hour, found.get("json"), found.get("protobuf")) for (key, hour), found in sorted(
        pairs.items())]
    v2 = sum(1 for copy in ("json", "protobuf") for p in (root / "v2" / copy).rglob("*") if p.is_file()) \
        if (root / "v2").is_dir() else 0
    return SourceRoot(root, files, v2, unrecognised)


def read_json_copy(path: Path) -> tuple[list[dict], int]:
    """The records of a v3 JSON file and how many lines could not be read (a torn last line, say)."""
    records, bad = [], 0
    loads = json.loads
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                record = loads(line)
            except ValueError:
                bad += 1
                continue
            if not isinstance(record, dict):
                bad += 1
                continue
            for flag in _FLAGS:
                if flag in record and record[flag] is not True:
                    del record[flag]  # IB-Stream leaves out false flags; a stray false means the same
            records.append(record)
    return records, bad


def read_protobuf_copy(path: Path) -> tuple[list[dict], int]:
    """The records of a v3 protobuf file (length-prefixed ``TickMessage``\\ s) and how many could not be
    decoded (a torn tail counts one)."""
    data = path.read_bytes()
    records, bad, pos = [], 0, 0
    while pos < len(data):
        if pos + 4 > len(data):
            bad += 1
            break
        (size,) = _LENGTH.unpack_from(data, pos)
        pos += 4
        if pos + size > len(data):
            bad += 1
            break
        try:
            records.append(decode_tick_message(data[pos:pos + size]))
        except (ValueError, UnicodeDecodeError):
            bad += 1
        pos += size
    return records, bad


# -- the report --------------------------------------------------------------------------------------

@dataclass
class StreamReport:
    """What one stream's import did (or, as a dry run, would do)."""

    key: StreamKey
    records: int = 0  # read from the imported copy (after merging in the other's extra records)
    imported: int = 0
    hours: list[int] = field(default_factory=list)  # hours imported (or that would be)
    already_imported_hours: int = 0
    already_imported_ticks: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> ticks
    in_our_gaps: int = 0  # of the ticks skipped in hours we hold: outside our recorded coverage
    sizes_rounded: int = 0
    reordered: int = 0  # ticks whose st was before the previous one's in the files (sorted into place)


@dataclass
class ImportReport:
    root: Path
    dry_run: bool = False
    json_files: int = 0
    protobuf_files: int = 0
    files_skipped: int = 0  # files whose every hour was imported before (not read again)
    v2_files: int = 0
    unrecognised: list[str] = field(default_factory=list)
    streams: dict[StreamKey, StreamReport] = field(default_factory=dict)
    compared: int = 0  # records found in both copies and compared
    disagreements: int = 0
    only_json: int = 0
    only_protobuf: int = 0
    unreadable: Counter = field(default_factory=Counter)  # copy -> records that could not be read
    examples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def stream(self, key: StreamKey) -> StreamReport:
        return self.streams.setdefault(key, StreamReport(key))

    def example(self, kind: str, text: str) -> None:
        if len(self.examples[kind]) < EXAMPLES_KEPT:
            self.examples[kind].append(text)

    @property
    def imported(self) -> int:
        return sum(s.imported for s in self.streams.values())

    @property
    def hours(self) -> int:
        return sum(len(s.hours) for s in self.streams.values())

    def skipped(self) -> Counter:
        total: Counter = Counter()
        for s in self.streams.values():
            total.update(s.skipped)
        return total

    def lines(self) -> list[str]:
        """The summary ``ibstream import`` prints."""
        would = "would import" if self.dry_run else "imported"
        lines = [f"{self.root}: read {self.json_files:,} JSON and {self.protobuf_files:,} protobuf files"
                 + (f" ({self.files_skipped:,} more already imported, not read again)" if self.files_skipped else "")
                 + f"; {would} {self.imported:,} ticks in {self.hours:,} stream-hours"]
        for key, s in sorted(self.streams.items()):
            text = f"  {key.contract_id}/{key.tick_type.value}: {would} {s.imported:,} ticks"
            if s.hours:
                text += f" in {len(s.hours)} hours ({iso(s.hours[0])[:13]}Z .. {iso(s.hours[-1])[:13]}Z)"
            text += f" of {s.records:,} records"
            if s.already_imported_hours:
                text += f"; {s.already_imported_hours} hours ({s.already_imported_ticks:,} ticks) imported before"
            lines.append(text)
            for reason, count in sorted(s.skipped.items()):
                extra = f" ({s.in_our_gaps:,} of them outside our recorded coverage, not merged: a published hour " \
                        "is never rewritten)" if reason.startswith("hour already held") and s.in_our_gaps else ""
                lines.append(f"      skipped {count:,}: {reason}{extra}")
            if s.sizes_rounded:
                lines.append(f"      {s.sizes_rounded:,} sizes not exact in decimal(18, 8): rounded to 8 decimals")
            if s.reordered:
                lines.append(f"      {s.reordered:,} ticks received out of order in the files: sorted by receive time")
        if not self.imported and any(s.already_imported_hours for s in self.streams.values()):
            lines.append(f"nothing new{' to import' if self.dry_run else ' imported'}: the hours found were imported "
                         "before (or are skipped as listed)")
        mids = sum(s.skipped[MID_WITHOUT_PRICE] for s in self.streams.values())
        if mids:
            lines.append(f"mid-points without a price: {mids:,} records not imported (IB-Stream's v3 loses the price; "
                         "none is invented)")
        lines.append(f"copies: {self.compared:,} records in both, {self.disagreements:,} disagree (the JSON copy kept), "
                     f"{self.only_json:,} only in JSON, {self.only_protobuf:,} only in protobuf (imported once)")
        for copy, count in sorted(self.unreadable.items()):
            lines.append(f"  {count:,} {copy} records could not be read (torn or damaged)")
        for kind, texts in sorted(self.examples.items()):
            for text in texts:
                lines.append(f"  {kind}: {text}")
        if any(key.tick_type.family is TickFamily.TRADES and s.imported for key, s in self.streams.items()):
            lines.append("trades: v3 keeps no exchange, special conditions or past-limit; stored as '', '', false "
                         f"under coverage reason {IMPORT_REASON}")
        if self.v2_files:
            lines.append(f"v2: {self.v2_files:,} files not imported (only v3 is; v2 files are by stream id and write "
                         "time)")
        if self.unrecognised:
            lines.append(f"unrecognised: {len(self.unrecognised):,} files under v3/ not named like IB-Stream's, left "
                         f"alone (e.g. {self.unrecognised[0]})")
        return lines


MID_WITHOUT_PRICE = "mid-point without a price (IB-Stream's v3 loses it)"
SKIP_OURS_ARCHIVED = "hour already held by this store (archived)"
SKIP_OURS_BUFFERED = "hour already held by this store (buffered, not yet archived)"
SKIP_EXPIRED = "hour whose ticks this store's retention expired"
SKIP_RECORDED = "inside this store's own recorded coverage"
SKIP_NOT_OVER = "hour not over yet (import it on a later run)"
SKIP_LATE = "receive time over an hour from IB's time, its hour already done"
SKIP_OTHER_STREAM = "record naming another stream than its file"
SKIP_INCOMPLETE = "record without its fields (or with impossible times)"
SKIP_BAD_SIZE = "size no decimal(18, 8) holds (NaN, infinite or 10^10 and up)"


# -- one file pair into columns ----------------------------------------------------------------------

def merge_copies(report: ImportReport, source: SourceFile, json_records: list[dict] | None,
                 protobuf_records: list[dict] | None) -> list[dict]:
    """The records of a file pair: the JSON copy's, cross-checked against the protobuf copy's."""
    if json_records is None or protobuf_records is None:
        return json_records if json_records is not None else protobuf_records or []
    name = f"{source.key.contract_id}_{source.key.tick_type.value} hour {iso(source.hour_us)[:13]}Z"
    if len(json_records) == len(protobuf_records):  # the usual case: line i is message i
        report.compared += len(json_records)
        for at, (a, b) in enumerate(zip(json_records, protobuf_records)):
            if a != b:
                report.disagreements += 1
                report.example("disagreement", f"{name} record {at + 1}: JSON {_shown(a)} vs protobuf {_shown(b)}")
        return json_records
    waiting: dict[tuple, deque] = defaultdict(deque)  # one copy lost or tore records: match by (st, ts)
    for record in protobuf_records:
        waiting[(record.get("st"), record.get("ts"))].append(record)
    merged = []
    for at, record in enumerate(json_records):
        same = waiting.get((record.get("st"), record.get("ts")))
        if same:
            other = same.popleft()
            report.compared += 1
            if other != record:
                report.disagreements += 1
                report.example("disagreement", f"{name} record {at + 1}: JSON {_shown(record)} vs protobuf "
                                               f"{_shown(other)}")
        else:
            report.only_json += 1
        merged.append(record)
    extra = [record for queue in waiting.values() for record in queue]
    report.only_protobuf += len(extra)
    if extra:
        report.example("only in protobuf", f"{name}: {len(extra)} records, e.g. {_shown(extra[0])}")
    return merged + sorted(extra, key=lambda r: r.get("st", 0))


def _shown(record: dict) -> str:
    return json.dumps(record, separators=(",", ":"))[:200]


def size_units(values: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sizes IB-Stream stored as floats, as decimal(18, 8) units of 1e-8: (units, exact, valid).

    A float holds exactly the decimal it was made from when that had at most 15 significant digits,
    and that decimal is then the shortest text reading back as the float (``repr``): IB's int sizes
    and its Decimal sizes of up to 8 decimals come back exactly. Other sizes are rounded (half even)
    to 8 decimals from the float's exact binary value (``exact`` false); NaN, infinite and 10^10 or
    more are not valid."""
    as_float = np.asarray([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
                           for v in values], dtype=np.float64)
    units = np.zeros(len(values), dtype=np.int64)
    valid = np.isfinite(as_float) & (np.abs(as_float) < SIZE_LIMIT)
    whole = valid & (np.floor(as_float) == as_float)
    units[whole] = as_float[whole].astype(np.int64) * 10**SIZE_PLACES
    exact = whole.copy()
    step = Decimal(1).scaleb(-SIZE_PLACES)
    for i in np.flatnonzero(valid & ~whole):
        value = float(as_float[i])
        shortest = Decimal(repr(value))
        _, digits, exponent = shortest.as_tuple()
        significant = len("".join(map(str, digits)).lstrip("0"))
        if isinstance(exponent, int) and exponent >= -SIZE_PLACES and significant <= 15:
            units[i], exact[i] = int(shortest.scaleb(SIZE_PLACES)), True
        else:
            units[i] = int(Decimal(value).quantize(step, rounding=ROUND_HALF_EVEN).scaleb(SIZE_PLACES))
    return units, exact, valid


def decimal_array(units: np.ndarray) -> pa.Array:
    """decimal128(18, 8) from units of 1e-8 (little-endian 128-bit two's complement)."""
    words = np.empty((len(units), 2), dtype=np.int64)
    words[:, 0] = units
    words[:, 1] = units >> 63
    return pa.Array.from_buffers(SIZE, len(units), [None, pa.py_buffer(words.tobytes())])


_NUMBERS = (int, float)  # by exact type: a JSON true is no number here


def to_table(report: ImportReport, key: StreamKey, records: list[dict]) -> pa.Table:
    """The records of one stream as our tick table (in record order); what cannot be imported is
    counted in the stream's report."""
    stream = report.stream(key)
    family = key.tick_type.family
    required = _REQUIRED[family]
    kept = []
    for record in records:
        st, ts = record.get("st", -1), record.get("ts", -1)
        if record.get("cid") != key.contract_id or record.get("tt") != key.tick_type.value:
            stream.skipped[SKIP_OTHER_STREAM] += 1
            report.example("other stream", f"{key}: {_shown(record)}")
        elif family is TickFamily.MID and "mp" not in record:
            stream.skipped[MID_WITHOUT_PRICE] += 1
        elif not (type(st) is int and type(ts) is int and 0 <= st <= MAX_US and 0 <= ts <= MAX_US) or not all(
                type(record.get(name)) in _NUMBERS for name in required):
            stream.skipped[SKIP_INCOMPLETE] += 1
            report.example("incomplete", f"{key}: {_shown(record)}")
        else:
            kept.append(record)
    size_names = {TickFamily.QUOTES: ("bs", "as"), TickFamily.TRADES: ("s",), TickFamily.MID: ()}[family]
    sizes = {}
    if size_names:
        valid = np.ones(len(kept), dtype=bool)
        for name in size_names:
            units, exact, ok = size_units([r[name] for r in kept])
            sizes[name] = (units, exact)
            valid &= ok
        if not valid.all():
            for i in np.flatnonzero(~valid)[:EXAMPLES_KEPT]:
                report.example("bad size", f"{key}: {_shown(kept[int(i)])}")
            stream.skipped[SKIP_BAD_SIZE] += int((~valid).sum())
            kept = [r for r, ok in zip(kept, valid) if ok]
            sizes = {name: (units[valid], exact[valid]) for name, (units, exact) in sizes.items()}
        for name, (units, exact) in sizes.items():
            for i in np.flatnonzero(~exact):
                stream.sizes_rounded += 1
                report.example("size rounded", f"{key} st {kept[int(i)]['st']}: {kept[int(i)][name]!r} -> "
                                               f"{decimal_array(units[int(i):int(i) + 1])[0].as_py()}")
    schema = schema_for(key.tick_type)
    n = len(kept)
    columns: dict[str, pa.Array] = {
        "ts": pa.array(np.fromiter((r["st"] for r in kept), np.int64, n), TIMESTAMP),
        "ib_time": pa.array(np.fromiter((r["ts"] for r in kept), np.int64, n), TIMESTAMP),
    }

    def prices(name: str) -> pa.Array:
        return pa.array(np.fromiter((r[name] for r in kept), np.float64, n), pa.float64())

    def flags(name: str) -> pa.Array:
        return pa.array(np.fromiter((r.get(name) is True for r in kept), np.bool_, n), pa.bool_())

    if family is TickFamily.QUOTES:
        columns |= {"bid_price": prices("bp"), "ask_price": prices("ap"), "bid_size": decimal_array(sizes["bs"][0]),
                    "ask_size": decimal_array(sizes["as"][0]), "bid_past_low": flags("bpl"),
                    "ask_past_high": flags("aph")}
    elif family is TickFamily.TRADES:
        columns |= {"price": prices("p"), "size": decimal_array(sizes["s"][0]),
                    "exchange": pa.array([""] * n, pa.string()), "special_conditions": pa.array([""] * n, pa.string()),
                    "past_limit": pa.array(np.zeros(n, np.bool_), pa.bool_()), "unreported": flags("upt")}
    else:
        columns["mid_point"] = prices("mp")
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


# -- the import --------------------------------------------------------------------------------------

@dataclass
class _StreamState:
    """What the store holds of one stream, read once before its files."""

    published: dict[int, ArchiveEntry]
    imported_before: set[int]
    expired: set[int]
    buffered: set[int]
    recorded: list[tuple[int, int]]  # our own 'recorded' coverage spans [start, end)


def _stream_state(index: Index, buffer_root: Path, key: StreamKey) -> _StreamState:
    cid, tt = key.contract_id, key.tick_type.value
    published = {e.hour_start_us: e for e in index.archives(cid, tt, 0, 2**62)}
    rows = index.coverage(cid, tt, 0, 2**62)
    imported = {hour for r in rows if r.reason == IMPORT_REASON and r.end_us is not None
                for hour in range(hour_floor(r.start_us), r.end_us, US_PER_HOUR)} & set(published)
    recorded = sorted((r.start_us, r.end_us) for r in rows
                      if r.status == "recorded" and r.reason != IMPORT_REASON and r.end_us is not None)
    expired = {h.hour_start_us for h in index.expired(cid, tt)}
    buffered = {hour_floor(segment_start_us(p)) for p in list_segments(stream_dir(buffer_root, key))}
    return _StreamState(published, imported, expired, buffered - set(published), recorded)


def _inside(ts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(len(ts), dtype=bool)
    for start, end in spans:
        if start < end:
            mask |= (ts >= start) & (ts < end)
    return mask


def _minus(start: int, end: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """[start, end) less the given spans."""
    pieces = [(start, end)]
    for a, b in spans:
        pieces = [piece for lo, hi in pieces
                  for piece in ((lo, min(hi, a)), (max(lo, b), hi)) if piece[0] < piece[1]]
    return pieces


class _Importer:
    def __init__(self, index: Index, archiver: Archiver | None, buffer_root: Path, archive_root: Path,
                 source: SourceRoot, report: ImportReport, horizon_us: int):
        self.index, self.archiver, self.buffer_root, self.archive_root = index, archiver, buffer_root, archive_root
        self.source, self.report, self.horizon = source, report, horizon_us
        self.counted: set[tuple[StreamKey, int]] = set()  # hours reported (imported now, or before)

    def run(self, files: list[SourceFile], progress: Progress) -> None:
        by_stream: dict[StreamKey, list[SourceFile]] = defaultdict(list)
        for f in files:
            by_stream[f.key].append(f)
        states = {key: _stream_state(self.index, self.buffer_root, key) for key in by_stream}
        todo = []
        for key, stream_files in sorted(by_stream.items()):
            done = states[key].imported_before
            for f in stream_files:
                if {f.hour_us - US_PER_HOUR, f.hour_us, f.hour_us + US_PER_HOUR} <= done:
                    self.report.files_skipped += (f.json is not None) + (f.protobuf is not None)
                    self._already(key, states[key], f.hour_us)
                else:
                    todo.append(f)
        current: StreamKey | None = None
        buckets: dict[int, list[pa.Table]] = {}
        flushed: set[int] = set()
        for source in progress(todo, "importing IB-Stream hours (JSON + protobuf)", len(todo)):
            records = self._read(source)
            if source.key != current:
                if current is not None:
                    self._flush(current, states[current], buckets, flushed, until=None)
                    failpoint("import.after_stream")
                current, buckets, flushed = source.key, {}, set()
            state = states[source.key]
            table = to_table(self.report, source.key, records)
            self._bucket(source.key, table, buckets, flushed)
            self._flush(source.key, state, buckets, flushed, until=source.hour_us)
        if current is not None:
            self._flush(current, states[current], buckets, flushed, until=None)

    def _read(self, source: SourceFile) -> list[dict]:
        """One stream-hour's records: the JSON copy cross-checked against the protobuf copy."""
        copies: dict[str, list[dict] | None] = {"json": None, "protobuf": None}
        for copy, path, reader in (("json", source.json, read_json_copy),
                                   ("protobuf", source.protobuf, read_protobuf_copy)):
            if path is None:
                continue
            records, bad = reader(path)
            copies[copy] = records
            if bad:
                self.report.unreadable[copy] += bad
                self.report.example("unreadable", f"{path.relative_to(self.source.root)}: {bad} records")
            if copy == "json":
                self.report.json_files += 1
            else:
                self.report.protobuf_files += 1
        records = merge_copies(self.report, source, copies["json"], copies["protobuf"])
        self.report.stream(source.key).records += len(records)
        return records

    def _bucket(self, key: StreamKey, table: pa.Table, buckets: dict[int, list[pa.Table]], flushed: set[int]) -> None:
        if not table.num_rows:
            return
        ts = as_micros(table.column("ts"))
        hours = ts - ts % US_PER_HOUR
        for hour in np.unique(hours):
            hour = int(hour)
            part = table.filter(pa.array(hours == hour))
            if hour in flushed:
                self.report.stream(key).skipped[SKIP_LATE] += part.num_rows
            else:
                buckets.setdefault(hour, []).append(part)

    def _flush(self, key: StreamKey, state: _StreamState, buckets: dict[int, list[pa.Table]], flushed: set[int], *,
               until: int | None) -> None:
        """Import every bucketed hour no later file can add to: before the file hour ``until`` less the
        skew (the ticks of later files have ``st`` past it), or all (``until`` None)."""
        for hour in sorted(buckets):
            if until is not None and hour + MAX_SKEW_US > until:
                break
            self._hour(key, state, hour, pa.concat_tables(buckets.pop(hour)))
            flushed.add(hour)

    def _already(self, key: StreamKey, state: _StreamState, hour: int) -> None:
        if (key, hour) in self.counted or hour not in state.published:
            return
        self.counted.add((key, hour))
        stream = self.report.stream(key)
        stream.already_imported_hours += 1
        stream.already_imported_ticks += state.published[hour].tick_count

    def _hour(self, key: StreamKey, state: _StreamState, hour: int, table: pa.Table) -> None:
        stream = self.report.stream(key)
        ts = as_micros(table.column("ts"))
        order = np.argsort(ts, kind="stable")  # by receive time; file order, then line order, for ties
        if len(ts) > 1 and bool((ts[1:] < ts[:-1]).any()):
            stream.reordered += int((ts[1:] < np.maximum.accumulate(ts)[:-1]).sum())
            table, ts = table.take(pa.array(order)), ts[order]
        if hour in state.published and hour not in state.imported_before and self._repair(key, state, hour):
            state.imported_before.add(hour)
        if hour in state.imported_before:
            self._already(key, state, hour)
            return
        held = SKIP_OURS_ARCHIVED if hour in state.published else SKIP_OURS_BUFFERED if hour in state.buffered \
            else SKIP_EXPIRED if hour in state.expired else None
        if held is not None:
            stream.skipped[held] += len(ts)
            if held != SKIP_EXPIRED:
                stream.in_our_gaps += int((~_inside(ts, state.recorded)).sum())
            return
        if hour + US_PER_HOUR > self.horizon:
            stream.skipped[SKIP_NOT_OVER] += len(ts)
            return
        ours = _inside(ts, state.recorded)
        if ours.any():
            stream.skipped[SKIP_RECORDED] += int(ours.sum())
            table, ts = table.filter(pa.array(~ours)), ts[~ours]
        if not len(ts):
            return
        spans = _minus(int(ts[0]), min(int(ts[-1]) + 1, hour + US_PER_HOUR),
                       [(max(a, hour), min(b, hour + US_PER_HOUR)) for a, b in state.recorded
                        if a < hour + US_PER_HOUR and b > hour])
        coverage = [CoverageInterval(key.contract_id, key.tick_type.value, "recorded", IMPORT_REASON, a, b, False)
                    for a, b in spans]
        stream.hours.append(hour)
        stream.imported += table.num_rows
        if self.archiver is None:  # a dry run
            return
        missing = MISSING_FIELDS[key.tick_type.family]
        source = {"kind": SOURCE_KIND, "root": str(self.source.root), "copy": "json",
                  "cross_checked": "protobuf", "missing_fields": sorted(missing), "stored_instead": missing}
        self.archiver.writer.seal(key, hour + US_PER_HOUR)
        self.archiver.publish_hour(key, hour, table.combine_chunks(), coverage, source)
        state.published[hour] = ArchiveEntry(key.contract_id, key.tick_type.value, hour, int(ts[0]), int(ts[-1]), "",
                                             table.num_rows, 0, 0)
        state.imported_before.add(hour)
        self.counted.add((key, hour))  # imported now, not "before"

    def _repair(self, key: StreamKey, state: _StreamState, hour: int) -> bool:
        """Whether a published hour without our coverage rows is an import's file (the index adopted it
        after a kill between rename and publish, keeping coverage it already had); if so its rows are
        added from the file's metadata."""
        entry = state.published[hour]
        if entry.row_group_count is not None:
            return False
        try:
            facts = file_facts(self.archive_root, self.archive_root / entry.file_path)
        except (DamagedDataError, OSError):  # not ours to judge here: `ibstream verify` reports it
            return False
        if not facts or not isinstance(facts[0].source, dict) or facts[0].source.get("kind") != SOURCE_KIND:
            return False
        rows = [row for row in coverage_rows(key, facts[0].coverage) if row.reason == IMPORT_REASON]
        if self.archiver is not None and rows:
            self.index.add_coverage(rows)
            log.warning("%s hour %s: added the coverage rows of its imported file (adopted after an interrupted "
                        "import)", key, iso(hour))
        return True


def import_ib_stream(store, root: Path, *, contract_ids: Iterable[int] | None = None, dry_run: bool = False,
                     now: int | None = None, progress: Progress = _quiet) -> ImportReport:
    """Import the IB-Stream root ``root`` into ``store`` (a writable :class:`~ibstream.storage.Store`;
    with ``dry_run`` a read-only one will do, and nothing is written). ``contract_ids`` limits it to
    those contracts; ``now`` (µs) decides which hours are over. See the module's docstring."""
    source = scan_root(Path(root))
    report = ImportReport(Path(root), dry_run, v2_files=source.v2_files, unrecognised=source.unrecognised)
    wanted = None if contract_ids is None else set(contract_ids)
    files = [f for f in source.files if wanted is None or f.key.contract_id in wanted]
    if not dry_run and store.archiver is None:
        raise InvalidRequestError("importing needs a writable store (open it without read_only, or use dry_run)")
    horizon = (now_us() if now is None else now) - duration_us(store.settings.archive_delay)
    importer = _Importer(store.index, None if dry_run else store.archiver, store.settings.buffer_root,
                         store.settings.archive_root, source, report, horizon)
    importer.run(files, progress)
    if not dry_run:
        store.cache.clear()
    log.debug("import of %s: %s ticks in %d stream-hours", root, f"{report.imported:,}", report.hours)
    return report


__all__ = ["IMPORT_REASON", "ImportReport", "StreamReport", "decode_tick_message", "encode_tick_message",
           "import_ib_stream", "scan_root", "size_units", "write_ib_stream_v3"]
