"""``ibstream``: record ticks, serve them over Arrow Flight, try it all with ``ibstream demo``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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

Try the whole chain without IB: `ibstream simulate` in one terminal, `ibstream record` in another.
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _log_level(value: str) -> str:
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"log level was {value[:40]!r}; use one of {', '.join(LOG_LEVELS)}")
    return value.upper()


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ibstream", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", type=_log_level,
                        help="logging level (default INFO); also after the verb")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def verb(name: str, *options: str, **kwargs) -> argparse.ArgumentParser:
        """A verb with the shared vocabulary: each option means the same in every verb that takes it."""
        sub = commands.add_parser(name, **kwargs)
        sub.add_argument("--log-level", default=argparse.SUPPRESS, type=_log_level, help="logging level (default INFO)")
        for option in options:
            flag, help_text = OPTIONS[option]
            sub.add_argument(flag, type=int if option.endswith("port") else Path, dest=option, help=help_text)
            if option in ("flight_port", "ib_port") and name in LEGACY_PORT:  # `--port` before the vocabulary
                if LEGACY_PORT[name] == option:
                    sub.add_argument("--port", type=int, dest=option, help=argparse.SUPPRESS)
        return sub

    demo = verb("demo", "data_root", "flight_port", help="run the whole chain on a synthetic feed (no IB account)")
    demo.add_argument("--seconds", type=float, default=8.0, help="how long the live feed runs (default 8)")

    record = verb(
        "record", "data_root", "flight_port", "ib_port",
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
    simulate.add_argument("--speed", type=float, default=1.0, help="market speed vs realistic rates (default 1)")
    simulate.add_argument("--seed", type=int, default=0, help="seed of the synthetic market (default 0)")
    simulate.add_argument("--replay", type=Path, metavar="DATA_ROOT",
                          help="replay ticks from this store instead of the synthetic market")
    simulate.add_argument("--start", help="replay from this ISO time (with --replay; default: 24 h ago)")
    simulate.add_argument("--end", help="replay until this ISO time (with --replay; default: now)")

    verb("serve", "data_root", "flight_port", help="serve an existing store over Flight (read-only)")

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
    return parser


OPTIONS = {  # one meaning per option, in every verb
    "data_root": ("--data-root", "store folder (default IBSTREAM_DATA_ROOT or ./data; demo: a new temp folder)"),
    "flight_port": ("--flight-port", "Flight server port (default IBSTREAM_FLIGHT_PORT or 8815; 0: any free port; "
                                     "demo: any free port)"),
    "ib_port": ("--ib-port", "IB API port of TWS / Gateway, or of the simulator (default IBSTREAM_IB_PORT or 4002)"),
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
    settings = _settings(args)
    from ibstream.flight_server.server import FlightServer
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    require_store(settings)  # a mistyped --data-root must not serve (and create) an empty store

    with Store(settings, read_only=True) as store:
        server = FlightServer(store, settings.flight_location, settings=settings)
        logging.info("serving %s at %s", settings.data_root, settings.flight_location.rsplit(":", 1)[0] +
                     f":{server.port}")
        try:
            server.serve()
        except KeyboardInterrupt:
            server.shutdown()
    return 0


def _age(micros: int) -> str:
    seconds = micros / 1e6
    for unit, size in (("d", 86_400), ("h", 3_600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _megabytes(n: int) -> str:
    return f"{n / 2**30:,.1f} GB" if n >= 2**30 else f"{n / 2**20:,.1f} MB"


def _status(settings) -> int:
    from ibstream.core.times import iso, now_us
    from ibstream.storage.maintenance import status

    now = now_us()
    store = status(settings, now)
    print(f"{settings.data_root}: {len(store.streams)} streams, {sum(s.ticks for s in store.streams):,} ticks; "
          f"buffer {_megabytes(store.buffer_bytes)}, archive {_megabytes(store.archive_bytes)}, "
          f"{_megabytes(store.free_bytes)} free")
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
              f"{_megabytes(sum(h.file_size_bytes for h in hours))}")
    print(f"{verb} {len(report.hours)} hours ({report.ticks:,} ticks, {_megabytes(report.bytes)}); "
          + (f"deleted {report.files_removed} files of hours expired earlier" if args.apply else
             "run with --apply to expire them"))
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


def _maintain(args: argparse.Namespace, settings) -> int:
    from tqdm import tqdm

    from ibstream.core.times import iso
    from ibstream.storage import maintenance

    def progress(items, description, total):
        return tqdm(items, desc=description, total=total, unit="file", disable=None, leave=False)

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

    from ibstream.simulator.gateway import GatewaySimulator
    from ibstream.simulator.market import archive_tape

    tapes = None
    if args.replay is not None:
        end = datetime.fromisoformat(args.end) if args.end else datetime.now(timezone.utc)
        start = datetime.fromisoformat(args.start) if args.start else end - timedelta(hours=24)
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
