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
    "--archive-url": ["record", "serve", "publish"],
}


@pytest.mark.parametrize("option", sorted(VERBS_WITH))
def test_an_option_is_taken_by_every_verb_it_belongs_to(option):
    for verb in VERBS_WITH[option]:
        extra = ["dest"] if verb == "backup" else []
        args = _parser().parse_args([verb, *extra, option, "7" if "port" in option else "somewhere"])
        name = option.lstrip("-").replace("-", "_")
        expected = 7 if "port" in option else "somewhere" if option == "--archive-url" else Path("somewhere")
        assert getattr(args, name) == expected, (verb, option)


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


def ibstream(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")} | (env or {})
    return subprocess.run([sys.executable, "-m", "ibstream.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environment, timeout=timeout)


def assert_one_line(run: subprocess.CompletedProcess, *parts: str) -> None:
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    for part in parts:
        assert part in run.stderr, run.stderr


@pytest.mark.parametrize("env, parts", [
    ({"IBSTREAM_CONTRACTS": "[{bad"}, ["ibstream serve: bad setting: IBSTREAM_CONTRACTS is not valid JSON"]),
    ({"IBSTREAM_CONTRACTS": '[{"con_id": 265598, "tick_types": ["quotes"]}]'},
     ["bad setting: IBSTREAM_CONTRACTS[0].tick_types[0]: Input should be 'bid_ask', 'last', 'all_last' or "
      "'mid_point' (got 'quotes')"]),
    ({"IBSTREAM_ROTATION_INTERVAL": "5 minutes"},
     ["IBSTREAM_ROTATION_INTERVAL: Input should be a valid timedelta", "durations are ISO-8601, e.g. PT5M"]),
    ({"IBSTREAM_DATAROOT": "/srv/ticks"}, ["IBSTREAM_DATAROOT is not a setting; did you mean IBSTREAM_DATA_ROOT?"]),
    ({"IBSTREAM_FLIGHT_HOST": "0.0.0.0"},
     ["flight_host 0.0.0.0 is not a loopback address: serving it needs TLS", "IBSTREAM_ALLOW_INSECURE=true"]),
])
def test_a_bad_setting_is_one_line_and_exit_status_2(tmp_path, env, parts):
    assert_one_line(ibstream("serve", "--data-root", str(tmp_path), env=env), *parts)


def test_each_cli_mistake_is_one_line_and_exit_status_2(tmp_path):
    assert_one_line(ibstream("serve", "--log-level", "LOUD"),
                    "ibstream serve: argument --log-level: log level was 'LOUD'; use one of DEBUG, INFO")
    assert_one_line(ibstream("serve", "--data-root", str(tmp_path / "typo")),
                    f"{tmp_path / 'typo'} holds no ibstream store", "check --data-root")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert_one_line(ibstream("record", "--synthetic", "--seconds", "1", "--data-root", str(blocker / "data")),
                    "ibstream record: Not a directory:", "check the path (--data-root / IBSTREAM_DATA_ROOT)")
    assert_one_line(ibstream("simulate", "--replay", str(tmp_path), "--start", "garbage"),
                    "ibstream simulate: argument --start: time was 'garbage', not an ISO-8601 time")
    assert_one_line(ibstream("simulate", "--speed", "0"),
                    "ibstream simulate: argument --speed: speed was '0'; give a number above 0")


def test_a_port_in_use_and_a_second_recorder_are_one_line(tmp_path):
    import socket

    data = str(tmp_path / "data")
    first = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "record", "--synthetic", "--seconds", "30",
                              "--data-root", data, "--flight-port", "0", "--log-level", "WARNING"], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = __import__("time").monotonic() + 30
        while not (tmp_path / "data" / "writer.lock").exists() or not (tmp_path / "data" / "index.sqlite").exists():
            assert __import__("time").monotonic() < deadline
        assert_one_line(ibstream("record", "--synthetic", "--seconds", "1", "--data-root", data, "--flight-port", "0"),
                        f"ibstream record: {data} is already open for writing by another process (pid {first.pid})")
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            assert_one_line(ibstream("serve", "--data-root", data, "--flight-port", str(port)),
                            f"ibstream serve: the Flight server cannot listen on grpc://127.0.0.1:{port}",
                            "Pick another with --flight-port")
    finally:
        first.terminate()
        first.wait(timeout=30)


def verbs() -> list[str]:
    commands = next(a for a in _parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    return sorted(commands.choices)


def test_every_verb_has_help_that_teaches_with_examples():
    assert {"demo", "record", "simulate", "serve", "verify", "reindex", "backup", "token", "status", "prune",
            "export"} <= set(verbs())
    for verb in verbs():
        run = ibstream(verb, "--help")
        assert run.returncode == 0 and run.stderr == "", (verb, run.stderr)
        usage, _, rest = run.stdout.partition("\n\n")
        assert usage.startswith(f"usage: ibstream {verb}") and len(rest.split("\n\n", 1)[0]) > 60, verb  # described
        examples = rest.split("Examples:\n", 1)[1]
        assert f"ibstream {verb}" in examples.splitlines()[0], verb
        assert examples.splitlines()[1].startswith("      "), verb  # each example says what it does


def test_export_as_a_subprocess_beside_a_writer_and_its_one_line_mistakes(tmp_path):
    import json
    from datetime import timedelta

    import pyarrow.csv as pacsv

    from ibstream.settings import Settings
    from ibstream.storage import Store, schema_for
    from ibstream.storage.synthetic import MNQ
    from tests.helpers import append_in_batches, market, ticks, utc

    settings = Settings(data_root=tmp_path / "data", rotation_interval=timedelta(minutes=5),
                        archive_delay=timedelta(0), fsync="none")
    start, end = utc(2025, 1, 10, 13, 40), utc(2025, 1, 10, 15, 20)
    data = ["--data-root", str(settings.data_root)]
    with Store(settings) as store:  # held open for writing, as a recorder holds it
        append_in_batches(store, ticks(utc(2025, 1, 10, 13, 30), 20_000, rate_scale=0.25))
        append_in_batches(store, market(MNQ, "last", utc(2025, 1, 10, 13, 30), utc(2025, 1, 10, 16), 0.5, seed=3))
        store.archive(now=utc(2025, 1, 10, 14, 30))  # hour 13 archived, 14 and 15 buffered
        run = ibstream("export", str(tmp_path / "csv"), *data, "--contract-id", str(MNQ.contract_id),
                       "--tick-type", "bid_ask", "--start", "2025-01-10T13:40:00Z", "--end", "2025-01-10T16:20:00+01:00",
                       "--format", "csv")
        assert run.returncode == 0, run.stderr
        want = store.read(MNQ.contract_id, "bid_ask", start, end)
        assert run.stdout.splitlines() == [
            f"{tmp_path / 'csv' / f'{MNQ.contract_id}_bid_ask.csv'}: {MNQ.contract_id}/bid_ask, {want.num_rows:,} rows "
            f"({want['ts'][0].as_py().isoformat().replace('+00:00', 'Z')} .. "
            f"{want['ts'][-1].as_py().isoformat().replace('+00:00', 'Z')}), "
            f"{(tmp_path / 'csv' / f'{MNQ.contract_id}_bid_ask.csv').stat().st_size / 2**20:,.1f} MB",
            f"{tmp_path / 'csv' / 'manifest.json'}: 1 file, {want.num_rows:,} rows of "
            "[2025-01-10T13:40:00Z, 2025-01-10T15:20:00Z)"]
        back = pacsv.read_csv(tmp_path / "csv" / f"{MNQ.contract_id}_bid_ask.csv",
                              convert_options=pacsv.ConvertOptions(column_types=schema_for("bid_ask")))
        assert back.cast(schema_for("bid_ask")).equals(want)

        every = ibstream("export", str(tmp_path / "all"), *data, "--start", "2025-01-10", "--end", "2025-01-11")
        assert every.returncode == 0, every.stderr
        manifest = json.loads((tmp_path / "all" / "manifest.json").read_text())
        assert [(f["path"], f["rows"]) for f in manifest["files"]] == [
            (f"{MNQ.contract_id}_{tt}.parquet", store.read(MNQ.contract_id, tt, utc(2025, 1, 10), utc(2025, 1, 11))
             .num_rows) for tt in ("bid_ask", "last")]

    assert_one_line(ibstream("export", str(tmp_path / "all"), *data, "--start", "2025-01-10"),
                    f"ibstream export: export destination {tmp_path / 'all'} is not empty (it holds ",
                    "name a new or empty folder")
    assert_one_line(ibstream("export", str(tmp_path / "x"), *data, "--start", "10/01/2025"),
                    "ibstream export: argument --start: time was '10/01/2025', not an ISO-8601 time; e.g. ")
    assert_one_line(ibstream("export", str(tmp_path / "x"), *data, "--start", "2025-01-10", "--end", "2025-01-09"),
                    "--start 2025-01-10T00:00:00Z is not before --end 2025-01-09T00:00:00Z")
    assert_one_line(ibstream("export", str(tmp_path / "x"), *data, "--start", "2025-01-10", "--contract-id", "265598"),
                    f"contract 265598 has no ticks in {settings.data_root} (stored: {MNQ.contract_id}: bid_ask last)")
    assert_one_line(ibstream("export", str(tmp_path / "x"), *data, "--start", "2025-01-10", "--tick-type",
                             "mid_point"), f"no mid_point ticks of contract {MNQ.contract_id} are stored")
    assert not (tmp_path / "x").exists()
