"""`make demo`'s command runs end to end and reports an exact round trip."""

import subprocess
import sys


def test_demo_runs_and_every_tick_comes_back(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ibstream.cli", "demo", "--seconds", "2", "--data-root", str(tmp_path / "d")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "every acknowledged tick served exactly once: yes" in result.stdout
    assert "bid_ask" in result.stdout and "last" in result.stdout


def test_cli_help_teaches(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ibstream.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "IBSTREAM_DATA_ROOT" in result.stdout and "ibstream demo" in result.stdout
