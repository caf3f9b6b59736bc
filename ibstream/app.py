"""The recording process: store + recorder + background archiver + Flight server in one."""

from __future__ import annotations

import logging
import threading
import time

from flight_server.server import FlightServer
from ibstream.settings import Settings
from recorder.feed import TickFeed
from recorder.recorder import Recorder
from storage.store import Store

log = logging.getLogger(__name__)


class RecordingService:
    """Records a feed into a store and serves it over Flight; use as a context manager."""

    def __init__(self, settings: Settings, feed: TickFeed, *, flush_interval: float = 0.02):
        self.settings = settings
        self.store = Store(settings)
        self.recorder = Recorder(self.store, flush_interval=flush_interval)
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
        """Log one line per stream with ticks/s over the last ``every`` seconds, until set."""
        previous = dict(self.recorder.acknowledged)
        while not until.wait(every):
            current = dict(self.recorder.acknowledged)
            for key, count in sorted(current.items()):
                rate = (count - previous.get(key, 0)) / every
                log.info("%s: %.0f ticks/s, %d acknowledged", key, rate, count)
            previous = current


def run_for(service: RecordingService, seconds: float, report_every: float = 2.0) -> None:
    stop = threading.Event()
    reporter = threading.Thread(target=service.log_rates, args=(report_every, stop), daemon=True)
    reporter.start()
    try:
        time.sleep(seconds) if seconds > 0 else threading.Event().wait()
    finally:
        stop.set()
