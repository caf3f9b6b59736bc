"""The recorder: tick feeds into acknowledged storage (names load on first use)."""

from ibstream._lazy import lazy_exports

_EXPORTS = {
    "TickFeed": "ibstream.recorder.feed",
    "TickSink": "ibstream.recorder.feed",
    "Recorder": "ibstream.recorder.recorder",
    "AAPL": "ibstream.recorder.synthetic",
    "MNQ": "ibstream.recorder.synthetic",
    "SyntheticContract": "ibstream.recorder.synthetic",
    "SyntheticFeed": "ibstream.recorder.synthetic",
    "synthetic_ticks": "ibstream.recorder.synthetic",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
