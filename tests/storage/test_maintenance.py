"""`ibstream verify`, `reindex` and `backup` as an operator runs them, and kill -9 at each step."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import ENV, EXIT_CODE
from ibstream.storage.maintenance import backup
from ibstream.storage.synthetic import MNQ
from tests.helpers import append_in_batches, between, ticks, utc

ROOT = Path(__file__).resolve().parents[2]
CID = MNQ.contract_id
EVERYTHING = (utc(2000, 1, 1), utc(2100, 1, 1))
START = utc(2025, 1, 10, 13, 30)


def ibstream(*args: str, failpoint: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **({ENV: failpoint} if failpoint else {})}
    return subprocess.run([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def recorded(settings: Settings) -> pa.Table:
    quotes = ticks(START, 30_000, rate_scale=0.25)  # hours 13-15 archived, 15 and 16 also in segments
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 10, 15, 30))
    return quotes


def read_all(root: Path) -> pa.Table:
    with Store(Settings(data_root=root)) as store:
        return store.read(CID, "bid_ask", *EVERYTHING)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    at = len(data) // 3
    data[at:at + 64] = bytes(b ^ 0xFF for b in data[at:at + 64])
    path.write_bytes(bytes(data))


def test_verify_says_all_is_sound_then_finds_and_quarantines_damage(settings, recorded):
    sound = ibstream("verify", "--data-root", str(settings.data_root))
    assert sound.returncode == 0, sound.stderr
    assert "verified 2 archive files" in sound.stdout
    flip(sorted(settings.archive_root.rglob("*.parquet"))[0])
    found = ibstream("verify", "--data-root", str(settings.data_root))
    assert found.returncode == 1
    assert "damaged: 711280073 bid_ask 2025-01-10T13:00:00Z .. 2025-01-10T13:59:59.999999Z" in found.stdout
    assert "Traceback" not in found.stderr
    assert read_all(settings.data_root).equals(between(recorded, utc(2025, 1, 10, 14), EVERYTHING[1]))


def test_cli_errors_are_one_line_without_a_traceback(settings, recorded, tmp_path):
    settings.index_path.write_bytes(b"\0garbage" * 100)
    for verb in (["verify"], ["serve", "--flight-port", "0"]):
        result = ibstream(*verb, "--data-root", str(settings.data_root))
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert "ibstream reindex --data-root" in result.stderr
    missing = ibstream("verify", "--data-root", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "holds no ibstream store" in missing.stderr
    assert not (tmp_path / "nowhere").exists(), "a mistyped --data-root must not create a store"
    result = ibstream("reindex", "--data-root", str(settings.data_root))
    assert result.returncode == 0, result.stderr
    assert "rebuilt" in result.stdout and "2 archive files" in result.stdout
    assert read_all(settings.data_root).equals(recorded)


def test_a_second_writer_is_refused_by_maintenance(settings, recorded):
    with Store(settings):
        result = ibstream("reindex", "--data-root", str(settings.data_root))
    assert result.returncode == 2 and "already open for writing" in result.stderr


@pytest.mark.parametrize("point", ["reindex.before_swap", "quarantine.before_move"])
def test_kill_during_reindex_leaves_a_store_that_reindexes(settings, recorded, point):
    killed = ibstream("reindex", "--data-root", str(settings.data_root), failpoint=point)
    assert killed.returncode == EXIT_CODE
    assert read_all(settings.data_root).equals(recorded)
    assert ibstream("reindex", "--data-root", str(settings.data_root)).returncode == 0
    assert read_all(settings.data_root).equals(recorded)
    assert not list(settings.data_root.glob("*.rebuild*"))


def test_kill_during_verify_quarantine_loses_nothing(settings, recorded):
    flip(sorted(settings.archive_root.rglob("*.parquet"))[1])
    killed = ibstream("verify", "--data-root", str(settings.data_root), failpoint="quarantine.before_move")
    assert killed.returncode == EXIT_CODE
    assert len(list(settings.archive_root.rglob("*.parquet"))) == 2, "killed before the move: the file is in place"
    assert ibstream("verify", "--data-root", str(settings.data_root)).returncode == 1  # finds it again
    assert ibstream("verify", "--data-root", str(settings.data_root)).returncode == 0
    expected = pa.concat_tables([between(recorded, START, utc(2025, 1, 10, 14)),
                                 between(recorded, utc(2025, 1, 10, 15), EVERYTHING[1])])
    assert read_all(settings.data_root).equals(expected)


def test_backup_is_a_complete_store(settings, recorded, tmp_path):
    destination = tmp_path / "backup"
    result = ibstream("backup", str(destination), "--data-root", str(settings.data_root))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "backup.partial").exists()
    assert read_all(destination).equals(recorded)
    again = ibstream("backup", str(destination), "--data-root", str(settings.data_root))
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("point", ["backup.after_segments", "backup.before_rename"])
def test_kill_during_backup_leaves_no_backup_then_a_rerun_completes(settings, recorded, tmp_path, point):
    destination = tmp_path / "backup"
    killed = ibstream("backup", str(destination), "--data-root", str(settings.data_root), failpoint=point)
    assert killed.returncode == EXIT_CODE
    assert not destination.exists(), "an incomplete backup never looks like a backup"
    assert ibstream("backup", str(destination), "--data-root", str(settings.data_root)).returncode == 0
    assert read_all(destination).equals(recorded)


def test_backup_while_recording_and_archiving(settings, tmp_path):
    """The recorder goes on appending and archiving; the copy is consistent at its instant: every
    tick acknowledged before the backup started, once."""
    quotes = ticks(START, 60_000, rate_scale=0.5)
    with Store(settings) as store:
        append_in_batches(store, quotes.slice(0, 30_000))
        copied = []
        original = shutil.copyfile

        def archive_during_copy(source, target, **kwargs):  # the archiver runs between two file copies
            result = original(source, target, **kwargs)
            if not copied:
                store.archive(now=utc(2025, 1, 10, 15))
                append_in_batches(store, quotes.slice(30_000))
            copied.append(source)
            return result

        shutil.copyfile = archive_during_copy
        try:
            backup(settings, tmp_path / "backup")
        finally:
            shutil.copyfile = original
    restored = read_all(tmp_path / "backup")
    assert restored.slice(0, 30_000).equals(quotes.slice(0, 30_000))
    assert restored.equals(quotes.slice(0, restored.num_rows)), "an exact prefix: nothing doubled, nothing missing"


def test_rotation_interval_change_through_the_cli_environment(settings, tmp_path):
    """The settings a new user changes between two `ibstream record` runs (IBSTREAM_ROTATION_INTERVAL)."""
    quotes = ticks(utc(2025, 1, 10, 14), 8_000)
    with Store(settings.model_copy(update={"rotation_interval": timedelta(minutes=15)})) as store:
        append_in_batches(store, quotes.slice(0, 4_000))
    with Store(settings.model_copy(update={"rotation_interval": timedelta(minutes=1)})) as store:
        append_in_batches(store, quotes.slice(4_000))
    assert read_all(settings.data_root).equals(quotes)
