"""The recording process: store + recorder + background archiver + Flight server (and the HTTP gateway) in one."""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from ibstream.flight_server.server import FlightServer
from ibstream.http_gateway import http_gateway_for
from ibstream.monitoring import monitoring_for
from ibstream.recorder.backfill import Backfiller
from ibstream.recorder.feed import TickFeed
from ibstream.recorder.ib import IBFeed
from ibstream.recorder.recorder import Recorder
from ibstream.settings import Settings
from ibstream.storage.store import Store

log = logging.getLogger(__name__)


class StopSignals:
    """SIGINT/SIGTERM handlers of a recording process: the first signal sets ``stop``; any later one is
    logged once and otherwise ignored, so a second Ctrl-C cannot skip the final flush. Python lets
    only the main thread install handlers; elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.received = False  # a signal set ``stop``
        self._previous: dict[int, Any] = {}
        self._told = False

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in self.SIGNALS}
            for sig in self.SIGNALS:
                signal.signal(sig, self._handle)
        return self

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if not self.stop.is_set():
            self.received = True
            log.info("%s: stopping, flushing acknowledged ticks", name)
            self.stop.set()
        elif not self._told:
            self._told = True
            log.info("%s: already stopping; waiting for the final flush", name)

    def restore(self) -> None:
        """Put the previous handlers back; once a signal asked to stop, ignore further ones instead:
        the process is on its way out, and one arriving while the interpreter shuts down would
        otherwise kill it (exit status -2) after everything was flushed."""
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received or self._told else handler)
        self._previous = {}


class RecordingService:
    """Records a feed into a store and serves it over Flight; use as a context manager."""

    def __init__(self, settings: Settings, feed: TickFeed):
        self.settings = settings
        self.store = Store(settings)
        self.recorder = Recorder(self.store, flush_interval=settings.flush_interval.total_seconds(), settings=settings)
        self.feed = feed
        # gaps filled from IB's history every backfill_interval, over a connection of its own (proto_docs/backfill.md)
        self.backfiller = Backfiller(self.store, settings) if settings.backfill_enabled and isinstance(feed, IBFeed) \
            else None
        try:  # GET /metrics and /health when settings.monitoring_port is set (bound now: a port in use fails here)
            self.monitoring = monitoring_for(settings, self.store, recorder=self.recorder, feed=feed)
        except BaseException:
            self.store.close()  # nothing runs on it yet
            raise
        try:
            self.server = FlightServer(self.store, settings.flight_location, settings=settings)
        except BaseException:
            if self.monitoring is not None:
                self.monitoring.stop()
            raise
        try:  # REST + SSE over the same queries when settings.http_port is set (bound now, like monitoring)
            self.http = http_gateway_for(settings, self.server.queries)
        except BaseException:
            self.server.shutdown()
            if self.monitoring is not None:
                self.monitoring.stop()
            self.store.close()
            raise
        if self.monitoring is not None:
            self.monitoring.monitor.watch_server(self.server)
        self._serve = threading.Thread(target=self.server.serve, name="flight-server", daemon=True)
        self.signals: StopSignals | None = None  # run_for's, once a signal stopped it: kept until the final flush

    @property
    def location(self) -> str:
        return f"{self.settings.flight_location.rsplit(':', 1)[0]}:{self.server.port}"

    def __enter__(self) -> "RecordingService":
        self._serve.start()
        if self.monitoring is not None:
            self.monitoring.start()
        if self.http is not None:
            self.http.start()
        self.store.start_background()
        if self.backfiller is not None:
            self.backfiller.start()
        self.recorder.start()
        self.feed.start(self.recorder)
        log.info("recording; Flight server at %s%s, data in %s", self.location,
                 f", HTTP gateway at {self.http.url}" if self.http is not None else "", self.settings.data_root)
        return self

    def __exit__(self, *exc) -> None:
        if self.signals is None:  # stopping without a signal: still, a Ctrl-C now must not skip the flush
            stopping = threading.Event()
            stopping.set()
            self.signals = StopSignals(stopping).install()
        try:
            if self.backfiller is not None:
                self.backfiller.shutdown()  # a run in progress ends at once: its gap stays a gap
            self.feed.stop()
            self.recorder.stop()  # last flush: everything received is acknowledged or reported
            recorder = self.recorder
            log.info("stopped: %s ticks acknowledged, %s dropped, %s held ticks not stored",
                     f"{sum(recorder.acknowledged.values()):,}", f"{sum(recorder.dropped.values()):,}",
                     f"{recorder.held():,}")
            self.server.shutdown()  # live streams end, over Flight and HTTP alike
            self._serve.join()
            if self.http is not None:
                self.http.stop()
            if self.monitoring is not None:
                self.monitoring.stop()
            self.store.close()
        finally:
            self.signals.restore()
            self.signals = None

    def log_rates(self, every: float, until: threading.Event) -> None:
        """Log one line per stream every ``every`` seconds until set: rate, total, and how its ticks
        fare, e.g. ``711280073 bid_ask: 452 ticks/s, 27,113 acknowledged, storing``, ``..., STORAGE
        UNAVAILABLE (No space left on device), holding 12,000 ticks``, ``..., DROPPING (12,345 dropped)``
        or ``..., NOT recording (see coverage)``."""
        recorder = self.recorder
        previous = dict(recorder.acknowledged)
        while not until.wait(every):
            current = dict(recorder.acknowledged)
            for key in sorted(current.keys() | recorder.recording.keys()):
                count = current.get(key, 0)
                state = recorder.storage_state(key)
                if not recorder.recording.get(key) and not recorder.held(key):
                    state = "NOT recording (see coverage)" + ("" if state == "storing" else f"; {state}")
                log.info("%d %s: %.0f ticks/s, %s acknowledged, %s", key.contract_id, key.tick_type.value,
                         (count - previous.get(key, 0)) / every, f"{count:,}", state)
            previous = current


def run_for(service: RecordingService, seconds: float, report_every: float = 2.0) -> None:
    """Run until ``seconds`` pass (0: forever) or SIGINT/SIGTERM arrives, logging rates meanwhile.

    Once a signal stopped it, the handlers stay installed until ``service`` has done its final flush
    (in its ``__exit__``): a second signal during shutdown is logged, not obeyed.
    """
    stop = threading.Event()
    signals = StopSignals(stop).install()
    reporter = threading.Thread(target=service.log_rates, args=(report_every, stop), daemon=True)
    reporter.start()
    try:
        stop.wait(seconds if seconds > 0 else None)
    finally:
        stop.set()
        if signals.received:
            service.signals = signals
        else:
            signals.restore()
