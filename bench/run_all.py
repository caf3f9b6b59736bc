"""Run every benchmark in turn (append, buffer, storage, query, flight, http, bars, live, load, ingest, reconnect, import, object store) and print their figures."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_append  # noqa: E402
import bench_bars  # noqa: E402
import bench_buffer  # noqa: E402
import bench_flight  # noqa: E402
import bench_http  # noqa: E402
import bench_import  # noqa: E402
import bench_ingest  # noqa: E402
import bench_live  # noqa: E402
import bench_load  # noqa: E402
import bench_object_store  # noqa: E402
import bench_query  # noqa: E402
import bench_reconnect  # noqa: E402
import bench_storage  # noqa: E402
from common import parse_args  # noqa: E402

BENCHES = (bench_append, bench_buffer, bench_storage, bench_query, bench_flight, bench_http, bench_bars, bench_live, bench_load, bench_ingest,
           bench_reconnect, bench_import, bench_object_store)


def main(quick: bool = False) -> None:
    started = time.perf_counter()
    for bench in BENCHES:
        bench.main(quick)
    print(f"\nall benchmarks{' (--quick)' if quick else ''} ran in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
