"""``ibstream``: record ticks, serve them over Arrow Flight, try it all with ``ibstream demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ibstream.core.units import byte_text

EPILOG = """
Settings come from IBSTREAM_* environment variables (see ibstream/settings.py), e.g.
  IBSTREAM_DATA_ROOT=/srv/ticks IBSTREAM_FLIGHT_PORT=8815 ibstream serve

Examples:
  ibstream demo                      # gateway simulator -> ibapi recorder -> store -> Flight -> client
  ibstream simulate                  # a pretend IB Gateway on 127.0.0.1:4002 (MNQ and AAPL markets)
  ibstream record                    # record IBSTREAM_CONTRACTS from TWS/Gateway, serve over Flight
  IBSTREAM_CONTRACTS='[{"con_id": 265598, "tick_types": ["bid_ask", "last"]}]' IBSTREAM_IB_PORT=7497 ibstream record
  ibstream serve --data-root data    # serve an existing store (read-only) over Flight
  ibstream verify --data-root data   # check every file; quarantine and report what is damaged
  ibstream reindex --data-root data  # rebuild index.sqlite from the files (lost or damaged index)
  ibstream backup /mnt/backup/ticks-2026-12-01   # a consistent copy, while recording goes on
  ibstream token --name alice --token-file /etc/ibstream/tokens   # a read token for a Flight client
  ibstream status --data-root data   # streams, last ticks, today's gaps, archival, retention, disk
  IBSTREAM_RETENTION='[{"ticks_days": 90}]' ibstream prune   # what retention would expire (--apply: do it)
  ibstream compact --data-root data  # closed days that would merge into one file per stream (--apply: do it)
  ibstream export jan --start 2025-01-01 --end 2025-02-01    # January's ticks to Parquet files + manifest.json
  ibstream import /srv/ib-stream/storage --data-root data   # an IB-Stream storage root into this store
  ibstream backfill --data-root data  # fill coverage gaps from IB's historical ticks (recorder stopped)

Try the whole chain without IB: `ibstream simulate` in one terminal, `ibstream record` in another.
Each verb's --help says what it does, with examples (e.g. `ibstream export --help`).
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


class _VerbHelp(argparse.RawDescriptionHelpFormatter):
    """A verb's help: prose lines wrapped to the terminal as paragraphs, indented lines (the examples)
    kept as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        lines: list[str] = []
        prose: list[str] = []
        for line in [*text.splitlines(), ""]:
            if line.strip() and not line.startswith(" "):
                prose.append(line.strip())
                continue
            if prose:
                lines.append(textwrap.fill(" ".join(prose), width, initial_indent=indent, subsequent_indent=indent))
                prose = []
            lines.append(indent + line if line.strip() else "")
        return "\n".join(lines).rstrip("\n")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level was {value[:40]!r}; use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _parser() -> argparse.ArgumentParser:
    from ibstream.core.ticks import TickType

    parser = _Parser(
        prog="ibstream", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help="logging level (default INFO); also after the verb")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def verb(name: str, *options: str, **kwargs) -> argparse.ArgumentParser:
        """A verb with the shared vocabulary: each option means the same in every verb that takes it."""
        kwargs.setdefault("description", kwargs.get("help"))
        epilog = "Examples:\n" + "\n".join(f"  {line}\n      {what}" for line, what in EXAMPLES[name]) \
            if name in EXAMPLES else None
        sub = commands.add_parser(name, epilog=epilog, formatter_class=_VerbHelp, **kwargs)
        sub.add_argument("--log-level", default=argparse.SUPPRESS, type=_log_level, help="logging level (default INFO)")
        for option in options:
            flag, help_text = OPTIONS[option]
            kind = int if option.endswith("port") else str if option == "archive_url" else Path
            sub.add_argument(flag, type=kind, dest=option, help=help_text)
            if option in ("flight_port", "ib_port") and name in LEGACY_PORT:  # `--port` before the vocabulary
                if LEGACY_PORT[name] == option:
                    sub.add_argument("--port", type=int, dest=option, help=argparse.SUPPRESS)
        return sub

    demo = verb("demo", "data_root", "flight_port", help="run the whole chain on a synthetic feed (no IB account)",
                description="Starts the gateway simulator, records its synthetic MNQ and AAPL feed through ibapi into a "
                "store, serves it over Flight and checks what a client reads against what was sent, tick by tick, "
                "for --seconds. Exit status 0 when every tick matched.")
    demo.add_argument("--seconds", type=float, default=8.0, help="how long the live feed runs (default 8)")

    record = verb(
        "record", "data_root", "flight_port", "ib_port", "monitoring_port", "http_port", "archive_url",
        help="record tick-by-tick data from TWS / IB Gateway, archive hourly, serve over Flight",
        description="Connects to IBSTREAM_IB_HOST:IBSTREAM_IB_PORT, records IBSTREAM_CONTRACTS, reconnects with "
        "backoff, and stops cleanly on Ctrl-C / SIGTERM after flushing every received tick.")
    record.add_argument("--synthetic", action="store_true",
                        help="record the built-in synthetic MNQ/AAPL feed in-process instead of a gateway")
    record.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")

    simulate = verb(
        "simulate", "ib_port",
        help="run the IB gateway simulator: ibapi clients (e.g. `ibstream record`) connect to it",
        description="A TCP server speaking the IB API wire protocol with synthetic MNQ (conId 711280073) and AAPL "
        "(conId 265598) markets, or a replay of a stored archive. It listens on --ib-port.")
    simulate.add_argument("--speed", type=_speed, default=1.0, help="market speed vs realistic rates (default 1)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the synthetic market (default 0)")
    simulate.add_argument("--replay", type=Path, metavar="DATA_ROOT",
                          help="replay ticks from this store instead of the synthetic market")
    simulate.add_argument("--start", type=_time, help="replay from this ISO time (with --replay; default: 24 h ago)")
    simulate.add_argument("--end", type=_time, help="replay until this ISO time (with --replay; default: now)")

    serve = verb(
        "serve", "data_root", "flight_port", "monitoring_port", "http_port", "archive_url",
        help="serve an existing store over Flight (read-only)",
        description="Serves the store in --data-root over Arrow Flight at IBSTREAM_FLIGHT_HOST:--flight-port without "
        "writing to it, so it runs beside a recorder of the same store (live streams follow its new ticks) or on "
        "a backup or read-only copy. With --replica it is a read server on another machine: it serves the archive "
        "a recorder publishes to --archive-url, keeping its index copy and downloaded files in --data-root (an "
        "empty folder of its own). With IBSTREAM_SHARDS it is a coordinator: tick queries' published hours are "
        "sent to those read servers (Flight endpoint locations). Ctrl-C stops it.")
    serve.add_argument("--replica", action="store_true", default=None,
                       help="serve the archive published at --archive-url (default IBSTREAM_REPLICA or off)")

    verb(
        "publish", "data_root", "archive_url",
        help="publish the archive and index to the object store now (the recorder does it every minute)",
        description="Uploads the archive files the index names that the object store does not have yet, then the "
        "index, the manifest outside engines read, and last the pointer read servers follow: an hour is visible "
        "there once or not at all, whatever fails. Objects no index names any more are deleted "
        "IBSTREAM_RETENTION_GRACE after. Needs the writer lock: with the recorder running, it does this every "
        "IBSTREAM_PUBLISH_INTERVAL itself.")

    token = verb(
        "token", help="make a bearer token for a Flight client (printed once; the server keeps its hash)",
        description="Prints a new random token for the client (Client(token=...) or IBSTREAM_TOKEN) and the line the "
        "server needs: appended to --token-file when given (the server reads IBSTREAM_TOKEN_FILE), else printed for "
        "IBSTREAM_TOKENS. Role 'read': queries, live streams, statistics, sessions, coverage; 'admin': also "
        "maintenance actions (scrub). Restart the server to load new tokens.")
    token.add_argument("--name", required=True, help="who the token is for, e.g. alice (no spaces; in logs)")
    token.add_argument("--role", choices=("read", "admin"), default="read", help="read (default) or admin")
    token.add_argument("--token-file", type=Path, help="append the token's line to this file (made mode 0600)")

    maintenance = {
        "verify": ("check every stored file; quarantine and report what is damaged",
                   "Opens the store for writing (stop the recorder first), checks every buffer segment's batch "
                   "checksums, every archive file against the index (page CRCs, decoding, tick counts, ts order and "
                   "bounds, sizes) and the index itself. Damaged files are moved to DATA_ROOT/quarantine/ with a note, "
                   "never deleted; what they held is reported in coverage as 'damaged'. Exit status 0: all sound; 1: "
                   "damage found."),
        "reindex": ("rebuild index.sqlite from the archive and buffer files",
                    "For a lost, damaged or stale index (say, a backup that copied index.sqlite alone). Builds a new "
                    "index beside the old one from each archive file's own metadata (hours, statistics, 1-minute bars, "
                    "contract details, coverage), keeps contracts, coverage and damage records from the old index when "
                    "it can still be read, then swaps it in; the old index goes to DATA_ROOT/quarantine/. Stop the "
                    "recorder first."),
        "backup": ("copy the store consistently into a new folder (recording may go on)",
                   "Copies the buffer segments, then the index (SQLite's online backup), then every archive file that "
                   "index names, into DESTINATION.partial, renamed to DESTINATION when complete. Restore by pointing "
                   "--data-root (or IBSTREAM_DATA_ROOT) at the copy."),
    }
    for name, (summary, description) in maintenance.items():
        sub = verb(name, "data_root", help=summary, description=description)
        if name == "backup":
            sub.add_argument("destination", type=Path, help="a new (or empty) folder for the copy")

    verb("status", "data_root", help="what is stored and how recording goes (safe while recording)",
         description="Per stream: the last tick and its age, whether it is being recorded, today's coverage gaps "
         "(UTC), how far archival has come, and its retention; then the buffer's and archive's size and the free "
         "disk. Reads the store without writing, so it runs beside the recorder.")
    prune = verb("prune", "data_root", help="expire raw ticks past their retention (a dry run unless --apply)",
                 description="Lists, per stream, the archived hours whose raw ticks are past IBSTREAM_RETENTION "
                 "(e.g. '[{\"ticks_days\": 90}]'), their ticks and bytes. With --apply it expires them: queries "
                 "for them then say they expired, their 1-minute bars and up, statistics and coverage stay, and "
                 "the files are deleted IBSTREAM_RETENTION_GRACE later (on a later run, or by the recorder's "
                 "hourly job). --apply needs the writer lock: stop the recorder, or let it do this on schedule.")
    prune.add_argument("--apply", action="store_true", help="expire them (default: only list what would go)")
    compact = verb("compact", "data_root", help="merge closed days of hourly files into one file per stream and day "
                   "(a dry run unless --apply)",
                   description="Lists, per stream, the closed UTC days (ended IBSTREAM_COMPACT_DELAY ago, every hour "
                   "archived) whose hours live in several files. With --apply each day is written to one Parquet "
                   "file (date=.../hour=all/day-*.parquet, one row-group run per hour, so queries still read only "
                   "the hours they need), checked row for row against its hourly files, then swapped into the "
                   "index in one transaction; the hourly files move to superseded/ and are deleted "
                   "IBSTREAM_RETENTION_GRACE later (on a later run, or by the recorder's hourly job). Readers see "
                   "every tick exactly once throughout; a kill at any step is finished or undone on the next start. "
                   "--apply needs the writer lock: stop the recorder, or let it do this on schedule.")
    compact.add_argument("--apply", action="store_true", help="compact them (default: only list what would be)")

    export = verb(
        "export", "data_root", help="write a range of ticks to Parquet, CSV or Arrow IPC files, with a manifest",
        description="Writes the ticks of each stream (contract id x tick type) with START <= ts < END to one file per "
        "stream in DESTINATION (a new or empty folder), batch by batch, then manifest.json: the range, and per file "
        "its stream, rows, first and last ts, bytes, SHA-256, schema and the stream's coverage of the range "
        "('missing': spans not recorded, or damaged), so a training job knows where data is missing. A folder "
        "without manifest.json is an export that did not finish. Reads the store without writing, so it runs "
        "beside the recorder. CSV keeps values exact: times ISO-8601 UTC with microseconds, sizes as decimal text. "
        "A range whose raw ticks expired by retention is refused, naming the stream.")
    export.add_argument("destination", type=Path, help="a new (or empty) folder for the files and manifest.json")
    export.add_argument("--contract-id", type=_contract_id, action="append", dest="contract_ids", metavar="ID",
                        help="a contract to export, e.g. 711280073; repeat for more (default: every stored contract)")
    export.add_argument("--tick-type", choices=[t.value for t in TickType], action="append", dest="tick_types",
                        help="a tick type to export; repeat for more (default: each one stored for the contract)")
    export.add_argument("--start", type=_time, required=True,
                        help="first time, ISO-8601 with its zone (2025-01-10T14:30:00Z) or a date (00:00 UTC)")
    export.add_argument("--end", type=_time, help="end of the range, not included (same forms; default: now)")
    export.add_argument("--format", choices=("parquet", "csv", "arrow"), default="parquet",
                        help="parquet (default, zstd), csv, or arrow (an Arrow IPC file)")
    export.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar on stderr (default: when stderr is a terminal)")

    ingest = verb(
        "import", "data_root", help="import an IB-Stream storage root (v3 JSON + protobuf) into this store",
        description="Reads the v3 files of IB-Stream (github lakowske/ib-stream): PATH/v3/json/YYYY/MM/DD/HH/"
        "{contract_id}_{tick_type}_{hour}.jsonl, cross-checked record by record against the same ticks in "
        "PATH/v3/protobuf/ (disagreements are reported; the JSON copy is kept; a tick is counted once). Each "
        "stream's UTC hour of receive time becomes an archive file, published like any archived hour (atomic; "
        "a kill leaves an hour imported whole or not at all). IB-Stream's receive time becomes ts, its IB time "
        "ib_time; sizes become exact decimals (any not exact in 8 decimals is rounded and reported). v3 keeps no "
        "trade exchange, special conditions or past-limit: they are stored as '', '', false, and coverage marks "
        "the imported spans 'recorded' with reason imported_ib_stream_v3. Mid-point records without a price "
        "(IB-Stream loses it) are counted, never imported. Hours this store already holds (recorded by ibstream "
        "beside IB-Stream), expired or not yet over are skipped and counted, as are ticks inside this store's "
        "own recorded coverage. Running it again imports nothing twice; an interrupted run continues. v2 files "
        "are counted, not imported. Needs the writer lock: stop the recorder first (--dry-run runs beside it).")
    ingest.add_argument("path", type=Path, metavar="PATH", help="the IB-Stream storage root (the folder holding v3/)")
    ingest.add_argument("--contract-id", type=_contract_id, action="append", dest="contract_ids", metavar="ID",
                        help="import only this contract, e.g. 711280073; repeat for more (default: every one)")
    ingest.add_argument("--dry-run", action="store_true",
                        help="read and cross-check everything, print what would be imported, write nothing")
    ingest.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="show a progress bar on stderr (default: when stderr is a terminal)")

    backfill = verb(
        "backfill", "data_root", "ib_port",
        help="fill coverage gaps from IB's historical ticks now (the recorder does it every IBSTREAM_BACKFILL_INTERVAL)",
        description="Connects to IBSTREAM_IB_HOST:--ib-port as client IBSTREAM_BACKFILL_CLIENT_ID (default "
        "IBSTREAM_IB_CLIENT_ID + 100), takes the coverage gaps whose hours are archived (the most recent, then the "
        "shortest, first; none older than IBSTREAM_BACKFILL_MAX_AGE), asks reqHistoricalTicks for their seconds "
        "within IB's pacing rules, and writes the ticks the live edges do not already hold into the archive; "
        "coverage then says backfilled, partly_backfilled or unfillable (with IB's message). A run starts no new gap "
        "after IBSTREAM_BACKFILL_MAX_REQUESTS requests; what it leaves, or loses to a dropped connection, stays a gap "
        "for the next run. Needs the writer lock: with the recorder running, it does this on schedule itself "
        "(proto_docs/backfill.md).")
    backfill.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                          help="show a progress bar on stderr (default: when stderr is a terminal)")
    return parser


def _contract_id(value: str) -> int:
    from ibstream.core.times import MAX_CONTRACT_ID

    if not value.isdigit() or not 0 < int(value) <= MAX_CONTRACT_ID:
        raise argparse.ArgumentTypeError(f"contract id was {value[:40]!r}; give IB's conId, a whole number from 1 to "
                                         f"{MAX_CONTRACT_ID}, e.g. 711280073")
    return int(value)


def _speed(value: str) -> float:
    """A market speed factor: a finite number above zero."""
    try:
        speed = float(value)
    except ValueError:
        speed = float("nan")
    if not 0 < speed < float("inf"):
        raise argparse.ArgumentTypeError(f"speed was {value[:40]!r}; give a number above 0, e.g. 1 (realistic) or 10")
    return speed


def _time(value: str) -> int:
    """An ISO-8601 time with its zone, or a date (its 00:00 UTC), as microseconds since the epoch."""
    from datetime import UTC, date, datetime

    from ibstream.core.times import in_range_us, to_us

    example = "e.g. 2025-01-10T14:30:00Z, 2025-01-10T09:30:00-05:00 or the date 2025-01-10 (00:00 UTC)"
    try:
        parsed = datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"time was {value[:40]!r}, not an ISO-8601 time; {example}") from None
        if parsed.tzinfo is None:
            raise argparse.ArgumentTypeError(f"time {value[:40]!r} has no zone; add one (Z for UTC), {example}")
    try:
        return in_range_us(to_us(parsed), name="time")
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


EXAMPLES: dict[str, list[tuple[str, str]]] = {  # each verb's --help ends with these: (command line, what it does)
    "demo": [("ibstream demo", "gateway simulator -> ibapi recorder -> store -> Flight -> client, checked"),
             ("ibstream demo --seconds 30 --data-root /tmp/demo", "a longer run, keeping the store to look at")],
    "record": [("ibstream record", "record IBSTREAM_CONTRACTS from the gateway on :4002; serve them on :8815"),
               ("IBSTREAM_CONTRACTS='[{\"con_id\": 265598, \"tick_types\": [\"bid_ask\", \"last\"]}]' "
                "ibstream record --ib-port 7497 --data-root /srv/ticks", "AAPL quotes and trades from paper TWS"),
               ("ibstream record --synthetic --seconds 60 --data-root /tmp/ticks",
                "a minute of the built-in synthetic feed, no gateway needed")],
    "simulate": [("ibstream simulate", "a pretend IB Gateway on 127.0.0.1:4002 with MNQ and AAPL markets"),
                 ("ibstream simulate --ib-port 4010 --speed 10", "on another port, ten times the realistic rate"),
                 ("ibstream simulate --replay data --start 2025-01-10T14:30:00Z --end 2025-01-10T21:00:00Z",
                  "replay a stored day to ibapi clients")],
    "serve": [("ibstream serve --data-root data", "serve data/ on 127.0.0.1:8815, beside its recorder"),
              ("ibstream serve --data-root /mnt/backup/ticks-2026-12-01 --flight-port 9000",
               "serve a backup on another port"),
              ("ibstream serve --data-root data --http-port 8001",
               "also over HTTP: IB-Studies' base URL http://127.0.0.1:8001, REST docs at /docs"),
              ("ibstream serve --replica --archive-url s3://ticks/ibstream --data-root /var/cache/ibstream",
               "a read server on another machine over what the recorder publishes"),
              ("IBSTREAM_SHARDS='[{\"locations\": [\"grpc://10.0.0.2:8815\", \"grpc://10.0.0.3:8815\"]}]' "
               "ibstream serve --data-root data", "a coordinator beside the recorder: published hours are read from "
               "the two read servers, the rest and live streams here")],
    "publish": [("ibstream publish --data-root data --archive-url 's3://ticks/ibstream?region=eu-west-1'",
                 "seed a bucket with an existing archive (recorder stopped; AWS_* variables hold the keys)"),
                ("ibstream publish --archive-url file:///mnt/share/ibstream", "publish to a mounted folder")],
    "verify": [("ibstream verify --data-root data", "exit 0 when every file is sound, else 1 with what was "
                "quarantined")],
    "reindex": [("ibstream reindex --data-root data", "rebuild data/index.sqlite from the files (recorder stopped)")],
    "backup": [("ibstream backup /mnt/backup/ticks-2026-12-01 --data-root data",
                "a consistent copy while recording goes on; serve it with --data-root to restore")],
    "token": [("ibstream token --name alice --token-file /etc/ibstream/tokens",
               "a read token for alice, its hash appended to the server's token file"),
              ("ibstream token --name ops --role admin", "an admin token, printing the IBSTREAM_TOKENS entry")],
    "status": [("ibstream status --data-root data", "streams, last ticks, today's gaps, archival, retention, disk")],
    "prune": [("IBSTREAM_RETENTION='[{\"ticks_days\": 90}]' ibstream prune --data-root data",
               "list the hours whose raw ticks are older than 90 days"),
              ("IBSTREAM_RETENTION='[{\"ticks_days\": 90}]' ibstream prune --data-root data --apply",
               "expire them (recorder stopped; it also does this hourly)")],
    "compact": [("ibstream compact --data-root data", "list the closed days that would be merged"),
                ("ibstream compact --data-root data --apply",
                 "merge them (recorder stopped; it also does this hourly)")],
    "export": [("ibstream export jan --start 2025-01-01 --end 2025-02-01",
                "every stream's ticks of January 2025 (UTC) to Parquet files in jan/, with jan/manifest.json"),
               ("ibstream export mnq-quotes --contract-id 711280073 --tick-type bid_ask "
                "--start 2025-01-10T14:30:00Z --end 2025-01-10T21:00:00Z --format csv",
                "one day's MNQ quotes as CSV"),
               ("ibstream export aapl --contract-id 265598 --start 2025-01-06 --format arrow --data-root /srv/ticks",
                "AAPL's quotes and trades from 6 January to now as Arrow IPC files")],
    "backfill": [("ibstream backfill --data-root data",
                  "fill the gaps of data/ from the gateway on :4002 (recorder stopped), with a summary"),
                 ("IBSTREAM_BACKFILL_MAX_REQUESTS=500 ibstream backfill --ib-port 7497 --data-root /srv/ticks",
                  "a bigger run against paper TWS (IB's pacing still holds: 60 requests per 10 minutes)")],
    "import": [("ibstream import /srv/ib-stream/storage --data-root data",
                "every v3 tick of IB-Stream's storage root into data/ (recorder stopped), with a summary"),
               ("ibstream import /srv/ib-stream/storage --dry-run",
                "what would be imported, skipped and why, and how the JSON and protobuf copies agree; writes nothing"),
               ("ibstream import /srv/ib-stream/storage --contract-id 711280073",
                "only MNQ's streams; run it again after a kill or later on: it imports only what is new")],
}


OPTIONS = {  # one meaning per option, in every verb
    "data_root": ("--data-root", "store folder (default IBSTREAM_DATA_ROOT or ./data; demo: a new temp folder)"),
    "flight_port": ("--flight-port", "Flight server port (default IBSTREAM_FLIGHT_PORT or 8815; 0: any free port; "
                                     "demo: any free port)"),
    "ib_port": ("--ib-port", "IB API port of TWS / Gateway, or of the simulator (default IBSTREAM_IB_PORT or 4002)"),
    "http_port": ("--http-port", "port of the HTTP gateway: REST + Server-Sent Events, IB-Stream's v2 URLs (default "
                                 "IBSTREAM_HTTP_PORT or off; 0: any free port)"),
    "monitoring_port": ("--monitoring-port", "HTTP port of /metrics (Prometheus) and /health (default "
                                             "IBSTREAM_MONITORING_PORT or off; 0: any free port)"),
    "archive_url": ("--archive-url", "object store the archive is published to, e.g. s3://bucket/ibstream "
                                     "(default IBSTREAM_ARCHIVE_URL or none: local only)"),
}
LEGACY_PORT = {"demo": "flight_port", "serve": "flight_port", "record": "ib_port", "simulate": "ib_port"}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ibstream")
    except PackageNotFoundError:
        return "unknown"


OTHER_VARIABLES = {"IBSTREAM_FAILPOINT", "IBSTREAM_IO_FAULT", "IBSTREAM_TOKEN", "IBSTREAM_TLS_ROOT_CERTS"}


def _settings(args: argparse.Namespace, **extra):
    """Settings from the environment, with the vocabulary options given on the command line; an
    ``IBSTREAM_*`` variable that names no setting is refused (a misspelling would go unnoticed)."""
    import difflib
    import os

    from ibstream.core.errors import InvalidConfigError
    from ibstream.settings import Settings

    known = {f"IBSTREAM_{name.upper()}" for name in Settings.model_fields} | OTHER_VARIABLES
    for variable in sorted(v for v in os.environ if v.upper().startswith("IBSTREAM_") and v.upper() not in known):
        near = difflib.get_close_matches(variable.upper(), sorted(known), n=1)
        raise InvalidConfigError(f"{variable} is not a setting" + (f"; did you mean {near[0]}?" if near else
                                 "; see ibstream/settings.py for the IBSTREAM_* settings"))
    given = {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}
    return Settings(**(given | extra))


def _problems(errors: list) -> str:
    """pydantic's errors as the variables they came from, e.g. ``IBSTREAM_CONTRACTS[0].tick_types[0]: ...``
    (an error about a whole list is left out when one about its item says more)."""
    locs = [tuple(e["loc"]) for e in errors]
    lines = []
    for error, loc in zip(errors, locs):
        if any(other != loc and other[:len(loc)] == loc for other in locs):
            continue
        message = error["msg"].removeprefix("Value error, ")
        if "timedelta" in message:
            message += "; durations are ISO-8601, e.g. PT5M, PT30S, P1D"
        if not loc:  # about several settings together
            lines.append(message)
            continue
        head, *rest = loc
        where = f"IBSTREAM_{str(head).upper()}" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
        value = str(error.get("input"))
        lines.append(f"{where}: {message} (got {value if len(value) <= 80 else value[:80] + '...'!r})")
    return "; ".join(lines)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # gRPC's own log lines; our messages say what failed
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from ibstream.core.errors import IbstreamError

    try:
        return _run(args)
    except IbstreamError as exc:
        print(f"ibstream {args.command}: {exc}", file=sys.stderr)
    except ValidationError as exc:  # a setting from the environment or a flag
        print(f"ibstream {args.command}: bad setting: {_problems(exc.errors())}", file=sys.stderr)
    except SettingsError as exc:  # e.g. IBSTREAM_CONTRACTS that is not JSON
        field = str(exc).split('"')[1] if str(exc).count('"') >= 2 else "?"
        cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
        print(f"ibstream {args.command}: bad setting: IBSTREAM_{field.upper()} is not valid JSON{cause}",
              file=sys.stderr)
    except OSError as exc:  # the data root or a file cannot be created, read or written
        where = f" {exc.filename}" if exc.filename else ""
        print(f"ibstream {args.command}: {exc.strerror or exc}{':' if where else ''}{where}; check the path "
              "(--data-root / IBSTREAM_DATA_ROOT) and its permissions", file=sys.stderr)
    return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "demo":
        from ibstream.demo import run_demo

        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        return 0 if run_demo(args.seconds, args.data_root, args.flight_port or 0) else 1
    if args.command == "record":
        return _record(args, _settings(args))
    if args.command == "simulate":
        return _simulate(args, _settings(args))
    if args.command in ("verify", "reindex", "backup"):
        return _maintain(args, _settings(args))
    if args.command == "token":
        return _token(args)
    if args.command == "status":
        return _status(_settings(args))
    if args.command == "prune":
        return _prune(args, _settings(args))
    if args.command == "compact":
        return _compact(args, _settings(args))
    if args.command == "publish":
        return _publish(_settings(args))
    if args.command == "export":
        return _export(args, _settings(args))
    if args.command == "import":
        return _import(args, _settings(args))
    if args.command == "backfill":
        return _backfill(args, _settings(args))
    settings = _settings(args, **({"replica": True} if args.replica else {}))
    from ibstream.flight_server.server import FlightServer
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    if not settings.replica:
        require_store(settings)  # a mistyped --data-root must not serve (and create) an empty store

    from ibstream.http_gateway import http_gateway_for
    from ibstream.monitoring import monitoring_for

    with Store(settings, read_only=True) as store:
        monitoring = monitoring_for(settings, store)  # /metrics, /health; a port in use: one line, exit 2
        try:
            server = FlightServer(store, settings.flight_location, settings=settings)
        except BaseException:
            if monitoring is not None:
                monitoring.stop()
            raise
        try:
            http = http_gateway_for(settings, server.queries)  # REST + SSE over the same queries and limits
        except BaseException:
            server.shutdown()
            if monitoring is not None:
                monitoring.stop()
            raise
        if monitoring is not None:
            monitoring.monitor.watch_server(server)
        logging.info("serving %s at %s%s", settings.data_root, settings.flight_location.rsplit(":", 1)[0] +
                     f":{server.port}", f", HTTP gateway at {http.url}" if http is not None else "")
        try:
            if monitoring is not None:
                monitoring.start()
            if http is not None:
                http.start()
            server.serve()
        except KeyboardInterrupt:
            server.shutdown()
        finally:
            if http is not None:
                http.stop()
            if monitoring is not None:
                monitoring.stop()
    return 0


def _age(micros: int) -> str:
    seconds = micros / 1e6
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"



def _status(settings) -> int:
    from ibstream.core.times import iso, now_us
    from ibstream.storage.maintenance import status
    from ibstream.storage.object_store import redacted_url

    now = now_us()
    store = status(settings, now)
    print(f"{settings.data_root}: {len(store.streams)} streams, {sum(s.ticks for s in store.streams):,} ticks; "
          f"buffer {byte_text(store.buffer_bytes)}, archive {byte_text(store.archive_bytes)}, "
          f"{byte_text(store.free_bytes)} free")
    if settings.archive_url:
        print("  published: nothing yet" if store.publication is None else
              f"  published: index {store.publication[0]} to {redacted_url(settings.archive_url)} "
              f"{_age(now - store.publication[1])} ago; {store.publication[2]} archive files not uploaded yet")
    for s in store.streams:
        last = "no ticks" if s.last_us is None else f"last tick {iso(s.last_us)} ({_age(now - s.last_us)} ago)"
        archived = ("nothing archived" if s.archived_until_us is None else
                    f"archived to {iso(s.archived_until_us)[:16]}Z ({s.buffered_ticks:,} ticks buffered)")
        kept = "kept for ever" if s.ticks_days is None else f"ticks kept {s.ticks_days} days"
        if s.expired_until_us is not None:
            kept += f", expired before {iso(s.expired_until_us)[:16]}Z"
        gaps = ", ".join(f"{iso(a)[11:16]}-{'now' if b is None else iso(b)[11:16]} {reason}"
                         for a, b, reason in s.gaps_today[-3:])
        print(f"  {s.key}: {'recording' if s.recording else 'not recording'}; {last}; {s.ticks:,} ticks; {archived}; "
              f"{kept}; gaps today: {len(s.gaps_today)}{' (' + gaps + ')' if gaps else ''}")
    return 0


def _prune(args: argparse.Namespace, settings) -> int:
    from ibstream.core.times import US_PER_HOUR, iso
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    require_store(settings)
    if not settings.retention:
        print(f"no retention is set (IBSTREAM_RETENTION): {settings.data_root} keeps every tick")
        return 0
    with Store(settings, read_only=not args.apply) as store:
        report = store.prune(apply=args.apply)
    verb = "expired" if args.apply else "would expire"
    by_stream: dict[str, list] = {}
    for entry in report.hours:
        by_stream.setdefault(f"{entry.contract_id}/{entry.tick_type}", []).append(entry)
    for name, hours in sorted(by_stream.items()):
        print(f"  {name}: {len(hours)} hours {iso(hours[0].hour_start_us)[:16]}Z .. "
              f"{iso(hours[-1].hour_start_us + US_PER_HOUR)[:16]}Z, {sum(h.tick_count for h in hours):,} ticks, "
              f"{byte_text(sum(h.file_size_bytes for h in hours))}")
    print(f"{verb} {len(report.hours)} hours ({report.ticks:,} ticks, {byte_text(report.bytes)}); "
          + (f"deleted {report.files_removed} files of hours expired earlier" if args.apply else
             "run with --apply to expire them"))
    return 0


def _compact(args: argparse.Namespace, settings) -> int:
    from ibstream.core.times import iso
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    require_store(settings)
    with Store(settings, read_only=not args.apply) as store:
        report = store.compact(apply=args.apply, progress=_progress("day") if args.apply else None)
    for day in report.days:
        print(f"  {day.key.contract_id}/{day.key.tick_type.value} {iso(day.day_start_us)[:10]}: {day.files} files, "
              f"{day.ticks:,} ticks")
    for problem in report.failed:
        print(f"  not compacted: {problem}")
    if args.apply:
        print(f"compacted {report.files_written} days ({report.files_before:,} hourly files, {report.ticks:,} ticks) "
              f"into {report.files_written} files; deleted {report.files_removed} files replaced earlier "
              f"({byte_text(report.bytes_removed)})")
    else:
        print(f"would compact {len(report.days)} days ({report.files_before:,} files, {report.ticks:,} ticks) into "
              f"{len(report.days)} files; run with --apply to compact them")
    return 1 if report.failed else 0


def _publish(settings) -> int:
    from ibstream.core.errors import InvalidConfigError
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    if settings.archive_url is None:
        raise InvalidConfigError("no object store to publish to: pass --archive-url (or set IBSTREAM_ARCHIVE_URL), "
                                 "e.g. s3://bucket/ibstream")
    require_store(settings)
    with Store(settings) as store:
        report = store.publish()
    print(report.describe())
    return 0


def _token(args: argparse.Namespace) -> int:
    import json
    import os

    from ibstream.flight_server.auth import check_entry, new_token, read_token_file, token_digest, token_line

    secret = new_token()
    entry = check_entry(args.name, args.role, token_digest(secret), where="--name/--role")
    if args.token_file is not None:
        if args.token_file.exists() and any(e.name == entry.name for e in read_token_file(args.token_file)):
            from ibstream.core.errors import InvalidConfigError

            raise InvalidConfigError(f"{args.token_file} already has a token named {entry.name!r}; remove its line "
                                     "first or pick another --name")
        descriptor = os.open(args.token_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(descriptor, "a") as handle:
            handle.write(token_line(entry.name, entry.role, secret) + "\n")
        print(f"added {entry.name!r} ({entry.role}) to {args.token_file}; the client's token (shown once):",
              file=sys.stderr)
    else:
        spec = json.dumps({"name": entry.name, "role": entry.role, "sha256": entry.sha256})
        print(f"for the server: IBSTREAM_TOKENS='[{spec}]' (or a token file line: "
              f"{token_line(entry.name, entry.role, secret)}); the client's token (shown once):", file=sys.stderr)
    print(secret)
    return 0


def _progress(unit: str, show: bool | None = None):
    """The progress callback the storage tools take, ``(items, description, total) -> items``: a tqdm
    bar on stderr, shown when stderr is a terminal (``show`` None) or as ``show`` says. It counts
    items ('file'), or the rows of each item (``unit='row'``: export's record batches)."""
    from tqdm import tqdm

    def progress(items, description, total):
        with tqdm(desc=description, total=total, unit=unit, unit_scale=unit == "row", leave=False,
                  disable=None if show is None else not show) as bar:
            for item in items:
                yield item
                bar.update(len(item) if unit == "row" else 1)

    return progress


def _maintain(args: argparse.Namespace, settings) -> int:
    from ibstream.core.times import iso
    from ibstream.storage import maintenance

    progress = _progress("file")
    if args.command == "verify":
        report = maintenance.verify(settings, progress)
        print(f"verified {report.files:,} archive files ({report.ticks:,} ticks) and every buffer segment in "
              f"{settings.data_root}")
    elif args.command == "reindex":
        report = maintenance.reindex(settings, progress)
        print(f"rebuilt {settings.index_path}: {report.files:,} archive files, {report.ticks:,} ticks")
    else:
        report = maintenance.backup(settings, args.destination, progress)
        print(f"backed up {settings.data_root} to {args.destination}: {report.files:,} files, "
              f"{report.ticks:,} archived ticks")
    for problem in report.problems:
        print(f"  problem: {problem}")
    for damage in report.damage:
        print(f"  damaged: {damage.contract_id} {damage.tick_type} {iso(damage.start_us)} .. {iso(damage.end_us)}: "
              f"{damage.reason} ({damage.file} -> {damage.quarantined or 'gone'})")
    if report.damage:
        print(f"  quarantined files are in {settings.data_root / 'quarantine'}, each with a .note.json")
    return 0 if report.ok or args.command == "reindex" else 1


def _export(args: argparse.Namespace, settings) -> int:
    from ibstream.core.errors import InvalidRequestError, NotFoundError
    from ibstream.core.times import iso, now_us
    from ibstream.storage.export import export
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    require_store(settings)
    end = now_us() if args.end is None else args.end
    if args.start >= end:
        raise InvalidRequestError(f"--start {iso(args.start)} is not before --end {iso(end)}; give a start before the "
                                  "end (the range is [start, end))")
    with Store(settings, read_only=True) as store:
        stored: dict[int, list[str]] = {}
        for info in store.streams():
            stored.setdefault(info.contract_id, []).append(info.tick_type.value)
        listing = "; ".join(f"{cid}: {' '.join(types)}" for cid, types in sorted(stored.items())) or "none"
        streams = []
        for contract_id in args.contract_ids or sorted(stored):
            if contract_id not in stored:
                raise NotFoundError(f"contract {contract_id} has no ticks in {settings.data_root} (stored: {listing}); "
                                    "check --contract-id and --data-root")
            for tick_type in args.tick_types or stored[contract_id]:
                if tick_type not in stored[contract_id]:
                    raise NotFoundError(f"no {tick_type} ticks of contract {contract_id} are stored (stored: "
                                        f"{listing}); leave out --tick-type to export each stored one")
                streams.append((contract_id, tick_type))
        if not streams:
            raise NotFoundError(f"{settings.data_root} holds no ticks to export")
        report = export(store, args.destination, list(dict.fromkeys(streams)), args.start, end, args.format,
                        _progress("row", args.progress))
    for f in report.files:
        span = "no ticks" if f.first_us is None or f.last_us is None else f"{iso(f.first_us)} .. {iso(f.last_us)}"
        print(f"{f.path}: {f.contract_id}/{f.tick_type}, {f.rows:,} rows ({span}), {byte_text(f.bytes)}")
    files = f"{len(report.files)} file{'s' if len(report.files) != 1 else ''}"
    print(f"{report.manifest}: {files}, {report.rows:,} rows of [{iso(args.start)}, {iso(end)})")
    return 0


def _import(args: argparse.Namespace, settings) -> int:
    import tempfile

    from ibstream.core.errors import StorageError
    from ibstream.storage.ib_stream_import import import_ib_stream, scan_root
    from ibstream.storage.store import Store

    scan_root(args.path)  # a PATH that is no IB-Stream root: one line, before a store is made
    empty = None
    if args.dry_run and not settings.index_path.exists():  # nothing stored yet: compare with an empty store
        empty = tempfile.TemporaryDirectory(prefix="ibstream-import-")
        settings = settings.model_copy(update={"data_root": Path(empty.name)})
    try:
        store = Store(settings, read_only=args.dry_run and empty is None)
    except StorageError as exc:
        if "already open for writing" not in str(exc):
            raise
        raise StorageError(f"{str(exc).split(';')[0]}: stop the recorder, import, then start it again (`ibstream "
                           "import --dry-run` runs beside it)") from None
    with store:
        report = import_ib_stream(store, args.path, contract_ids=args.contract_ids, dry_run=args.dry_run,
                                  progress=_progress("hour", args.progress))
    if empty is not None:
        empty.cleanup()
    for line in report.lines():
        print(line)
    return 0


def _backfill(args: argparse.Namespace, settings) -> int:
    from ibstream.core.errors import StorageError
    from ibstream.recorder.backfill import run_backfill

    try:
        report = run_backfill(settings, progress=_progress("gap", args.progress))
    except StorageError as exc:
        if "already open for writing" not in str(exc):
            raise
        raise StorageError(f"{str(exc).split(';')[0]}: that recorder backfills every "
                           f"{settings.backfill_interval.total_seconds() / 60:g} min "
                           "itself (IBSTREAM_BACKFILL_INTERVAL); to backfill now, stop it, run `ibstream backfill`, "
                           "then start it again") from None
    for gap in report.gaps:
        print(f"  {gap.describe()}")
    print(report.summary())
    return 0


def _record(args: argparse.Namespace, settings) -> int:
    from ibstream.app import RecordingService, run_for
    from ibstream.recorder.ib import IBFeed
    from ibstream.recorder.synthetic import SyntheticFeed
    from ibstream.storage.synthetic import AAPL, MNQ

    feed = SyntheticFeed([MNQ, AAPL]) if args.synthetic else IBFeed(settings)
    if not args.synthetic:
        logging.info("recording %s from %s:%d (client id %d)", ", ".join(
            f"{c.describe()} [{' '.join(c.tick_types)}]" for c in settings.contracts),
            settings.ib_host, settings.ib_port, settings.ib_client_id)
    with RecordingService(settings, feed) as service:
        run_for(service, args.seconds, report_every=10.0)
    return 0


def _simulate(args: argparse.Namespace, settings) -> int:
    import threading
    from datetime import datetime, timedelta, timezone

    from ibstream.core.times import from_us
    from ibstream.simulator.gateway import GatewaySimulator
    from ibstream.simulator.market import archive_tape

    tapes = None
    if args.replay is not None:
        end = from_us(args.end) if args.end is not None else datetime.now(timezone.utc)
        start = from_us(args.start) if args.start is not None else end - timedelta(hours=24)
        tapes = lambda contract, tick_type, n: archive_tape(  # noqa: E731
            args.replay, contract.con_id, tick_type, start, end, speed=args.speed)
    port = settings.ib_port
    try:
        gateway = GatewaySimulator(settings.ib_host, port, seed=args.seed, speed=args.speed, tapes=tapes,
                                   record_sent=False)
    except OSError as exc:
        logging.error("cannot listen on %s:%d (%s); is a gateway already running there? Try --port.",
                      settings.ib_host, port, exc)
        return 2
    with gateway:
        logging.info("gateway simulator on %s:%d: contracts %s; %s at %gx; Ctrl-C stops", gateway.host,
                     gateway.port, ", ".join(f"{c.symbol} (conId {c.con_id})" for c in gateway.contracts),
                     f"replaying {args.replay}" if tapes else "synthetic market", args.speed)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            logging.info("simulator stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
