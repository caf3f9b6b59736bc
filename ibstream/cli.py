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

Try the whole chain without IB: `ibstream simulate` in one terminal, `ibstream record` in another.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibstream", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO); also after the verb")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    def verb(name: str, *options: str, **kwargs) -> argparse.ArgumentParser:
        """A verb with the shared vocabulary: each option means the same in every verb that takes it."""
        sub = commands.add_parser(name, **kwargs)
        sub.add_argument("--log-level", default=argparse.SUPPRESS, help="logging level (default INFO)")
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


def _settings(args: argparse.Namespace, **extra):
    """Settings from the environment, with the vocabulary options given on the command line."""
    from ibstream.settings import Settings

    given = {name: getattr(args, name) for name in OPTIONS if getattr(args, name, None) is not None}
    return Settings(**(given | extra))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pydantic import ValidationError

    from ibstream.core.errors import IbstreamError

    try:
        return _run(args)
    except IbstreamError as exc:
        print(f"ibstream {args.command}: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:  # a setting from the environment or a flag
        problems = "; ".join(f"IBSTREAM_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']} (got {str(e.get('input'))[:80]!r})"
                             for e in exc.errors())
        print(f"ibstream {args.command}: bad setting: {problems}", file=sys.stderr)
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
    settings = _settings(args)
    from ibstream.flight_server.server import FlightServer
    from ibstream.storage.maintenance import require_store
    from ibstream.storage.store import Store

    require_store(settings)  # a mistyped --data-root must not serve (and create) an empty store

    with Store(settings, read_only=True) as store:
        server = FlightServer(store, settings.flight_location)
        logging.info("serving %s at grpc://%s:%d", settings.data_root, settings.flight_host, server.port)
        try:
            server.serve()
        except KeyboardInterrupt:
            server.shutdown()
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
