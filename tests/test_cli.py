"""One CLI vocabulary: each option means the same in every verb that takes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ibstream.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
VERBS_WITH = {
    "--data-root": ["demo", "record", "serve", "verify", "reindex", "backup"],
    "--flight-port": ["demo", "record", "serve"],
    "--ib-port": ["record", "simulate"],
}


@pytest.mark.parametrize("option", sorted(VERBS_WITH))
def test_an_option_is_taken_by_every_verb_it_belongs_to(option):
    for verb in VERBS_WITH[option]:
        extra = ["dest"] if verb == "backup" else []
        args = _parser().parse_args([verb, *extra, option, "7" if "port" in option else "somewhere"])
        name = option.lstrip("-").replace("-", "_")
        assert getattr(args, name) == (7 if "port" in option else Path("somewhere")), (verb, option)


def test_log_level_goes_before_or_after_the_verb_and_port_still_works():
    assert _parser().parse_args(["serve", "--log-level", "DEBUG"]).log_level == "DEBUG"
    assert _parser().parse_args(["--log-level", "WARNING", "serve"]).log_level == "WARNING"
    assert _parser().parse_args(["serve"]).log_level == "INFO"
    assert _parser().parse_args(["serve", "--port", "9"]).flight_port == 9  # the flag before the vocabulary
    assert _parser().parse_args(["simulate", "--port", "9"]).ib_port == 9


def test_version_and_a_verb_that_records_with_the_vocabulary(tmp_path):
    version = subprocess.run([sys.executable, "-m", "ibstream.cli", "--version"], capture_output=True, text=True,
                             cwd=ROOT)
    assert version.stdout.strip() == "ibstream 0.1.0"
    run = subprocess.run([sys.executable, "-m", "ibstream.cli", "record", "--log-level", "WARNING", "--synthetic",
                          "--seconds", "1", "--data-root", str(tmp_path / "data"), "--flight-port", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "data" / "index.sqlite").exists()


def test_a_bad_setting_is_one_line_naming_the_variable(tmp_path):
    run = subprocess.run([sys.executable, "-m", "ibstream.cli", "verify", "--data-root", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "IBSTREAM_SCRUB_INTERVAL": "soon"})
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("ibstream verify: bad setting: IBSTREAM_SCRUB_INTERVAL: ") and "'soon'" in run.stderr
