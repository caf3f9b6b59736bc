"""The recording process: store + recorder + background archiver + Flight server in one."""

from __future__ import annotations

import logging
import signal
import threading

from flight_server.server import FlightServer
from ibstream.settings import Settings
from recorder.feed import TickFeed
from recorder.recorder import Recorder
from storage.store import Store

log = logging.getLogger(__name__)


class RecordingService:
    """Records a feed into a store and serves it over Flight; use as a context manager."""

    def __init__(self, settings: Settings, feed: TickFeed):
        self.settings = settings
        self.store = Store(settings)
        self.recorder = Recorder(self.store, flush_interval=settings.flush_interval.total_seconds())
        self.feed = feed
        self.server = FlightServer(self.store, settings.flight_location)
        self._serve = threading.Thread(target=self.server.serve, name="flight-server", daemon=True)

    @property
    def location(self) -> str:
        return f"grpc://{self.settings.flight_host}:{self.server.port}"

    def __enter__(self) -> "RecordingService":
        self._serve.start()
        self.store.start_background()
        self.recorder.start()
        self.feed.start(self.recorder)
        log.info("recording; Flight server at %s, data in %s", self.location, self.settings.data_root)
        return self

    def __exit__(self, *exc) -> None:
        self.feed.stop()
        self.recorder.stop()  # last flush: everything received is acknowledged
        self.server.shutdown()
        self._serve.join()
        self.store.close()

    def log_rates(self, every: float, until: threading.Event) -> None:
        """Log one line per stream every ``every`` seconds until set: rate, total, and whether it is
        being recorded, e.g. ``711280073 bid_ask: 452 ticks/s, 27,113 acknowledged, recording``."""
        recorder = self.recorder
        previous = dict(recorder.acknowledged)
        while not until.wait(every):
            current = dict(recorder.acknowledged)
            for key in sorted(current.keys() | recorder.recording.keys()):
                count = current.get(key, 0)
                state = "recording" if recorder.recording.get(key) else "NOT recording (see coverage)"
                dropped = f", {recorder.dropped[key]:,} DROPPED" if recorder.dropped.get(key) else ""
                log.info("%d %s: %.0f ticks/s, %s acknowledged, %s%s", key.contract_id, key.tick_type.value,
                         (count - previous.get(key, 0)) / every, f"{count:,}", state, dropped)
            previous = current


def run_for(service: RecordingService, seconds: float, report_every: float = 2.0) -> None:
    """Run until ``seconds`` pass (0: forever) or SIGINT/SIGTERM arrives, logging rates meanwhile."""
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for sig in previous:
            signal.signal(sig, lambda number, frame: (log.info("%s: stopping, flushing acknowledged ticks",
                                                               signal.Signals(number).name), stop.set()))
    reporter = threading.Thread(target=service.log_rates, args=(report_every, stop), daemon=True)
    reporter.start()
    try:
        stop.wait(seconds if seconds > 0 else None)
    finally:
        stop.set()
        if in_main:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
