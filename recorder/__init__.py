"""The recorder: tick feeds into acknowledged storage."""

from recorder.feed import TickFeed, TickSink
from recorder.recorder import Recorder
from recorder.synthetic import AAPL, MNQ, SyntheticContract, SyntheticFeed, synthetic_ticks

__all__ = ["AAPL", "MNQ", "Recorder", "SyntheticContract", "SyntheticFeed", "TickFeed", "TickSink", "synthetic_ticks"]
