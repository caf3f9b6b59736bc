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
  ibstream demo                      # synthetic feed -> store -> Flight -> client, in one process
  ibstream record --synthetic        # record a synthetic MNQ feed and serve it until Ctrl-C
  ibstream serve --data-root data    # serve an existing store (read-only) over Flight
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ibstream", description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the whole chain on a synthetic feed (no IB account)")
    demo.add_argument("--seconds", type=float, default=8.0, help="how long the live feed runs (default 8)")
    demo.add_argument("--data-root", type=Path, help="store folder (default: a new temp folder)")
    demo.add_argument("--port", type=int, default=0, help="Flight port (default: any free port)")

    record = commands.add_parser("record", help="record a feed, archive hourly, serve over Flight")
    record.add_argument("--synthetic", action="store_true", required=True,
                        help="use the built-in synthetic MNQ/AAPL feed (the IB feed arrives with the recorder issue)")
    record.add_argument("--seconds", type=float, default=0, help="stop after this long (default: until Ctrl-C)")

    serve = commands.add_parser("serve", help="serve an existing store over Flight (read-only)")
    serve.add_argument("--data-root", type=Path, help="store folder (default IBSTREAM_DATA_ROOT or ./data)")
    serve.add_argument("--port", type=int, help="Flight port (default IBSTREAM_FLIGHT_PORT or 8815)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "demo":
        from ibstream.demo import run_demo

        logging.getLogger().setLevel(max(logging.WARNING, logging.getLogger().level))
        return 0 if run_demo(args.seconds, args.data_root, args.port) else 1
    from ibstream.settings import Settings

    if args.command == "record":
        from ibstream.app import RecordingService, run_for
        from recorder.synthetic import AAPL, MNQ, SyntheticFeed

        with RecordingService(Settings(), SyntheticFeed([MNQ, AAPL])) as service:
            try:
                run_for(service, args.seconds, report_every=10.0)
            except KeyboardInterrupt:
                logging.info("stopping: flushing acknowledged ticks")
        return 0
    overrides = {k: v for k, v in (("data_root", args.data_root), ("flight_port", args.port)) if v is not None}
    settings = Settings(**overrides)
    from flight_server.server import FlightServer
    from storage.store import Store

    with Store(settings, read_only=True) as store:
        server = FlightServer(store, settings.flight_location)
        logging.info("serving %s at grpc://%s:%d", settings.data_root, settings.flight_host, server.port)
        try:
            server.serve()
        except KeyboardInterrupt:
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
