"""The HTTP gateway: REST and Server-Sent Events over the same store, limits and errors as Flight.

FastAPI on uvicorn (on a background thread, :class:`~ibstream.monitoring.HttpServer`), started by
``ibstream record`` and ``ibstream serve`` when ``http_port`` is set. Every query goes through the
Flight server's :class:`~ibstream.flight_server.queries.QueryService` (the same instance: one set of
stream slots, per-token caps and stats): the query string becomes the Flight command
(:class:`~ibstream.flight_server.commands.QueryCommand`), validated by the same model, planned and
limited by the same code, and read batch by batch, so a full day never sits in memory at once.

* ``GET /v2/historical/{contract_id}``: ticks or bars of a range, window or session as a JSON array,
  NDJSON, CSV or an Arrow IPC stream (``format=`` or the ``Accept`` header).
* ``GET /v2/sessions/{contract_id}/{current|previous|YYYY-MM-DD}``, ``/v2/statistics/{contract_id}``,
  ``/v2/coverage/{contract_id}/{tick_type}``, ``/v2/streams``: the actions, and what is stored.
* ``GET /v2/stream/{contract_id}[/live][/{tick_type}]``, ``/v2/stream/{contract_id}/buffer``: live
  ticks as Server-Sent Events in IB-Stream's v2 envelope (IB-Studies' URLs); each tick's ``id:`` is
  our cursor, so a reconnect with ``Last-Event-ID`` resumes exactly once.
* ``GET /health``, ``GET /v2/info``; OpenAPI at ``/docs``.

proto_docs/http-gateway.md is the contract: parameters, content types, the envelope, error mapping.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import queue
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from fastapi import Depends, FastAPI, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ibstream.core.errors import (
    MESSAGE_LIMIT,
    IbstreamError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    ServerUnavailableError,
    SubscriberTooSlowError,
    UnauthenticatedError,
    shown,
)
from ibstream.core.times import as_micros, iso, now_us
from ibstream.flight_server.auth import Caller
from ibstream.flight_server.commands import QueryCommand, Ticket
from ibstream.flight_server.queries import Answer, QueryService
from ibstream.monitoring import HttpServer
from ibstream.settings import Settings
from ibstream.storage.export import csv_batch, csv_schema, iso_text
from ibstream.storage.live import Cursor
from ibstream.storage.schemas import TickType

log = logging.getLogger(__name__)

PROTOCOL_VERSION = "2.0.0"  # IB-Stream's v2 envelope, as its X-IB-Stream-Version header says
ARROW_STREAM = "application/vnd.apache.arrow.stream"
MEDIA_TYPES = {"json": "application/json", "ndjson": "application/x-ndjson", "csv": "text/csv",
               "arrow": ARROW_STREAM}
SSE_QUEUE_BATCHES = 16  # batches read ahead of one SSE response; past it the reader's live queue fills
SSE_EVENT_ROWS = 2_048  # ticks formatted at once (bounds how long the event loop spends on one chunk)
MAX_STREAM_TIMEOUT = 86_400.0  # seconds; IB-Stream allows 5 to 3600
MAX_STREAM_LIMIT = 10_000_000  # ticks
IB_NAMES = {t.ib_name: t.value for t in TickType}  # BidAsk -> bid_ask: IB-Stream accepts both spellings
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([wdhms])")
_UNITS = {"w": 604_800, "d": 86_400, "h": 3_600, "m": 60, "s": 1}


# -- errors ------------------------------------------------------------------------------------------


def status_of(exc: IbstreamError) -> int:
    """The HTTP status of one of our errors (proto_docs/http-gateway.md §errors)."""
    if isinstance(exc, InvalidRequestError):
        return 400  # request_too_large too: the code tells them apart
    if isinstance(exc, NotFoundError):
        return 404  # expired too
    if isinstance(exc, UnauthenticatedError):
        return 401
    if isinstance(exc, PermissionDeniedError):
        return 403
    if isinstance(exc, ServerUnavailableError):
        return 503  # server_busy, subscriber_too_slow, unavailable
    return 500  # corrupt_file, damaged_data, internal: never for bad input


def error_body(code: str, message: str) -> dict:
    if len(message) > MESSAGE_LIMIT:
        message = f"{message[:MESSAGE_LIMIT]}... (cut from {len(message):,} characters)"
    return {"error": {"code": code, "message": message}}


def _error_response(exc: IbstreamError) -> JSONResponse:
    status = status_of(exc)
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(error_body(exc.code, str(exc)), status_code=status, headers=headers)


# -- parameters ----------------------------------------------------------------------------------------


def _allowed(request: Request, names: set[str]) -> None:
    unknown = sorted(set(request.query_params) - names)
    if unknown:
        raise InvalidRequestError(f"unknown query parameter {shown(unknown[0])}; this endpoint takes "
                                  f"{', '.join(sorted(names))}")
    repeated = sorted({k for k in request.query_params if len(request.query_params.getlist(k)) > 1})
    if repeated:
        raise InvalidRequestError(f"query parameter {shown(repeated[0])} is given twice; give it once "
                                  "(lists are comma-separated: tick_types=bid_ask,last)")


def _contract_id(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,12}", text):
        raise InvalidRequestError(f"contract_id was {shown(text)}; use an IB contract id, a positive integer "
                                  "such as 265598")
    return int(text)


def _tick_type_name(text: str) -> str:
    name = text.strip()
    return IB_NAMES.get(name, name)


def _tick_types(text: str | None) -> list[str]:
    if text is None or not text.strip():
        raise InvalidRequestError("tick_types is missing; give a comma-separated list, e.g. tick_types=bid_ask,last "
                                  f"(any of {', '.join(t.value for t in TickType)})")
    return [_tick_type_name(part) for part in text.split(",")]


def _flag(name: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise InvalidRequestError(f"{name} was {shown(text)}; use true or false")


def _seconds(name: str, text: str | None, low: float, high: float) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not low < value <= high:  # NaN fails too
        raise InvalidRequestError(f"{name} was {shown(text)}; use a number of seconds above {low:g} and up to "
                                  f"{high:g}")
    return value


def _limit(text: str | None) -> int | None:
    if text is None:
        return None
    if not re.fullmatch(r"[0-9]{1,9}", text) or not 1 <= int(text) <= MAX_STREAM_LIMIT:
        raise InvalidRequestError(f"limit was {shown(text)}; use a number of ticks from 1 to {MAX_STREAM_LIMIT:,}")
    return int(text)


def parse_duration(text: str) -> int:
    """``buffer_duration`` in microseconds: IB-Stream's forms (``1h``, ``30m``, ``2h30m``, ``1d``, ``1w``,
    ``90s``) or a plain number of seconds."""
    value = text.strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif value and _DURATION.sub("", value).strip() == "":
        seconds = sum(float(number) * _UNITS[unit] for number, unit in _DURATION.findall(value))
    if seconds is None or not 0 < seconds <= 366 * 86_400:
        raise InvalidRequestError(f"buffer_duration was {shown(text)}; use a duration such as 1h, 30m, 2h30m, 1d or "
                                  "a number of seconds, above 0 and up to 366 days")
    return int(seconds * 1_000_000)


def _command(payload: dict) -> QueryCommand:
    """The Flight command for an HTTP query: the same bytes, the same model, the same messages."""
    return QueryCommand.parse(json.dumps({"version": 1, **payload}).encode())


def _format(request: Request, format: str | None) -> str:
    """``format=`` (json, ndjson, csv, arrow), else the best of the Accept header; JSON by default."""
    if format is not None:
        if format not in MEDIA_TYPES:
            raise InvalidRequestError(f"format was {shown(format)}; use any of {', '.join(MEDIA_TYPES)}")
        return format
    accept = request.headers.get("accept", "")
    offers = []
    for position, part in enumerate(accept.split(",")):
        media, *options = [p.strip() for p in part.split(";")]
        quality = 1.0
        for option in options:
            if option.startswith("q="):
                try:
                    quality = float(option[2:])
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            offers.append((-quality, position, media.lower()))
    if not offers:
        return "json"
    by_type = {media: name for name, media in MEDIA_TYPES.items()} | {"application/*": "json", "*/*": "json",
                                                                     "text/*": "csv", "application/ndjson": "ndjson"}
    for _, _, media in sorted(offers):
        if media in by_type:
            return by_type[media]
    raise _NotAcceptable(f"none of the media types in the Accept header ({shown(accept)}) is served here; accept "
                         f"any of {', '.join(MEDIA_TYPES.values())}, or give format=json|ndjson|csv|arrow")


class _NotAcceptable(InvalidRequestError):
    pass


# -- writers: one per content type, each fed batch by batch -------------------------------------------


def _text_columns(batch: pa.RecordBatch) -> list[pa.Array]:
    """The columns of ``batch`` as JSON carries them: times ISO-8601 UTC with microseconds, decimals and
    dates as their exact text, everything else as it is."""
    columns = []
    for column in batch.columns:
        if pa.types.is_timestamp(column.type):
            columns.append(iso_text(column))
        elif pa.types.is_decimal(column.type) or pa.types.is_date(column.type):
            columns.append(pc.cast(column, pa.string()))
        else:
            columns.append(column)
    return columns


def json_lines(batch: pa.RecordBatch, tags: dict[str, Any] | None = None,
               names: dict[str, str] | None = None) -> str:
    """One JSON object per row of ``batch`` (NDJSON text), ``tags`` first in each, columns renamed by
    ``names``; floats as the shortest text that reads back to the same float64."""
    names = names or {}
    frame = pl.from_arrow(pa.RecordBatch.from_arrays(_text_columns(batch),
                                                     names=[names.get(n, n) for n in batch.schema.names]))
    assert isinstance(frame, pl.DataFrame)
    if tags:
        frame = frame.select([pl.lit(value).alias(key) for key, value in tags.items()] + [pl.all()])
    return frame.write_ndjson() if frame.height else ""


class _Writer:
    """Turns the batches of an answer into the bytes of one content type."""

    media_type = "application/json"

    def __init__(self, schema: pa.Schema, tagged: bool):
        self.schema = schema  # the output schema (tags included when tagged)
        self.tagged = tagged  # several endpoints: each row names its contract and tick type

    def head(self) -> bytes:
        return b""

    def rows(self, batch: pa.RecordBatch, ticket: Ticket | None) -> bytes:
        raise NotImplementedError

    def tail(self) -> bytes:
        return b""

    def _tags(self, ticket: Ticket | None) -> dict[str, Any]:
        """JSON rows always name their contract and tick type (CSV and Arrow rows of one endpoint are the
        Flight stream's columns exactly)."""
        return {} if ticket is None else {"contract_id": ticket.contract_id, "tick_type": ticket.tick_type.value}

    def _tagged(self, batch: pa.RecordBatch, ticket: Ticket | None) -> pa.RecordBatch:
        if not self.tagged or ticket is None:
            return batch
        tags = [pa.array([ticket.tick_type.value] * batch.num_rows, pa.string())]
        if not ticket.continuous:  # a continuous contract's rows name their expiry already
            tags.insert(0, pa.array(np.full(batch.num_rows, ticket.contract_id, dtype=np.int64)))
        return pa.RecordBatch.from_arrays(tags + batch.columns, schema=self.schema)


class _NdjsonWriter(_Writer):
    media_type = MEDIA_TYPES["ndjson"]

    def rows(self, batch, ticket):
        return json_lines(batch, self._tags(ticket)).encode()


class _JsonWriter(_Writer):
    """A JSON array streamed row by row: ``[``, the objects separated by ``,``, ``]``."""

    media_type = MEDIA_TYPES["json"]

    def __init__(self, schema, tagged):
        super().__init__(schema, tagged)
        self._first = True

    def head(self):
        return b"["

    def rows(self, batch, ticket):
        text = json_lines(batch, self._tags(ticket))
        if not text:
            return b""
        body = text.rstrip("\n").replace("\n", ",\n")  # JSON text never holds a raw newline inside a value
        separator = "\n" if self._first else ",\n"
        self._first = False
        return (separator + body).encode()

    def tail(self):
        return b"]\n" if self._first else b"\n]\n"


class _CsvWriter(_Writer):
    """CSV as ``ibstream export`` writes it (the same code): a header, ISO times, exact decimals."""

    media_type = MEDIA_TYPES["csv"]

    def __init__(self, schema, tagged):
        super().__init__(schema, tagged)
        self.text_schema = csv_schema(schema)

    def head(self):
        sink = io.BytesIO()
        pacsv.write_csv(self.text_schema.empty_table(), sink)
        return sink.getvalue()

    def rows(self, batch, ticket):
        if not batch.num_rows:
            return b""
        sink = io.BytesIO()
        pacsv.write_csv(csv_batch(self._tagged(batch, ticket), self.text_schema), sink,
                        pacsv.WriteOptions(include_header=False))
        return sink.getvalue()


class _ArrowWriter(_Writer):
    """An Arrow IPC stream: the schema message, one message per batch, the end-of-stream marker."""

    media_type = ARROW_STREAM

    def __init__(self, schema, tagged):
        super().__init__(schema, tagged)
        self._sink = io.BytesIO()
        self._writer = pa.ipc.new_stream(self._sink, schema)

    def _taken(self) -> bytes:
        data = self._sink.getvalue()
        self._sink.seek(0)
        self._sink.truncate()
        return data

    def head(self):
        return self._taken()

    def rows(self, batch, ticket):
        if not batch.num_rows:
            return b""
        self._writer.write_batch(self._tagged(batch, ticket))
        return self._taken()

    def tail(self):
        self._writer.close()
        return self._taken()


WRITERS: dict[str, type[_Writer]] = {"json": _JsonWriter, "ndjson": _NdjsonWriter, "csv": _CsvWriter,
                                     "arrow": _ArrowWriter}


def _output_schema(answers_schema: list[pa.Schema], tickets: list[Ticket], format: str) -> tuple[pa.Schema, bool]:
    """The schema of a response and whether rows are tagged with their contract and tick type (several
    endpoints). CSV and Arrow carry one schema: the endpoints' columns must agree."""
    first = answers_schema[0]
    if len(tickets) == 1:
        return first, False
    if format in ("csv", "arrow") and not all(s.equals(first) for s in answers_schema[1:]):
        raise InvalidRequestError(
            f"tick types {', '.join(dict.fromkeys(t.tick_type.value for t in tickets))} have different columns, and a "
            f"{format} response has one set of columns; ask for one tick type at a time, or for JSON (format=json), "
            "whose rows each name their tick type")
    tags = [pa.field("contract_id", pa.int64(), nullable=False), pa.field("tick_type", pa.string(), nullable=False)]
    tags = [tag for tag in tags if tag.name not in first.names]
    metadata = {"ibstream.tick_types": ",".join(dict.fromkeys(t.tick_type.value for t in tickets)),
                "ibstream.contract_ids": ",".join(dict.fromkeys(str(t.contract_id) for t in tickets))}
    return pa.schema(tags + list(first.remove_metadata()), metadata=metadata), True


# -- Server-Sent Events ----------------------------------------------------------------------------------

_SSE_NAMES = {"special_conditions": "conditions", "mid_point": "midpoint"}  # IB-Stream's data keys


def _stream_id(contract_id: int, tick_type: str) -> str:
    """IB-Stream's stream id: ``{contract_id}_{tick_type}_{milliseconds}_{random}``."""
    return f"{contract_id}_{tick_type}_{int(time.time() * 1000)}_{random.randint(1000, 9999)}"


def event(kind: str, body: dict, event_id: str | None = None) -> str:
    """One SSE event: ``id:`` (ticks only), ``event:`` (the message type) and one ``data:`` line."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {kind}\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


def _message(kind: str, stream_id: str, data: dict, metadata: dict | None = None) -> dict:
    message = {"type": kind, "stream_id": stream_id, "timestamp": iso(now_us()), "data": data}
    if metadata:
        message["metadata"] = metadata
    return message


def _row_cursors(before: Cursor, ts: np.ndarray) -> list[str]:
    """The cursor after each tick of a ts-ordered batch that follows ``before``."""
    starts = np.searchsorted(ts, ts, side="left")
    n = np.arange(len(ts)) - starts + 1
    n = np.where(ts == before.ts, n + before.n, n)
    return [f"{t}:{k}" for t, k in zip(ts.tolist(), n.tolist())]


def _tick_bodies(batch: pa.RecordBatch, contract_id: int, tick_type: str, stream_id: str, historical: bool) -> list[str]:
    """The ``data:`` JSON of each tick: IB-Stream's envelope around the tick's fields (its names:
    ``conditions``, ``midpoint``; ``timestamp``/``unix_time`` are IB's time), sizes as exact text."""
    ib_time = batch.column("ib_time")
    extra = pa.RecordBatch.from_arrays(
        [ib_time, pc.divide(ib_time.cast(pa.int64()), 1_000_000)], names=["timestamp", "unix_time"])
    data = pa.RecordBatch.from_arrays(batch.columns[2:] + extra.columns + batch.columns[:2],
                                      names=batch.schema.names[2:] + extra.schema.names + batch.schema.names[:2])
    lines = json_lines(data, {"contract_id": contract_id, "tick_type": tick_type}, _SSE_NAMES).splitlines()
    stamps = iso_text(batch.column("ts")).to_pylist()
    head = '{"type":"tick","stream_id":"' + stream_id + '","timestamp":"'
    tail = ',"metadata":{"historical":' + ("true" if historical else "false") + "}}"
    return [f'{head}{stamp}","data":{line}{tail}' for stamp, line in zip(stamps, lines)]


class _Feed:
    """One tick type of an SSE response: its answer (a live stream holding a slot) and where it is."""

    def __init__(self, answer: Answer, stream_id: str):
        self.answer = answer
        self.ticket = answer.ticket
        self.tick_type = answer.ticket.tick_type.value
        self.stream_id = stream_id
        self.cursor = Cursor(answer.ticket.start_us, answer.ticket.skip)
        self.ticks = 0
        self.historical = 0
        self.seamed = False  # the info live_start was sent
        self.ended = False


class _Streams:
    """The feeds of one SSE response, each read on its own thread into one bounded queue; the event loop
    takes from it without holding a thread. A reader that stops taking fills the queue, the feed's live
    subscription overflows and the feed fails with SubscriberTooSlowError (``failure``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, feeds: list[_Feed], closed: threading.Event):
        self.loop = loop
        self.feeds = feeds
        self.items: queue.Queue = queue.Queue(SSE_QUEUE_BATCHES)
        self.ready = asyncio.Event()
        self.closed = closed  # the response is done: the feeds stop (their live streams' ``cancelled``)
        self.failure: tuple[_Feed, IbstreamError] | None = None
        self.threads = [threading.Thread(target=self._read, args=(feed,), name=f"sse-{feed.stream_id}", daemon=True)
                        for feed in feeds]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self.ready.set)
        except RuntimeError:  # the loop is closed: the response is gone
            self.closed.set()

    def _put(self, item: tuple) -> bool:
        while not self.closed.is_set():
            try:
                self.items.put(item, timeout=0.25)
            except queue.Full:
                continue
            self._wake()
            return True
        return False

    def _read(self, feed: _Feed) -> None:
        batches = feed.answer.batches
        assert batches is not None
        cursor = feed.cursor
        try:
            for batch, after, live in batches:
                if self.closed.is_set():
                    break
                if not batch.num_rows:
                    if not self._put(("quiet", feed, live, None, None)):
                        break
                    continue
                for offset in range(0, batch.num_rows, SSE_EVENT_ROWS):
                    part = batch.slice(offset, SSE_EVENT_ROWS)
                    ts = as_micros(part.column("ts"))
                    cursors = _row_cursors(cursor, ts)
                    cursor = Cursor.parse(cursors[-1])
                    bodies = _tick_bodies(part, feed.ticket.contract_id, feed.tick_type, feed.stream_id, not live)
                    if not self._put(("ticks", feed, live, bodies, cursors)):
                        return
            else:
                self._put(("end", feed, True, None, None))
        except IbstreamError as exc:
            self.failure = (feed, exc)
            self._wake()
        except Exception as exc:  # a bug: say so on the stream rather than hang it
            log.exception("SSE feed %s failed", feed.stream_id)
            self.failure = (feed, IbstreamError(f"{type(exc).__name__}: {exc}"))
            self._wake()
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()  # gives the slot back, unsubscribes the live feed

    async def take(self, timeout: float) -> tuple | None:
        """The next item, or None after ``timeout`` seconds without one."""
        try:
            return self.items.get_nowait()
        except queue.Empty:
            pass
        self.ready.clear()
        try:
            return self.items.get_nowait()
        except queue.Empty:
            pass
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            return None
        try:
            return self.items.get_nowait()
        except queue.Empty:
            return None

    def close(self) -> None:
        self.closed.set()


class _SseRequest:
    """What an SSE request asks: its feeds' commands and the stream options."""

    def __init__(self, contract_id: int, tick_types: list[str], *, start_us: int, resume: dict[str, str],
                 timeout: float | None, limit: int | None, buffer_duration: str | None):
        self.contract_id = contract_id
        self.tick_types = list(dict.fromkeys(tick_types))  # IB-Stream drops repeats
        self.start_us = start_us
        self.resume = resume
        self.timeout = timeout
        self.limit = limit
        self.buffer_duration = buffer_duration

    def commands(self) -> list[QueryCommand]:
        commands = []
        for tick_type in self.tick_types:
            payload: dict[str, Any] = {"contract_id": self.contract_id, "tick_types": [tick_type], "live": True}
            if tick_type in self.resume:
                payload["cursor"] = self.resume[tick_type]
            else:
                payload["start"] = iso(self.start_us)
            commands.append(_command(payload))
        return commands


def parse_event_id(text: str, tick_types: list[str]) -> dict[str, str]:
    """The cursors a ``Last-Event-ID`` names: ``<ts>:<n>`` (one tick type) or ``bid_ask=<ts>:<n>,last=<ts>:<n>``."""
    resume: dict[str, str] = {}
    value = text.strip()
    if "=" not in value:
        if len(tick_types) != 1:
            raise InvalidRequestError(f"Last-Event-ID was {shown(text)}: a stream of several tick types resumes from "
                                      "an id naming each, e.g. bid_ask=1736519400123456:1,last=1736519400000000:3 (the "
                                      "id of the last event received)")
        Cursor.parse(value)
        return {tick_types[0]: value}
    for part in value.split(","):
        name, _, cursor = part.partition("=")
        name = _tick_type_name(name)
        if name not in tick_types or name in resume:
            raise InvalidRequestError(f"Last-Event-ID was {shown(text)}: it names {shown(name)}, which this stream "
                                      f"({', '.join(tick_types)}) does not have, or names it twice")
        Cursor.parse(cursor)
        resume[name] = cursor
    return resume


def _sse_error(feed: _Feed | None, exc: IbstreamError, event_id: str | None) -> str:
    data = {"code": exc.code.upper(), "message": str(exc)[:MESSAGE_LIMIT],
            "details": {"ibstream_code": exc.code, "last_event_id": event_id,
                        "suggestion": "reconnect with Last-Event-ID to resume exactly after the last tick received"
                        if isinstance(exc, ServerUnavailableError) else "check the request"},
            "recoverable": isinstance(exc, ServerUnavailableError)}
    return event("error", _message("error", feed.stream_id if feed else "", data))


def _event_id(feeds: list[_Feed]) -> str:
    if len(feeds) == 1:
        return str(feeds[0].cursor)
    return ",".join(f"{f.tick_type}={f.cursor}" for f in feeds)


async def _sse(streams: _Streams, request: _SseRequest, stopped: Callable[[], bool]) -> AsyncIterator[str]:
    """The events of one SSE response: ``info`` (subscribed; live_start at each feed's seam), ``tick`` (with
    the cursor ``id:``), keep-alive comments, and one ``complete`` per stream (reason ``timeout``,
    ``limit_reached``, ``server_shutdown`` or ``end``) or an ``error``."""
    feeds = streams.feeds
    started = time.monotonic()
    deadline = None if request.timeout is None else started + request.timeout
    config = {"tick_types": request.tick_types, "timeout_seconds": request.timeout, "limit": request.limit,
              "buffer_duration": request.buffer_duration}
    try:
        for feed in feeds:
            yield event("info", _message("info", feed.stream_id, {
                "status": "subscribed", "contract_id": request.contract_id, "tick_type": feed.tick_type,
                "stream_config": config | {"tick_type": feed.tick_type, "start": iso(feed.ticket.start_us),
                                           "resumed": feed.tick_type in request.resume}}))
        streams.start()
        reason = None
        while reason is None:
            if streams.failure is not None:
                feed, exc = streams.failure
                if stopped() and not isinstance(exc, SubscriberTooSlowError):
                    reason = "server_shutdown"
                    break
                yield _sse_error(feed, exc, _event_id(feeds))
                return
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                reason = "timeout"
                break
            item = await streams.take(min(wait, 1.0))
            if item is None:
                if stopped():
                    reason = "server_shutdown"
                continue
            kind, feed, live, bodies, cursors = item
            if kind == "quiet":
                if live and not feed.seamed:
                    feed.seamed = True
                    yield event("info", _message("info", feed.stream_id, {
                        "status": "live_start", "contract_id": request.contract_id, "tick_type": feed.tick_type,
                        "historical_ticks": feed.historical}))
                else:
                    yield ": keep-alive\n\n"
                continue
            if kind == "end":
                feed.ended = True
                if all(f.ended for f in feeds):
                    reason = "end"
                continue
            chunk = []
            for body, cursor in zip(bodies, cursors):
                if request.limit is not None and sum(f.ticks - f.historical for f in feeds) >= request.limit:
                    reason = "limit_reached"
                    break
                feed.cursor = Cursor.parse(cursor)
                feed.ticks += 1
                if not live:
                    feed.historical += 1
                chunk.append(f"id: {_event_id(feeds)}\nevent: tick\ndata: {body}\n\n")
            if chunk:
                yield "".join(chunk)
        for feed in feeds:
            yield event("complete", _message("complete", feed.stream_id, {
                "reason": reason, "total_ticks": feed.ticks, "duration_seconds": round(time.monotonic() - started, 3),
                "final_sequence": feed.ticks, "last_event_id": _event_id(feeds)}))
    finally:
        streams.close()


# -- the app ---------------------------------------------------------------------------------------------


HISTORICAL = {"tick_types", "start_time", "end_time", "start", "end", "window", "session", "session_date",
              "resolution", "fill", "daily_session", "cursor", "provenance", "format"}
STREAMING = {"tick_types", "timeout", "limit", "last_event_id"}


def create_app(queries: QueryService, closing: threading.Event | None = None) -> FastAPI:
    """The gateway's FastAPI app over ``queries`` (the Flight server's service); ``closing`` ends its SSE
    streams (set when the gateway stops)."""
    closing = closing or threading.Event()
    settings = queries.settings
    store = queries.store
    stats = queries.stats
    app = FastAPI(title="ibstream HTTP gateway", version=_version(),
                  description="Ticks, bars, sessions and live streams of the ibstream store over HTTP: REST (JSON, "
                  "NDJSON, CSV, Arrow IPC stream) and Server-Sent Events in IB-Stream's v2 envelope. The same "
                  "queries, limits and errors as the Flight server; see proto_docs/http-gateway.md.")

    @app.exception_handler(IbstreamError)
    async def ours(request: Request, exc: IbstreamError) -> JSONResponse:
        if isinstance(exc, _NotAcceptable):
            return JSONResponse(error_body(exc.code, str(exc)), status_code=406)
        if status_of(exc) >= 500 and not isinstance(exc, ServerUnavailableError):
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 401: "unauthenticated", 403: "permission_denied"}.get(exc.status_code,
                                                                                       "invalid_request")
        message = f"no such endpoint: {request.method} {shown(request.url.path)}; see /docs" \
            if exc.status_code in (404, 405) else str(exc.detail)
        return JSONResponse(error_body(code, message), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse(error_body("invalid_request", problems or "invalid request"), status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body("internal", f"{type(exc).__name__}: {exc}"), status_code=500)

    def caller(authorization: str | None = Header(None, include_in_schema=False)) -> Caller:
        return queries.authenticator.caller([authorization] if authorization is not None else [])

    def counted(kind: str) -> Any:
        return stats.start(kind)

    def stopped() -> bool:
        return closing.is_set() or queries.stopping.is_set()

    # -- REST ----------------------------------------------------------------------------------------

    @app.get("/v2/historical/{contract_id}", summary="Ticks or bars of a range, window or session",
             response_description="JSON array (default), NDJSON, CSV or Arrow IPC stream; streamed")
    def historical(request: Request, contract_id: str, tick_types: str | None = None, start_time: str | None = None,
                   end_time: str | None = None, start: str | None = None, end: str | None = None,
                   window: str | None = None, session: str | None = None, session_date: str | None = None,
                   resolution: str | None = None, fill: str | None = None, daily_session: str | None = None,
                   cursor: str | None = None, provenance: str | None = None, format: str | None = None,
                   who: Caller = Depends(caller)) -> StreamingResponse:
        """The Flight command's fields as query parameters (``start_time``/``end_time`` are IB-Stream's names
        for ``start``/``end``); several tick types give rows tagged with ``contract_id`` and ``tick_type``.
        ``contract_id`` may be a continuous future (``MNQ.c.0``: rows name their expiry)."""
        query = None
        first: Answer | None = None
        try:
            _allowed(request, HISTORICAL)
            output = _format(request, format)
            for ours_, theirs in (("start", start_time), ("end", end_time)):
                if theirs is not None and (start if ours_ == "start" else end) is not None:
                    raise InvalidRequestError(f"give {ours_} or {ours_}_time, not both (they are the same)")
            named = {"continuous": contract_id} if ".c." in contract_id else {"contract_id": _contract_id(contract_id)}
            payload = {**named, "tick_types": _tick_types(tick_types), "provenance": _flag("provenance", provenance),
                       "start": start if start is not None else start_time, "end": end if end is not None else end_time,
                       "window": window, "session": session, "session_date": session_date, "resolution": resolution,
                       "fill": _flag("fill", fill), "daily_session": daily_session, "cursor": cursor}
            command = _command({k: v for k, v in payload.items() if v is not None})
            query = counted("ticks" if command.resolution == "tick" else "bars")
            tickets = queries.tickets(command)
            queries.estimate(command, tickets)  # the row limit, as get_flight_info applies it
            first = queries.read(tickets[0], who, query=query)
            schemas = [first.schema] + [queries.ticket_schema(t) for t in tickets[1:]]
            schema, tagged = _output_schema(schemas, tickets, output)
        except IbstreamError:
            (query or counted("invalid")).done(False)
            if first is not None:
                _close(first.batches)
            raise
        writer = WRITERS[output](schema, tagged)
        assert query is not None and first is not None
        return StreamingResponse(_answer_bytes(queries, first, tickets, writer, who, query),
                                 media_type=writer.media_type, headers=_download_headers(output, contract_id))

    @app.get("/v2/sessions/{contract_id}/{when}", summary="Trading sessions of a date: current, previous or "
             "YYYY-MM-DD")
    def sessions(request: Request, contract_id: str, when: str, format: str | None = None,
                 who: Caller = Depends(caller)) -> StreamingResponse:
        """One row per session kind (regular, extended, pre_market, after_hours, full_day) of the trading date
        that has opened (``current``), the one before (``previous``), or the date given."""
        return _action(request, "sessions", {"contract_id": _contract_id(contract_id), "date": when}, format, who,
                       {"format"})

    @app.get("/v2/statistics/{contract_id}", summary="Daily statistics of a contract from the index")
    def statistics(request: Request, contract_id: str, tick_type: str | None = None, format: str | None = None,
                   who: Caller = Depends(caller)) -> StreamingResponse:
        body: dict[str, Any] = {"contract_id": _contract_id(contract_id)}
        if tick_type is not None:
            body["tick_type"] = _tick_type_name(tick_type)
        return _action(request, "statistics", body, format, who, {"tick_type", "format"})

    @app.get("/v2/coverage/{contract_id}/{tick_type}", summary="When a stream was recorded, and when not (and why)")
    def coverage(request: Request, contract_id: str, tick_type: str, start_time: str | None = None,
                 end_time: str | None = None, format: str | None = None,
                 who: Caller = Depends(caller)) -> StreamingResponse:
        body = {"contract_id": _contract_id(contract_id), "tick_type": _tick_type_name(tick_type),
                "start": start_time, "end": end_time}
        return _action(request, "coverage", {k: v for k, v in body.items() if v is not None}, format, who,
                       {"start_time", "end_time", "format"})

    def _table(request: Request, kind: str, format: str | None, allowed: set[str],
               compute: Callable[[], pa.Table]) -> StreamingResponse:
        """A small answer (an action's, the stream list) in the format asked for, counted as ``kind``."""
        query = counted(kind)
        try:
            _allowed(request, allowed)
            output = _format(request, format)
            table = compute()
        except IbstreamError:
            query.done(False)
            raise
        query.done(True)
        writer = WRITERS[output](table.schema, False)
        return StreamingResponse(_table_bytes(table, writer), media_type=writer.media_type)

    def _action(request: Request, name: str, body: dict, format: str | None, who: Caller,
                allowed: set[str]) -> StreamingResponse:
        return _table(request, name, format, allowed, lambda: queries.action(name, json.dumps(body).encode(), who))

    @app.get("/v2/streams", summary="What is stored: one row per contract and tick type")
    def streams(request: Request, format: str | None = None, who: Caller = Depends(caller)) -> StreamingResponse:
        return _table(request, "list_flights", format, {"format"}, lambda: _streams_table(store))

    @app.get("/health", summary="Whether the gateway serves, and what")
    def health(who: Caller = Depends(caller)) -> dict:
        return {"status": "healthy", "service": "ibstream", "version": _version(), "protocol": "v2",
                "recording": store.writer is not None, "streams": len(store.contract_ids()),
                "live_subscribers": stats.live_subscribers, "timestamp": iso(now_us())}

    @app.get("/v2/info", summary="The v2 protocol: endpoints, tick types, parameters, limits")
    def info(who: Caller = Depends(caller)) -> dict:
        return {
            "version": PROTOCOL_VERSION, "protocol": "v2", "server": "ibstream", "ibstream_version": _version(),
            "usage": {"single_stream": "/v2/stream/{contract_id}/{tick_type}",
                      "multi_stream": "/v2/stream/{contract_id}?tick_types=bid_ask,last",
                      "live": "/v2/stream/{contract_id}/live/{tick_type}, /v2/stream/{contract_id}/live?tick_types=",
                      "buffer": "/v2/stream/{contract_id}/buffer?tick_types=bid_ask,last&buffer_duration=1h",
                      "historical": "/v2/historical/{contract_id}?tick_types=bid_ask&start_time=...&end_time=..."
                                    "&resolution=1m",
                      "sessions": "/v2/sessions/{contract_id}/current", "docs": "/docs"},
            "tick_types": {"last": "trades", "all_last": "all trades, including unreported and odd lots",
                           "bid_ask": "bid and ask quotes", "mid_point": "mid-point of bid and ask"},
            "query_parameters": {"timeout": f"seconds, then a complete event with reason timeout (up to "
                                            f"{MAX_STREAM_TIMEOUT:g})",
                                 "limit": "live ticks before a complete event with reason limit_reached",
                                 "tick_types": "comma-separated", "buffer_duration": "1h, 30m, 2h30m, 1d or seconds",
                                 "last_event_id": "like the Last-Event-ID header: resume after that event"},
            "message_structure": {"type": "tick, error, complete or info", "stream_id": "{contract_id}_{tick_type}_"
                                  "{milliseconds}_{random}", "timestamp": "ISO-8601 UTC (a tick: when it was "
                                  "received)", "data": "the payload", "metadata": "historical: from the store"},
            "formats": MEDIA_TYPES,
            "streams": [{"contract_id": i.contract_id, "tick_type": i.tick_type.value, "ticks": i.tick_count}
                        for i in store.streams()],
            "limits": {"max_concurrent_streams": settings.max_streams,
                       "max_streams_per_token": settings.max_streams_per_token,
                       "live_queue_rows": settings.live_queue_rows, "max_query_rows": settings.max_query_rows,
                       "max_query_span": str(settings.max_query_span), "max_bar_span": str(settings.max_bar_span),
                       "max_bars": settings.max_bars},
        }

    # -- Server-Sent Events (IB-Stream's v2 URLs) ------------------------------------------------------

    async def stream(request: Request, contract_id: str, tick_types: list[str], who: Caller,
                     allowed: set[str], buffer_duration: str | None = None) -> StreamingResponse:
        query = counted("live")
        answers: list[Answer] = []
        closed = threading.Event()
        try:
            _allowed(request, allowed)
            params = request.query_params
            cid = _contract_id(contract_id)
            kinds = list(dict.fromkeys(tick_types))
            last_id = request.headers.get("last-event-id") or params.get("last_event_id")
            resume = parse_event_id(last_id, kinds) if last_id else {}
            now = now_us()
            sse = _SseRequest(cid, kinds, start_us=now - (parse_duration(buffer_duration) if buffer_duration else 0),
                              resume=resume, timeout=_seconds("timeout", params.get("timeout"), 0, MAX_STREAM_TIMEOUT),
                              limit=_limit(params.get("limit")), buffer_duration=buffer_duration)
            commands = sse.commands()

            def opened() -> list[Answer]:
                for command in commands:
                    ticket = queries.tickets(command)[0]
                    answers.append(queries.read(ticket, who, cancelled=closed.is_set, query=query))
                return answers

            await run_in_threadpool(opened)
        except IbstreamError:
            query.done(False)
            for answer in answers:
                _close(answer.batches)
            raise
        feeds = [_Feed(a, _stream_id(cid, a.ticket.tick_type.value)) for a in answers]
        streams = _Streams(asyncio.get_running_loop(), feeds, closed)
        headers = {"Cache-Control": "no-cache", "Connection": "keep-alive", "X-Accel-Buffering": "no",
                   "X-IB-Stream-Version": PROTOCOL_VERSION, "X-Stream-Protocol": "v2"}
        if buffer_duration is not None:
            headers |= {"X-Buffer-Enabled": "true", "X-Buffer-Duration": buffer_duration}
        return StreamingResponse(_sse(streams, sse, stopped), media_type="text/event-stream",
                                 headers=headers)

    @app.get("/v2/stream/{contract_id}/buffer", summary="SSE: stored ticks of the last buffer_duration, then live")
    async def stream_buffer(request: Request, contract_id: str, tick_types: str = "bid_ask,last",
                            buffer_duration: str = "1h", who: Caller = Depends(caller)) -> StreamingResponse:
        return await stream(request, contract_id, _tick_types(tick_types), who, STREAMING | {"buffer_duration"},
                            buffer_duration)

    @app.get("/v2/stream/{contract_id}/live", summary="SSE: live ticks of several tick types")
    async def stream_live_many(request: Request, contract_id: str, tick_types: str | None = None,
                               who: Caller = Depends(caller)) -> StreamingResponse:
        return await stream(request, contract_id, _tick_types(tick_types), who, STREAMING)

    @app.get("/v2/stream/{contract_id}/live/{tick_type}", summary="SSE: live ticks of one tick type")
    async def stream_live_one(request: Request, contract_id: str, tick_type: str,
                              who: Caller = Depends(caller)) -> StreamingResponse:
        return await stream(request, contract_id, [_tick_type_name(tick_type)], who, STREAMING - {"tick_types"})

    @app.get("/v2/stream/{contract_id}/{tick_type}", summary="SSE: live ticks of one tick type (IB-Studies' URL)")
    async def stream_one(request: Request, contract_id: str, tick_type: str,
                         who: Caller = Depends(caller)) -> StreamingResponse:
        return await stream(request, contract_id, [_tick_type_name(tick_type)], who, STREAMING - {"tick_types"})

    @app.get("/v2/stream/{contract_id}", summary="SSE: live ticks of several tick types (IB-Studies' URL)")
    async def stream_many(request: Request, contract_id: str, tick_types: str | None = None,
                          who: Caller = Depends(caller)) -> StreamingResponse:
        return await stream(request, contract_id, _tick_types(tick_types), who, STREAMING)

    return app


def _download_headers(output: str, contract_id: str) -> dict[str, str]:
    if output in ("csv", "arrow"):
        return {"Content-Disposition": f'inline; filename="{contract_id}.{output}"'}
    return {}


def _answer_bytes(queries: QueryService, first: Answer, tickets: list[Ticket], writer: _Writer, who: Caller,
                  query) -> Iterator[bytes]:
    """The body of a historical query: the tickets read one after the other, each batch written as it
    comes. A failure after the first bytes cannot change the status: the response is cut short (the
    client sees a truncated body), and logged."""
    ok = False
    answer: Answer | None = first
    try:
        yield writer.head()
        for index, ticket in enumerate(tickets):
            if answer is None:
                answer = queries.read(ticket, who, query=query)
            batches = answer.table.to_batches() if answer.table is not None else answer.batches
            assert batches is not None
            for batch in batches:
                chunk = writer.rows(batch, ticket)
                if chunk:
                    yield chunk
            answer = None
        yield writer.tail()
        ok = True
    except IbstreamError as exc:
        log.warning("historical query of %s cut short: %s", tickets[0].contract_id, exc)
        raise
    finally:
        if answer is not None:
            _close(answer.batches)
        if not ok or not query.deferred:
            query.done(ok)


def _close(batches) -> None:
    """Stop reading an answer's batches early: its slot is given back, a live feed unsubscribed."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


def _table_bytes(table: pa.Table, writer: _Writer) -> Iterator[bytes]:
    yield writer.head()
    for batch in table.to_batches():
        chunk = writer.rows(batch, None)
        if chunk:
            yield chunk
    yield writer.tail()


def _streams_table(store) -> pa.Table:
    rows = store.streams()
    return pa.table({"contract_id": pa.array([r.contract_id for r in rows], pa.int64()),
                     "tick_type": pa.array([r.tick_type.value for r in rows], pa.string()),
                     "first": pa.array([r.first for r in rows], pa.timestamp("us", tz="UTC")),
                     "last": pa.array([r.last for r in rows], pa.timestamp("us", tz="UTC")),
                     "ticks": pa.array([r.tick_count for r in rows], pa.int64()),
                     "archived_ticks": pa.array([r.archived_ticks for r in rows], pa.int64()),
                     "buffered_ticks": pa.array([r.buffered_ticks for r in rows], pa.int64())})


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ibstream")
    except PackageNotFoundError:
        return "unknown"


class HttpGateway(HttpServer):
    """The gateway over ``queries`` (a :class:`~ibstream.flight_server.server.FlightServer`'s ``queries``) on
    ``settings.http_host:http_port`` (0: a free port): bound when made, serving on a thread from
    :meth:`start`; :meth:`stop` ends its SSE streams (each with a ``complete`` event, reason
    ``server_shutdown``) and the server."""

    def __init__(self, queries: QueryService, settings: Settings | None = None):
        settings = settings or queries.settings
        self.queries = queries
        self.closing = threading.Event()
        super().__init__(create_app(queries, self.closing), settings, queries.authenticator, host=settings.http_host,
                         port=settings.http_port or 0, loopback=settings.http_loopback, what="the HTTP gateway",
                         host_setting="http_host", port_flag="--http-port", thread_name="http-gateway",
                         serves="/v2/historical, /v2/stream, /docs")

    def start(self) -> "HttpGateway":
        super().start()
        return self

    def stop(self) -> None:
        self.closing.set()
        super().stop()

    def __enter__(self) -> "HttpGateway":
        return self.start()


def http_gateway_for(settings: Settings, queries: QueryService) -> HttpGateway | None:
    """The gateway the settings ask for (``http_port`` set), bound, not started; else None."""
    if settings.http_port is None:
        return None
    return HttpGateway(queries, settings)


__all__ = ["HttpGateway", "create_app", "http_gateway_for", "status_of", "parse_duration", "parse_event_id",
           "json_lines", "event"]
