"""Monitoring over HTTP: Prometheus metrics at ``GET /metrics`` and a health check at ``GET /health``.

:class:`Monitor` reads what the recorder, the IB feed, the store and the Flight server already
count (a pull collector: nothing below this module imports prometheus) and observes the latency
histograms through their listener hooks. :class:`MonitoringServer` serves it with FastAPI under
uvicorn on a background thread, with the Flight server's access rules: bearer tokens (any role)
when tokens are configured, HTTPS with ``tls_cert_file``/``tls_key_file``.

``/health`` answers 200 with each stream's state, or 503 when a stream inside its trading session
(the contract's ``extended`` session: IB's trading hours) has had no tick for longer than
``health_silence_threshold``, or the IB connection has been down for longer than that (a market
data farm that flapped leaves the feed connected and silent for hours). A stream outside its
session may be silent; one whose hours are unknown (no contract details) is checked at all times.
In the recording process the streams checked are those its feed records; in ``ibstream serve``
(another process records), those whose coverage is open and not stopped on purpose.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ibstream.core.errors import InvalidConfigError, InvalidRequestError, ServerUnavailableError, UnauthenticatedError
from ibstream.core.times import US_PER_SECOND, duration_us, iso, now_us
from ibstream.flight_server.auth import Authenticator, token_entries
from ibstream.flight_server.server import FlightServer
from ibstream.recorder.recorder import Recorder
from ibstream.settings import Settings
from ibstream.storage.index import COVERED
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, list_segments, list_streams, scan_segment, stream_dir
from ibstream.storage.store import Store

log = logging.getLogger(__name__)

STREAM = ("contract_id", "tick_type")
GAP_WINDOW_US = 24 * 3_600 * US_PER_SECOND  # coverage gaps are counted over the last 24 h
SESSION_KIND = "extended"  # a stream is expected to tick inside IB's trading hours
FLUSH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
FSYNC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
QUERY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
START_SECONDS = 15.0  # how long start() waits for uvicorn to listen


def _keys(*counters: dict) -> set[StreamKey]:
    """The keys of dicts other threads add to (``dict.copy`` is one step under the GIL; iterating is not)."""
    return set().union(*(counter.copy() for counter in counters))


def _labels(key: StreamKey) -> list[str]:
    return [str(key.contract_id), key.tick_type.value]


class Monitor:
    """Metrics and health of one process: a recording one (``recorder`` and ``feed`` given) or a
    read-only server (``store`` and ``server`` only). Each monitor has its own registry."""

    def __init__(self, settings: Settings, store: Store, *, recorder: Recorder | None = None, feed: Any = None,
                 server: FlightServer | None = None, clock: Callable[[], int] = now_us):
        self.settings = settings
        self.store = store
        self.recorder = recorder
        self.feed = feed
        self.server = server
        self.clock = clock
        self.started_us = clock()
        self.threshold_us = duration_us(settings.health_silence_threshold)
        self.registry = CollectorRegistry()
        self.flush_seconds = Histogram(
            "ibstream_flush_duration_seconds", "Recorder group commits: time to append and acknowledge what was "
            "received since the last one.", buckets=FLUSH_BUCKETS, registry=self.registry)
        self.write_seconds = Histogram(
            "ibstream_segment_write_duration_seconds", "Time to write one batch to its buffer segment.",
            buckets=FSYNC_BUCKETS, registry=self.registry)
        self.fsync_seconds = Histogram(
            "ibstream_segment_fsync_duration_seconds", "Time to fsync one batch's segment (0 with fsync=none).",
            buckets=FSYNC_BUCKETS, registry=self.registry)
        self.query_seconds = Histogram(
            "ibstream_query_duration_seconds", "Flight calls by kind: time to answer (a tick stream: to its end).",
            ["kind"], buckets=QUERY_BUCKETS, registry=self.registry)
        self.registry.register(_Collector(self))
        self._detach: list[Callable[[], None]] = []
        if recorder is not None:
            self._listen(recorder.flush_listeners, lambda seconds, acked: self.flush_seconds.observe(seconds))
        if store.writer is not None:
            self._listen(store.writer.timing_listeners, self._timing)
        if server is not None:
            self.watch_server(server)

    def watch_server(self, server: FlightServer) -> None:
        """Count the queries of ``server`` (given later when the monitoring port is bound before it)."""
        self.server = server
        self._listen(server.stats.listeners, lambda kind, seconds: self.query_seconds.labels(kind).observe(seconds))

    def _listen(self, listeners: list, listener: Callable) -> None:
        listeners.append(listener)

        def detach() -> None:
            if listener in listeners:
                listeners.remove(listener)

        self._detach.append(detach)

    def _timing(self, write: float, fsync: float) -> None:
        self.write_seconds.observe(write)
        self.fsync_seconds.observe(fsync)

    def close(self) -> None:
        """Stop observing the recorder, store and server."""
        for detach in self._detach:
            detach()
        self._detach = []

    # -- what the store holds ------------------------------------------------------------------

    def stored_streams(self) -> set[StreamKey]:
        keys = set(list_streams(self.settings.buffer_root))
        keys |= {StreamKey(cid, TickType(tt)) for cid, tt in self.store.index.archive_summary()}
        return keys

    def streams(self) -> set[StreamKey]:
        keys = self.stored_streams()
        if self.recorder is not None:
            recorder = self.recorder
            keys |= _keys(recorder.received, recorder.recording, recorder.acknowledged, recorder.dropped)
        return keys

    def _buffered_last_us(self, key: StreamKey) -> int | None:
        """The ``ts`` of the newest tick in a stream's newest buffer segment (None: none buffered)."""
        for path in reversed(list_segments(stream_dir(self.settings.buffer_root, key))):
            try:
                scan = scan_segment(path)
            except OSError:  # archived and removed meanwhile
                continue
            if scan.rows():
                return scan.last_ts()
        return None

    def stored_last_us(self, key: StreamKey, summary: dict | None = None) -> int | None:
        """When the newest stored tick of a stream was received (µs)."""
        summary = self.store.index.archive_summary() if summary is None else summary
        archived = summary.get((key.contract_id, key.tick_type.value))
        candidates = [archived[1] - 1] if archived and archived[1] is not None else []
        buffered = self._buffered_last_us(key)
        if buffered is not None:
            candidates.append(buffered)
        return max(candidates) if candidates else None

    def segment_bytes(self) -> dict[StreamKey, int]:
        sizes: dict[StreamKey, int] = {}
        for key in list_streams(self.settings.buffer_root):
            total = 0
            for path in list_segments(stream_dir(self.settings.buffer_root, key)):
                try:
                    total += path.stat().st_size
                except FileNotFoundError:  # archived and removed meanwhile
                    pass
            sizes[key] = total
        return sizes

    # -- health --------------------------------------------------------------------------------

    def in_session(self, contract_id: int, now: int) -> bool | None:
        """Whether the contract's trading session (IB's trading hours) is open at ``now``; None: unknown."""
        try:
            return bool(self.store.sessions(contract_id).sessions(SESSION_KIND, now, now + 1))
        except InvalidRequestError:  # no contract details, or no hours known for today
            return None

    def expected_streams(self, now: int) -> set[StreamKey]:
        """The streams that should be ticking when their session is open."""
        if self.recorder is not None:
            keys = _keys(self.recorder.recording, self.recorder.received)
            configured = getattr(self.feed, "streams", None)
            if callable(configured):
                keys |= {StreamKey(cid, TickType(tt)) for cid, tt in configured()}
            return keys
        keys = set()
        for key in self.stored_streams():
            for interval in self.store.index.coverage(key.contract_id, key.tick_type.value, now, now + 1):
                if interval.is_open and (interval.status == "recorded" or interval.reason != "recorder_stopped"):
                    keys.add(key)
        return keys

    def health(self) -> tuple[bool, dict]:
        """(healthy, the body of ``GET /health``)."""
        now = self.clock()
        threshold = self.threshold_us / US_PER_SECOND
        failing: list[str] = []
        streams = []
        summary = self.store.index.archive_summary()
        sessions: dict[int, bool | None] = {}
        for key in sorted(self.expected_streams(now)):
            last = self.recorder.last_received_us.get(key) if self.recorder is not None else None
            if last is None:
                last = self.stored_last_us(key, summary)
            if key.contract_id not in sessions:
                sessions[key.contract_id] = self.in_session(key.contract_id, now)
            in_session = sessions[key.contract_id]
            silent_us = max(now - max(last if last is not None else self.started_us, self.started_us), 0)
            age = None if last is None else max(now - last, 0) / US_PER_SECOND
            if in_session is False:
                state = "outside_session"
            elif silent_us > self.threshold_us:
                state = "silent"
                failing.append(f"{key.contract_id}/{key.tick_type.value}: no tick for "
                               f"{_seconds(age if age is not None else silent_us / US_PER_SECOND)} "
                               f"{'during its trading session' if in_session else '(trading hours unknown)'} "
                               f"(threshold {_seconds(threshold)})")
            else:
                state = "ok"
            recording = self.recorder.recording.get(key) if self.recorder is not None else None
            streams.append({"contract_id": key.contract_id, "tick_type": key.tick_type.value, "state": state,
                            "in_session": in_session, "recording": recording,
                            "last_tick": None if last is None else iso(last), "last_tick_age_seconds": age})
        ib = None
        if self.feed is not None and hasattr(self.feed, "connected"):
            down = self.feed.disconnected_for()
            ib = {"connected": self.feed.connected, "disconnected_seconds": down,
                  "last_message_age_seconds": self.feed.last_message_age(), "market_data_farm_ok": self.feed.farm_ok}
            if not self.feed.connected and down > threshold:
                failing.append(f"IB: not connected to the gateway for {_seconds(down)} (threshold {_seconds(threshold)})")
        body = {"status": "failing" if failing else "ok", "checked_at": iso(now), "threshold_seconds": threshold,
                "failing": failing, "ib": ib, "streams": streams}
        return not failing, body


def _seconds(value: float) -> str:
    if value < 120:
        return f"{value:.1f} s"
    return f"{value / 60:.0f} min" if value < 7_200 else f"{value / 3_600:.1f} h"


def _one(family: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, documentation: str,
         value: float) -> Metric:
    """A metric with one sample and no labels."""
    metric = family(name, documentation)
    metric.add_metric([], value)
    return metric


class _Collector(Collector):
    """Reads the counters the recorder, feed, store and server keep, at each scrape."""

    def __init__(self, monitor: Monitor):
        self.monitor = monitor
        self._failed: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        for part in (self._recorder, self._store, self._publication, self._ib, self._server, self._health):
            try:
                yield from part()
            except Exception as exc:  # one failing part (say, a locked index) must not hide the others
                if part.__name__ not in self._failed:
                    self._failed.add(part.__name__)
                    log.warning("monitoring: could not collect %s metrics: %s", part.__name__.strip("_"), exc)

    def _recorder(self) -> Iterable[Metric]:
        recorder = self.monitor.recorder
        if recorder is None:
            return
        now = self.monitor.clock()
        received = CounterMetricFamily("ibstream_ticks_received", "Ticks the feed delivered.", labels=STREAM)
        acknowledged = CounterMetricFamily(
            "ibstream_ticks_acknowledged", "Ticks durably appended to the store.", labels=STREAM)
        dropped = CounterMetricFamily(
            "ibstream_ticks_dropped", "Ticks dropped: held past max_held_ticks, or refused by the store.",
            labels=STREAM)
        held = GaugeMetricFamily("ibstream_ticks_held", "Ticks received and not yet acknowledged.", labels=STREAM)
        last = GaugeMetricFamily("ibstream_last_tick_timestamp_seconds",
                                 "Unix time the feed last delivered a tick of the stream.", labels=STREAM)
        age = GaugeMetricFamily("ibstream_last_tick_age_seconds",
                                "Seconds since the feed last delivered a tick of the stream.", labels=STREAM)
        recording = GaugeMetricFamily("ibstream_stream_recording",
                                      "1 while the stream is recorded (coverage 'recorded'), else 0.", labels=STREAM)
        for key in sorted(_keys(recorder.received, recorder.acknowledged, recorder.dropped, recorder.recording)):
            labels = _labels(key)
            received.add_metric(labels, recorder.received.get(key, 0))
            acknowledged.add_metric(labels, recorder.acknowledged.get(key, 0))
            dropped.add_metric(labels, recorder.dropped.get(key, 0))
            held.add_metric(labels, recorder.held(key))
            if key in recorder.last_received_us:
                at = recorder.last_received_us[key]
                last.add_metric(labels, at / US_PER_SECOND)
                age.add_metric(labels, max(now - at, 0) / US_PER_SECOND)
            if key in recorder.recording:
                recording.add_metric(labels, int(recorder.recording[key]))
        storage = GaugeMetricFamily("ibstream_storage_available",
                                    "1 while the store takes writes, 0 during an outage (disk full, I/O error).")
        storage.add_metric([], int(recorder.storage_available))
        yield from (received, acknowledged, dropped, held, last, age, recording, storage)

    def _store(self) -> Iterable[Metric]:
        monitor = self.monitor
        store, now = monitor.store, monitor.clock()
        segments = GaugeMetricFamily("ibstream_segment_bytes", "Bytes of the stream's buffer segments (not yet "
                                     "archived).", labels=STREAM)
        for key, size in sorted(monitor.segment_bytes().items()):
            segments.add_metric(_labels(key), size)
        archive = GaugeMetricFamily("ibstream_archive_bytes", "Bytes of the stream's archived Parquet hours.",
                                    labels=STREAM)
        for (cid, tt), (_, _, _, size) in sorted(store.index.archive_summary().items()):
            archive.add_metric([str(cid), tt], size or 0)
        lag = GaugeMetricFamily("ibstream_archive_lag_seconds", "Seconds from the end of the stream's newest "
                                "archived hour to now (normally under 1 h plus archive_delay and the check interval).",
                                labels=STREAM)
        for (cid, tt), until in sorted(store.index.archived_until().items()):
            lag.add_metric([str(cid), tt], max(now - until, 0) / US_PER_SECOND)
        free = GaugeMetricFamily("ibstream_disk_free_bytes", "Free bytes on the data root's file system.")
        free.add_metric([], shutil.disk_usage(monitor.settings.data_root).free)
        gaps = GaugeMetricFamily("ibstream_coverage_gaps", "Coverage gaps (not recorded nor backfilled whole, or "
                                 "damaged) of the stream overlapping the last 24 h, by reason.", labels=[*STREAM, "reason"])
        gap_seconds = GaugeMetricFamily("ibstream_coverage_gap_seconds", "Seconds of the last 24 h the stream was "
                                        "not recorded, by reason (gaps may overlap).", labels=[*STREAM, "reason"])
        start = now - GAP_WINDOW_US
        for key in sorted(monitor.streams()):
            counts: dict[str, list[float]] = {}
            for interval in store.index.coverage(key.contract_id, key.tick_type.value, start, now):
                if interval.status in COVERED:  # recorded, or a gap backfilled whole
                    continue
                end = now if interval.end_us is None else min(interval.end_us, now)
                entry = counts.setdefault(interval.reason, [0, 0.0])
                entry[0] += 1
                entry[1] += max(end - max(interval.start_us, start), 0) / US_PER_SECOND
            for reason, (count, seconds) in sorted(counts.items()):
                gaps.add_metric([*_labels(key), reason], count)
                gap_seconds.add_metric([*_labels(key), reason], seconds)
        cache = store.cache
        hits = CounterMetricFamily("ibstream_cache_hits", "Result cache hits (closed ranges served from memory).")
        hits.add_metric([], cache.hits)
        misses = CounterMetricFamily("ibstream_cache_misses", "Result cache misses (closed ranges computed).")
        misses.add_metric([], cache.misses)
        total = cache.hits + cache.misses
        ratio = GaugeMetricFamily("ibstream_cache_hit_ratio", "Hits / (hits + misses) since start (NaN before "
                                  "any lookup).")
        ratio.add_metric([], cache.hits / total if total else math.nan)
        cached = GaugeMetricFamily("ibstream_cache_bytes", "Bytes of results held in the cache.")
        cached.add_metric([], cache.current_bytes)
        yield from (segments, archive, lag, free, gaps, gap_seconds, hits, misses, ratio, cached)

    def _publication(self) -> Iterable[Metric]:
        """The object store: what the recorder published, or what this read server serves and caches."""
        store = self.monitor.store
        if not store.settings.archive_url:
            return
        last = store.index.last_publication()
        yield _one(GaugeMetricFamily, "ibstream_published_index", "Sequence number of the newest index published "
                   "to archive_url (a read server: the one it serves).", math.nan if last is None else last[0])
        yield _one(GaugeMetricFamily, "ibstream_published_index_age_seconds", "Seconds since that index was "
                   "published; growing past a few publish_interval means publication (or a read server's refresh) "
                   "is failing.", math.nan if last is None else max(time.time() - last[3] / US_PER_SECOND, 0.0))
        if store.replica is not None:
            cache = store.replica.cache
            yield _one(GaugeMetricFamily, "ibstream_read_cache_bytes", "Bytes of archive files this read server "
                       "keeps downloaded (bounded by read_cache_max_bytes).", cache.size_bytes)
            yield _one(CounterMetricFamily, "ibstream_read_cache_hits", "Archive files read from the local copy.",
                       cache.hits)
            yield _one(CounterMetricFamily, "ibstream_read_cache_misses", "Archive files downloaded from the object "
                       "store.", cache.misses)
            yield _one(CounterMetricFamily, "ibstream_object_downloaded_bytes", "Bytes downloaded from the object "
                       "store.", cache.downloaded_bytes)

    def _ib(self) -> Iterable[Metric]:
        feed = self.monitor.feed
        if feed is None or not hasattr(feed, "connected"):
            return
        connected = GaugeMetricFamily("ibstream_ib_connected", "1 while connected to TWS / IB Gateway (past the "
                                      "handshake), else 0.")
        connected.add_metric([], int(feed.connected))
        down = GaugeMetricFamily("ibstream_ib_disconnected_seconds", "Seconds since the IB connection was lost "
                                 "(0 while connected).")
        down.add_metric([], feed.disconnected_for())
        farm = GaugeMetricFamily("ibstream_ib_market_data_farm_ok", "0 between IB's 2103 (market data farm broken) "
                                 "and 2104, else 1.")
        farm.add_metric([], int(feed.farm_ok))
        connections = CounterMetricFamily("ibstream_ib_connections", "Connections made to the gateway.")
        connections.add_metric([], feed.connections)
        yield from (connected, down, farm, connections)
        age = feed.last_message_age()
        if age is not None:
            last = GaugeMetricFamily("ibstream_ib_last_message_age_seconds", "Seconds since the gateway last sent "
                                     "any message (ticks, answers, status).")
            last.add_metric([], age)
            yield last

    def _server(self) -> Iterable[Metric]:
        server = self.monitor.server
        if server is None:
            return
        stats = server.stats
        queries = CounterMetricFamily("ibstream_queries", "Flight calls by kind (ticks, bars, live, flight_info, "
                                      "schema, list_flights, and each action).", labels=["kind"])
        errors = CounterMetricFamily("ibstream_query_errors", "Flight calls refused or failed, by kind.",
                                     labels=["kind"])
        for kind, count in sorted(stats.queries.copy().items()):
            queries.add_metric([kind], count)
            errors.add_metric([kind], stats.errors.get(kind, 0))
        live = GaugeMetricFamily("ibstream_live_subscribers", "Live streams being served now.")
        live.add_metric([], stats.live_subscribers)
        slow = CounterMetricFamily("ibstream_slow_readers_dropped", "Live readers dropped for falling more than "
                                   "live_queue_rows ticks behind (they resume from their cursor).")
        slow.add_metric([], stats.slow_readers_dropped)
        yield from (queries, errors, live, slow)

    def _health(self) -> Iterable[Metric]:
        healthy, body = self.monitor.health()
        gauge = GaugeMetricFamily("ibstream_healthy", "1 when GET /health answers 200, 0 when it answers 503.")
        gauge.add_metric([], int(healthy))
        silent = GaugeMetricFamily("ibstream_stream_silent", "1 when the stream is inside its trading session and "
                                   "has had no tick for longer than health_silence_threshold.", labels=STREAM)
        for stream in body["streams"]:
            silent.add_metric([str(stream["contract_id"]), stream["tick_type"]], int(stream["state"] == "silent"))
        yield from (gauge, silent)


def create_app(monitor: Monitor, authenticator: Authenticator) -> FastAPI:
    """The HTTP app: ``GET /metrics`` (Prometheus text format) and ``GET /health`` (JSON; 200 or 503)."""
    app = FastAPI(title="ibstream monitoring", docs_url=None, redoc_url=None, openapi_url=None)

    def caller(authorization: str | None = Header(None)) -> None:
        try:
            authenticator.caller([authorization] if authorization is not None else [])
        except UnauthenticatedError as exc:
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None

    @app.get("/metrics", dependencies=[Depends(caller)])
    def metrics() -> Response:
        return Response(generate_latest(monitor.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", dependencies=[Depends(caller)])
    def health() -> JSONResponse:
        healthy, body = monitor.health()
        return JSONResponse(body, status_code=200 if healthy else 503)

    return app


class HttpServer:
    """A FastAPI app served by uvicorn on a background thread, with the Flight server's access rules
    (what :class:`MonitoringServer` and the HTTP gateway, :mod:`ibstream.http_gateway`, both are).

    Binds ``host:port`` (0: a free port) when made, so a port in use is refused here; serves from
    :meth:`start`. Another address than loopback needs TLS and tokens unless ``allow_insecure``; with
    ``tls_cert_file``/``tls_key_file`` it serves HTTPS (and asks for client certificates signed by
    ``tls_client_ca_file`` when that is set). ``what`` names the server in messages (``the
    monitoring server``), ``host_setting`` and ``port_flag`` the setting and CLI flag to change."""

    def __init__(self, app: FastAPI, settings: Settings, authenticator: Authenticator, *, host: str, port: int,
                 loopback: bool, what: str, host_setting: str, port_flag: str, thread_name: str, serves: str = ""):
        self.settings = settings
        self.serves = serves  # what the log line at start lists, e.g. "/metrics, /health"
        self.authenticator = authenticator
        self.what = what
        tls = settings.tls_cert_file is not None and settings.tls_key_file is not None
        if not loopback and not settings.allow_insecure and not (tls and self.authenticator.enabled):
            raise InvalidConfigError(f"{host_setting} {host} is not a loopback address and no usable token is "
                                     "configured (the token file is empty?) or TLS is off; add a token (`ibstream "
                                     "token`) or set IBSTREAM_ALLOW_INSECURE=true")
        options: dict[str, Any] = {}
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            _check_tls(settings, what)
            options = {"ssl_certfile": os.fspath(settings.tls_cert_file), "ssl_keyfile": os.fspath(settings.tls_key_file)}
            if settings.tls_client_ca_file is not None:
                options |= {"ssl_ca_certs": os.fspath(settings.tls_client_ca_file), "ssl_cert_reqs": ssl.CERT_REQUIRED}
        self.scheme = "https" if tls else "http"
        logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger("uvicorn.error").level))
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off", timeout_graceful_shutdown=2,
                                **options)
        try:
            config.load()
        except (OSError, ssl.SSLError) as exc:
            raise InvalidConfigError(f"{what} cannot use the TLS files IBSTREAM_TLS_CERT_FILE / "
                                     f"IBSTREAM_TLS_KEY_FILE ({exc}); give a PEM certificate chain and its key") from None
        try:
            family = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0][0]
            self._socket = socket.create_server((host.strip("[]"), port), family=family)
        except OSError as exc:
            raise ServerUnavailableError(
                f"{what} cannot listen on {host}:{port} ({exc.strerror or exc}); is another server "
                f"using the port? Pick another with {port_flag} (0: any free port)") from None
        self.host = host
        self.port: int = self._socket.getsockname()[1]
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.host.startswith("[") else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._socket])
        except BaseException as exc:  # SystemExit from uvicorn's startup included
            self._failure = exc

    def start(self) -> "HttpServer":
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ServerUnavailableError(f"{self.what} at {self.url} did not start "
                                             f"({self._failure or 'timed out'})")
            time.sleep(0.01)
        log.info("%s at %s%s", self.what.removeprefix("the "), self.url, f" ({self.serves})" if self.serves else "")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(10)
        else:
            self._socket.close()

    def __enter__(self) -> "HttpServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MonitoringServer(HttpServer):
    """Serves a :class:`Monitor` on ``settings.monitoring_host:monitoring_port`` (0: a free port);
    binds when made (a port in use is refused here), serves on a thread from :meth:`start`."""

    def __init__(self, monitor: Monitor, settings: Settings):
        self.monitor = monitor
        authenticator = Authenticator(token_entries(settings))
        super().__init__(create_app(monitor, authenticator), settings, authenticator, host=settings.monitoring_host,
                         port=settings.monitoring_port or 0, loopback=settings.monitoring_loopback,
                         what="the monitoring server", host_setting="monitoring_host", port_flag="--monitoring-port",
                         thread_name="monitoring-http", serves="/metrics, /health")

    def start(self) -> "MonitoringServer":
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        self.monitor.close()

    def __enter__(self) -> "MonitoringServer":
        return self.start()


def _check_tls(settings: Settings, what: str = "the monitoring server") -> None:
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(os.fspath(settings.tls_cert_file), os.fspath(settings.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        raise InvalidConfigError(f"{what} cannot use IBSTREAM_TLS_CERT_FILE {settings.tls_cert_file} "
                                 f"and IBSTREAM_TLS_KEY_FILE {settings.tls_key_file} ({exc}); give a PEM certificate "
                                 "chain and its key") from None


def monitoring_for(settings: Settings, store: Store, *, recorder: Recorder | None = None, feed: Any = None,
                   server: FlightServer | None = None) -> MonitoringServer | None:
    """The monitoring server the settings ask for (``monitoring_port`` set), bound, not started; else None."""
    if settings.monitoring_port is None:
        return None
    monitor = Monitor(settings, store, recorder=recorder, feed=feed, server=server)
    try:
        return MonitoringServer(monitor, settings)
    except BaseException:
        monitor.close()
        raise
