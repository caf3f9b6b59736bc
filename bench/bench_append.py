"""Segment append throughput: Store.append with batches of 1k / 10k / 100k bid_ask ticks.

Each configuration appends the same synthetic ticks to a fresh store in a temp folder, at the
default durability policy (fsync="batch": every batch is fsync'ed before it is acknowledged)
and at fsync="none" for comparison. Target: >= 1,000,000 ticks/s batched (fsync="batch").
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import day_ticks, header, parse_args, settings, target  # noqa: E402

from ibstream.storage import Store  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402

BATCHES = (1_000, 10_000, 100_000)
REPEATS = 3  # each figure is the median of this many runs


def run(table, batch_rows: int, fsync: str) -> tuple[float, int]:
    """Seconds to append ``table`` in batches, and the number of segment files written."""
    with tempfile.TemporaryDirectory(prefix="bench-append-") as tmp:
        store = Store(settings(Path(tmp), fsync=fsync))
        try:
            batches = table.combine_chunks().to_batches(max_chunksize=batch_rows)
            started = time.perf_counter()
            for batch in batches:
                store.append(MNQ.contract_id, "bid_ask", batch)
            seconds = time.perf_counter() - started
        finally:
            store.close()
        segments = len(list(store.settings.buffer_root.rglob("*.arrows")))
    return seconds, segments


def main(quick: bool = False) -> dict:
    hours = 4 if quick else 16  # 250k / 1M ticks; 15 min segments rotate 16 / 64 times
    table = day_ticks("bid_ask", hours=hours)
    header(f"append: {table.num_rows:,} bid_ask ticks over {hours} h per run ({table.nbytes / table.num_rows:.0f} Arrow bytes/tick), median of {REPEATS} runs")
    print(f"{'fsync':<6} {'batch':>8} {'batches':>8} {'segments':>9} {'seconds':>8} {'ticks/s':>12} {'us/batch':>9} {'MB/s':>7}")
    results = {}
    for fsync in ("batch", "none"):
        for batch_rows in BATCHES:
            run(table.slice(0, 2 * batch_rows), batch_rows, fsync)  # warm up (imports, first segment)
            runs = [run(table, batch_rows, fsync) for _ in range(REPEATS)]
            seconds, segments = statistics.median(r[0] for r in runs), runs[0][1]
            count = -(-table.num_rows // batch_rows)
            rate = table.num_rows / seconds
            results[(fsync, batch_rows)] = rate
            print(f"{fsync:<6} {batch_rows:>8,} {count:>8,} {segments:>9} {seconds:>8.3f} {rate:>12,.0f} "
                  f"{seconds / count * 1e6:>9.0f} {table.nbytes / seconds / 1e6:>7.0f}")
    for batch_rows in BATCHES:
        print(f"fsync none/batch speed-up at {batch_rows:,}: {results[('none', batch_rows)] / results[('batch', batch_rows)]:.2f}x")
    best = max(results[("batch", b)] for b in BATCHES if b >= 10_000)
    target(f">= 1,000,000 ticks/s batched (fsync=batch, best of 10k/100k: {best:,.0f})", best >= 1_000_000)
    return results


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
