"""The recorder: tick feeds into acknowledged storage."""

from ibstream.recorder.feed import TickFeed, TickSink
from ibstream.recorder.recorder import Recorder
from ibstream.recorder.synthetic import AAPL, MNQ, SyntheticContract, SyntheticFeed, synthetic_ticks

__all__ = ["AAPL", "MNQ", "Recorder", "SyntheticContract", "SyntheticFeed", "TickFeed", "TickSink", "synthetic_ticks"]
