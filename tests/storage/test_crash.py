"""Crashes lose no acknowledged tick: SIGKILL mid-stream, torn segments, kills mid-archival."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import ENV, EXIT_CODE
from ibstream.storage.schemas import TickType
from ibstream.storage.segments import StreamKey, list_segments, stream_dir
from ibstream.storage.synthetic import MNQ
from tests.helpers import ticks, utc

CID = MNQ.contract_id
ROOT = Path(__file__).resolve().parents[2]
EVERYTHING = (utc(2000, 1, 1), utc(2100, 1, 1))

WRITER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from pathlib import Path
    sys.path.insert(0, {root_dir!r})  # for tests.helpers
    from tests.helpers import ticks, utc
    from ibstream.settings import Settings
    from ibstream.storage import Store

    settings = Settings(data_root=Path({root!r}), rotation_interval=timedelta(seconds=30), fsync={fsync!r})
    table = ticks(utc(2025, 1, 10, 14), {count}, rate_scale=2.0)
    store = Store(settings)
    acked = 0
    for offset in range(0, table.num_rows, {batch}):
        acked += store.append({cid}, "bid_ask", table.slice(offset, {batch}))
        print("ACK", acked, flush=True)
    """
)


def run_writer(root: Path, *, fsync: str, count: int, batch: int) -> subprocess.Popen:
    code = WRITER.format(root_dir=str(ROOT), root=str(root), fsync=fsync, count=count, batch=batch, cid=CID)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)


@pytest.mark.parametrize("fsync", ["batch", "none"])
def test_sigkill_mid_stream_loses_no_acknowledged_tick(tmp_path, fsync):
    count, batch = 400_000, 1_000
    writer = run_writer(tmp_path / "data", fsync=fsync, count=count, batch=batch)
    acked = 0
    for line in writer.stdout:
        acked = int(line.split()[1])
        if acked >= 60_000:
            break
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert acked < count, "the writer finished before it was killed; the test proves nothing"

    settings = Settings(data_root=tmp_path / "data")
    with Store(settings) as store:
        stored = store.read(CID, "bid_ask", *EVERYTHING)
    expected = ticks(utc(2025, 1, 10, 14), count, rate_scale=2.0)
    assert stored.num_rows >= acked
    assert stored.equals(expected.slice(0, stored.num_rows)), "stored ticks are not an exact prefix of those sent"


@pytest.fixture
def one_segment(settings: Settings) -> Settings:
    """Settings whose rotation keeps these tests' ticks in a single segment."""
    return settings.model_copy(update={"rotation_interval": timedelta(hours=1)})


def test_torn_segment_tail_is_recovered(one_segment):
    settings = one_segment
    table = ticks(utc(2025, 1, 10, 14), 5_000)
    with Store(settings) as store:
        for offset in range(0, 5_000, 1_000):
            store.append(CID, "bid_ask", table.slice(offset, 1_000))
    directory = stream_dir(settings.buffer_root, StreamKey(CID, TickType.BID_ASK))
    (segment,) = list_segments(directory)
    whole = segment.stat().st_size
    # Tear inside the last batch (and drop the end-of-stream marker with it).
    os.truncate(segment, whole - 8 - 100)
    with Store(settings) as store:
        recovered = store.read(CID, "bid_ask", *EVERYTHING)
        assert recovered.equals(table.slice(0, 4_000))
        store.append(CID, "bid_ask", table.slice(4_000))  # recording goes on after recovery
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table)


@pytest.mark.parametrize("cut", [1, 7, 8, 9, 64, 200])
def test_every_torn_length_recovers_the_whole_batches(one_segment, cut):
    settings = one_segment
    table = ticks(utc(2025, 1, 10, 14), 3_000)
    with Store(settings) as store:
        store.append(CID, "bid_ask", table.slice(0, 1_000))
        store.append(CID, "bid_ask", table.slice(1_000, 2_000))
    (segment,) = list_segments(stream_dir(settings.buffer_root, StreamKey(CID, TickType.BID_ASK)))
    os.truncate(segment, segment.stat().st_size - 8 - cut)  # the EOS marker and `cut` bytes of batch 2
    with Store(settings) as store:
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(table.slice(0, 1_000))


ARCHIVER = textwrap.dedent(
    """
    import sys
    from datetime import timedelta
    from pathlib import Path
    sys.path.insert(0, {root_dir!r})  # for tests.helpers
    from tests.helpers import append_in_batches, ticks, utc
    from ibstream.settings import Settings
    from ibstream.storage import Store

    settings = Settings(data_root=Path({root!r}), rotation_interval=timedelta(minutes=5), archive_delay=timedelta(0))
    store = Store(settings)
    append_in_batches(store, ticks(utc(2025, 1, 10, 13, 30), 20_000, rate_scale=0.5))
    store.archive(now=utc(2025, 1, 10, 16))
    """
)


@pytest.mark.parametrize("point", ["archive.after_write_tmp", "archive.after_rename", "archive.after_publish"])
def test_kill_during_archival_counts_every_tick_once(tmp_path, point):
    root = tmp_path / "data"
    code = ARCHIVER.format(root_dir=str(ROOT), root=str(root))
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, ENV: point})
    assert result.returncode == EXIT_CODE
    expected = ticks(utc(2025, 1, 10, 13, 30), 20_000, rate_scale=0.5)

    reader = Store(Settings(data_root=root), read_only=True)  # a reader that does no recovery
    assert reader.read(CID, "bid_ask", *EVERYTHING).equals(expected)
    reader.close()

    settings = Settings(data_root=root, archive_delay=timedelta(0))
    with Store(settings) as store:  # recovery, then archival finishes
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
        store.archive(now=utc(2025, 1, 10, 16))
        assert store.read(CID, "bid_ask", *EVERYTHING).equals(expected)
        hours = store.index.archives(CID, "bid_ask", 0, 2**62)
        assert sum(e.tick_count for e in hours) == expected.num_rows
    assert not list(root.rglob("*.tmp"))
    assert not list((root / "buffer").rglob("*.arrows")) or all(
        "T15" in p.name for p in (root / "buffer").rglob("*.arrows")
    )
