"""The archive on an object store: reads through read servers, their aggregate Flight throughput, and
the published index at scale.

1. One MNQ day of bid_ask ticks (1.5M; --quick: 3 hours) is recorded, archived, compacted into a day
   file and published (``Store.publish``) to an S3-compatible server on loopback: moto (a Python S3
   emulator, run in its own process). The day is read (result cache off) from the recorder's local
   disk, from a fresh read server (``replica=True``: it downloads the day file, cold) and again from
   the same read server (cached). A plain GET of the same object (pyarrow's S3 client, which the read
   cache uses, and boto3) is the transfer baseline, so that the cold read splits into transfer, our
   download overhead (SHA-256, the local copy) and the read itself. moto on loopback has no network
   latency or bandwidth limit: the transfer share is a lower bound of a real store's.
2. 1, 2 and 4 read-server processes (``ibstream serve --replica``, each with its own cache folder,
   warmed so the day is cached, result cache off), each read by its own client thread doing
   full-day Flight do_gets at the same time; against 1 server read by 1, 2 and 4 clients.
3. The published index: bytes per stream-hour of each tick type (a real archived day file each),
   then a synthetic index of ~1M stream-hours (--quick: 100k) in ibstream's own index schema, put
   through the real publication path (snapshot, manifest, pointer) and installed by a read server,
   and the planning time of one stream's day, month and year on it.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import pyarrow.flight as flight  # noqa: E402
from common import DAY_START, DAY_START_US, QUICK_HOURS, append_batches, day_ticks, header, parse_args  # noqa: E402
from common import settings as store_settings  # noqa: E402

from ibstream.core.times import US_PER_HOUR, from_us  # noqa: E402
from ibstream.flight_server.commands import command  # noqa: E402
from ibstream.settings import Settings  # noqa: E402
from ibstream.storage import Store  # noqa: E402
from ibstream.storage.index import Index  # noqa: E402
from ibstream.storage.object_store import CHUNK, POINTER, ObjectStore  # noqa: E402
from ibstream.storage.synthetic import MNQ  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
US_PER_DAY = 24 * US_PER_HOUR
BUCKET = "ticks"
MOTO = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"{host}:{port}", flush=True)
sys.stdin.read()  # until the bench closes our stdin
server.stop()
"""


class MotoS3:
    """moto's S3 server in a subprocess on loopback (its own GIL), with a bucket."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", MOTO], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
        self.endpoint = self.process.stdout.readline().strip()
        if not self.endpoint:
            raise RuntimeError("moto's S3 server did not start (is moto[server] installed in this venv?)")
        self.client().create_bucket(Bucket=BUCKET)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=f"http://{self.endpoint}", region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def url(self, prefix: str) -> str:
        return f"s3://test:test@{BUCKET}/{prefix}?endpoint_override={self.endpoint}&scheme=http&region=us-east-1"

    def objects(self, prefix: str) -> dict[str, int]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return {item["Key"][len(prefix):]: item["Size"] for page in pages for item in page.get("Contents", [])}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(30)


def replica_settings(root: Path, url: str) -> Settings:
    return Settings(data_root=root, archive_url=url, replica=True, flight_port=0, cache_max_bytes=0,
                    warm_recent=timedelta(0))


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def median_of(function, repeat: int) -> tuple[float, object]:
    runs = [timed(function) for _ in range(repeat)]
    return statistics.median(s for s, _ in runs), runs[-1][1]


# -- 1. one day: local disk, object store cold and cached ------------------------------------------

def record_and_publish(s3: MotoS3, root: Path, hours: float) -> dict:
    ticks = day_ticks("bid_ask", hours=hours)
    config = store_settings(root, fsync="none", cache_max_bytes=0, retention_grace=timedelta(0),
                            archive_url=s3.url("day"))
    end_us = DAY_START_US + US_PER_DAY
    with Store(config) as store:
        append_batches(store, ticks, 50_000)
        store.archive(now=from_us(end_us + US_PER_HOUR))
        compacted = store.compact(from_us(end_us + 2 * US_PER_HOUR))
        store.compact(from_us(end_us + 3 * US_PER_HOUR))  # the replaced hourly files go
        seconds, report = timed(lambda: store.publish(now=from_us(end_us + 3 * US_PER_HOUR)))
        blobs = [b for (b,) in store.index._connection().execute("SELECT bars FROM hour_bars")]
    assert compacted.files_written == 1, compacted
    objects = s3.objects("day/")
    day_key = next(k for k in objects if k.startswith("archive/") and k.endswith(".parquet"))
    index_key = next(k for k in objects if k.startswith("index/index-"))
    return {"config": config, "ticks": ticks, "publish_s": seconds, "report": report, "objects": objects,
            "day_key": day_key, "day_bytes": objects[day_key], "index_bytes": objects[index_key],
            "index_key": index_key, "hours": len(blobs), "rows": ticks.num_rows, "url": config.archive_url,
            "bars": (sum(map(len, blobs)) / len(blobs), len(pa.compress(b"".join(blobs), "zstd", asbytes=True)) / len(blobs))}


def read_day(store: Store) -> pa.Table:
    return store.read(MNQ.contract_id, "bid_ask", DAY_START, DAY_START + timedelta(days=1))


def section_reads(s3: MotoS3, tmp: Path, day: dict, repeat: int) -> dict:
    rows, arrow_mb = day["ticks"].num_rows, day["ticks"].nbytes / 1e6
    local = Store(day["config"], read_only=True)
    read_day(local)  # the page cache holds the file, as on a recorder that just wrote it
    opens, colds, downloaded = [], [], 0
    for run in range(repeat):  # a fresh read server each time: cold
        open_s, replica = timed(lambda r=run: Store(replica_settings(tmp / f"reader-{r}", s3.url("day")),
                                                    read_only=True))
        cold_s, cold = timed(lambda: read_day(replica))
        assert cold.num_rows == rows and replica.replica.cache.misses == 1
        downloaded = replica.replica.cache.downloaded_bytes
        opens.append(open_s)
        colds.append(cold_s)
        if run < repeat - 1:
            replica.close()
    locals_, cached = [], []
    for _ in range(2 * repeat):  # local and cached alternately: the same noise on both
        seconds, table = timed(lambda: read_day(local))
        assert table.num_rows == rows
        locals_.append(seconds)
        seconds, table = timed(lambda: read_day(replica))
        assert table.num_rows == rows and replica.replica.cache.misses == 1
        cached.append(seconds)
    replica.close()
    local.close()
    local_s = statistics.median(locals_)
    objects = ObjectStore(day["url"])  # the read cache's own client (pyarrow S3, retries) and download path
    key = day["day_key"]

    def bare_get() -> int:
        size = 0
        with objects.fs.open_input_stream(objects.path(key), compression=None) as stream:
            while chunk := stream.read(CHUNK):  # as the download reads it
                size += len(chunk)
        return size

    def download() -> str:
        return objects.download(key, tmp / "download.parquet")

    client = s3.client()

    def boto_get() -> int:
        return len(client.get_object(Bucket=BUCKET, Key=f"day/{key}")["Body"].read())

    bare_get()
    get_s, size = median_of(bare_get, repeat)
    download_s, _ = median_of(download, repeat)
    boto_s, _ = median_of(boto_get, repeat)
    assert size == day["day_bytes"] == downloaded
    cold_s, cached_s, open_s = statistics.median(colds), statistics.median(cached), statistics.median(opens)
    file_mb = day["day_bytes"] / 1e6
    header(f"object store 1: read the day file, {rows:,} bid_ask ticks ({file_mb:.2f} MB = "
           f"{day['day_bytes'] / rows:.2f} B/tick; {arrow_mb:.0f} MB Arrow), result cache off; medians of {repeat} "
           f"cold reads (each on a fresh read server) and {2 * repeat} local and cached reads, alternately")
    print(f"published in {day['publish_s'] * 1e3:.0f} ms to moto: {day['report'].uploaded} file, "
          f"{day['report'].uploaded_bytes:,} B + index snapshot {day['index_bytes']:,} B (zstd; {day['hours']} "
          f"stream-hours) + manifest {day['objects']['manifest.parquet']:,} B + pointer {day['objects'][POINTER]} B")
    print(f"{'read from':<42} {'ms':>8} {'rows/s':>12} {'file MB/s':>10} {'Arrow MB/s':>11} {'vs local':>9}")
    for name, seconds in (("local disk (recorder's data root)", local_s),
                          ("object store, cold (fresh read server)", cold_s),
                          ("object store, cached (same read server)", cached_s)):
        print(f"{name:<42} {seconds * 1e3:>8.0f} {rows / seconds:>12,.0f} {file_mb / seconds:>10.1f} "
              f"{arrow_mb / seconds:>11.0f} {seconds / local_s:>8.2f}x")
    print(f"read server start (pointer + index download and install): {open_s * 1e3:.0f} ms, not in 'cold'")
    print(f"moto GET of the day object into memory: {get_s * 1e3:.0f} ms with pyarrow's S3 client, the read cache's "
          f"({file_mb / get_s:.0f} MB/s); {boto_s * 1e3:.0f} ms with boto3 ({file_mb / boto_s:.0f} MB/s)")
    print(f"the read cache's download (GET + SHA-256 + write the local copy): {download_s * 1e3:.0f} ms "
          f"({file_mb / download_s:.0f} MB/s)")
    print(f"cold {cold_s * 1e3:.0f} ms = transfer (GET) {get_s * 1e3:.0f} + hash and copy "
          f"{(download_s - get_s) * 1e3:.0f} + read as cached {cached_s * 1e3:.0f} + the rest {(cold_s - download_s - cached_s) * 1e3:.0f} "
          "(index lookup, open, noise)")
    print("moto is a Python emulator on loopback, in its own process: no network, no first-byte latency; its GET "
          "rate is not S3's (a remote GET adds tens to hundreds of ms before the first byte, and a network's bandwidth)")
    return {"local_ms": local_s * 1e3, "cold_ms": cold_s * 1e3, "cached_ms": cached_s * 1e3, "get_ms": get_s * 1e3,
            "download_ms": download_s * 1e3, "boto_get_ms": boto_s * 1e3, "open_ms": open_s * 1e3, "publish_ms": day["publish_s"] * 1e3,
            "day_bytes": day["day_bytes"], "index_bytes": day["index_bytes"], "rows": rows}


# -- 2. aggregate Flight throughput of 1, 2 and 4 read-server processes ----------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ReadServer:
    """``ibstream serve --replica`` in a subprocess, as an operator starts it."""

    def __init__(self, url: str, data_root: Path):
        self.port = free_port()
        self.location = f"grpc://127.0.0.1:{self.port}"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")}
        environment |= {"IBSTREAM_CACHE_MAX_BYTES": "0", "IBSTREAM_WARM_RECENT": "PT0S"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve", "--replica", "--archive-url", url,
             "--data-root", str(data_root), "--flight-port", str(self.port)], cwd=ROOT, env=environment)

    def wait(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the read server on port {self.port} exited with {self.process.returncode}")
            try:
                client = flight.connect(self.location)
                list(client.list_flights())
                client.close()
                return
            except flight.FlightError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def flight_day(client: flight.FlightClient, descriptor: flight.FlightDescriptor) -> int:
    info = client.get_flight_info(descriptor)
    return sum(client.do_get(endpoint.ticket).read_all().num_rows for endpoint in info.endpoints)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def concurrent_reads(locations: list[str], descriptor: flight.FlightDescriptor, reads: int) -> tuple[float, list]:
    """One client thread per location, each doing ``reads`` full-day reads; (wall seconds, per-client
    (seconds, rows))."""
    clients = [flight.connect(at) for at in locations]
    barrier = threading.Barrier(len(clients) + 1)
    results: list = [None] * len(clients)

    def work(i: int) -> None:
        barrier.wait()
        started, rows = time.perf_counter(), 0
        for _ in range(reads):
            rows += flight_day(clients[i], descriptor)
        results[i] = (time.perf_counter() - started, rows)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for client in clients:
        client.close()
    return wall, results


def section_servers(s3: MotoS3, tmp: Path, rows: int, hours: float, reads: int) -> dict:
    descriptor = flight.FlightDescriptor.for_command(command(MNQ.contract_id, "bid_ask", DAY_START,
                                                             DAY_START + timedelta(hours=hours)))
    servers = [ReadServer(s3.url("day"), tmp / f"server-{i}") for i in range(4)]
    try:
        for server in servers:
            server.wait()
        for server in servers:  # warm: each downloads the day file into its own cache
            client = flight.connect(server.location)
            assert flight_day(client, descriptor) == rows
            client.close()
        layouts = [("1 server, 1 client", [servers[0]]), ("2 servers, 1 client each", servers[:2]),
                   ("4 servers, 1 client each", servers),
                   ("1 server, 2 clients", [servers[0]] * 2), ("1 server, 4 clients", [servers[0]] * 4)]
        outcome = {}
        for name, chosen in layouts:
            before = [cpu_seconds(s.process.pid) for s in servers], time.process_time()
            wall, results = concurrent_reads([s.location for s in chosen], descriptor, reads)
            server_cpu = sum(cpu_seconds(s.process.pid) for s in servers) - sum(before[0])
            client_cpu = time.process_time() - before[1]
            assert all(r == rows * reads for _, r in results), results
            outcome[name] = (len(chosen), wall, results, server_cpu, client_cpu)
    finally:
        for server in servers:
            server.close()
    base = rows * reads / outcome["1 server, 1 client"][1]
    header(f"object store 2: full-day Flight do_get ({rows:,} ticks) from read-server processes (`ibstream serve "
           f"--replica`, day file cached, result cache off), {reads} reads per client, clients concurrent")
    print(f"{'layout':<26} {'wall s':>6} {'rows/s per client':>22} {'sum rows/s':>12} {'vs 1 server':>11} "
          f"{'server CPU s':>12} {'client CPU s':>12} {'cores busy':>10}")
    figures = {}
    for name, (clients, wall, results, server_cpu, client_cpu) in outcome.items():
        per = [r / s for s, r in results]
        total = rows * reads * clients / wall
        spread = f"{min(per):,.0f}-{max(per):,.0f}" if clients > 1 else f"{per[0]:,.0f}"
        print(f"{name:<26} {wall:>6.2f} {spread:>22} {total:>12,.0f} {total / base:>10.2f}x {server_cpu:>12.2f} "
              f"{client_cpu:>12.2f} {(server_cpu + client_cpu) / wall:>10.2f}")
        figures[name] = total
    print(f"this machine has {os.cpu_count()} cores, shared by the servers and the client threads: one server and "
          "one client already keep most of both busy, so more server processes add no CPU and the sum flattens (one "
          "server process is multithreaded: more clients on it do as well). On separate machines each server brings "
          "its own cores, disk and cache, and the sum grows with their number")
    return figures


# -- 3. the published index at scale ---------------------------------------------------------------

def index_bytes_per_hour(tmp: Path, hours: float) -> dict[str, tuple[float, float, int]]:
    """Per tick type: day-file B/tick, average hour_bars blob bytes and its zstd size (a real archived day)."""
    figures = {}
    for tick_type in ("last", "all_last", "mid_point"):
        root = tmp / f"types-{tick_type}"
        ticks = day_ticks(tick_type, hours=hours if tick_type == "mid_point" else 24)  # a full day of trades
        config = store_settings(root, fsync="none", cache_max_bytes=0, retention_grace=timedelta(0))
        end_us = DAY_START_US + US_PER_DAY
        with Store(config) as store:
            append_batches(store, ticks, 50_000)
            store.archive(now=from_us(end_us + US_PER_HOUR))
            store.compact(from_us(end_us + 2 * US_PER_HOUR))
            store.compact(from_us(end_us + 3 * US_PER_HOUR))
            blobs = [b for (b,) in store.index._connection().execute("SELECT bars FROM hour_bars")]
        size = sum(p.stat().st_size for p in config.archive_root.rglob("*.parquet"))
        packed = len(pa.compress(b"".join(blobs), "zstd", asbytes=True)) / len(blobs)
        figures[tick_type] = (size / ticks.num_rows, sum(map(len, blobs)) / len(blobs), packed, ticks.num_rows)
    return figures


def synthetic_index(path: Path, url: str, streams: int, days: int, hours_per_day: int) -> int:
    """tick_archives (day files, one row per stream-hour), published_files (one per day file) and
    data_statistics (one per stream-day) in ibstream's own schema; no hour_bars (see the caller)."""
    Index(path).close()  # ibstream's DDL
    rng = random.Random(7)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("BEGIN")
    conn.execute("DELETE FROM publication_target")
    conn.execute("INSERT INTO publication_target VALUES (?)", (ObjectStore(url).url,))
    types = ("bid_ask", "last", "all_last", "mid_point")
    rows = 0
    for s in range(streams):
        cid, tt = 700_000_000 + s // 4 * 7919, types[s % 4]
        archives, files, stats = [], [], []
        for d in range(days):
            day_us = DAY_START_US + d * US_PER_DAY
            date = f"{from_us(day_us):%Y-%m-%d}"
            relative = f"tick_type={tt}/contract_id={cid}/date={date}/hour=all/day-{day_us + US_PER_DAY}.parquet"
            groups = 0
            for h in range(hours_per_day):
                hour_us = day_us + h * US_PER_HOUR
                count = rng.randint(20_000, 90_000)
                archives.append((cid, tt, hour_us, hour_us + rng.randint(0, 9_999), hour_us + US_PER_HOUR -
                                 rng.randint(1, 9_999), relative, count, count * 5, count * 62, 12.4, groups, 2))
                groups += 2
            sha = hashlib.sha256(relative.encode()).hexdigest()
            files.append((relative, f"archive/{relative[:-8]}-{sha[:16]}.parquet", 4_000_000 + rng.randint(0, 10**6),
                          sha, 1_700_000_000_000_000_000 + d, day_us, 30_000, sha))  # a 30 KB bars sidecar
            stats.append((cid, tt, date, groups * 25_000, 2_000, None, None, 21_000.0, 20_800.0))
        conn.executemany("INSERT INTO tick_archives (contract_id, tick_type, hour_start_us, start_us, end_us, file_path, "
                         "tick_count, file_size_bytes, arrow_size_bytes, compression_ratio, row_group_start, "
                         "row_group_count) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", archives)
        conn.executemany("INSERT INTO published_files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", files)
        conn.executemany("INSERT INTO data_statistics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", stats)
        rows += len(archives)
    conn.execute("COMMIT")
    conn.execute("VACUUM")
    conn.close()
    return rows


def section_index(s3: MotoS3, tmp: Path, day: dict, quick: bool) -> dict:
    types = index_bytes_per_hour(tmp, 2 if quick else 6)  # mid_point hours (1.5M ticks a day)
    streams, days, hours_per_day = (16, 365, 23) if quick else (120, 365, 23)
    url = s3.url("scale")
    config = store_settings(tmp / "scale", fsync="none", archive_url=url)
    config.data_root.mkdir(parents=True)
    build_s, rows = timed(lambda: synthetic_index(config.index_path, url, streams, days, hours_per_day))
    raw = config.index_path.stat().st_size
    with Store(config) as store:
        publish_s, report = timed(lambda: store.publish(now=from_us(DAY_START_US + (days + 1) * US_PER_DAY)))
    objects = s3.objects("scale/")
    snapshot = next(size for key, size in objects.items() if key.startswith("index/index-"))
    install_s, replica = timed(lambda: Store(replica_settings(tmp / "scale-reader", url), read_only=True))
    installed = sum(p.stat().st_size for p in replica.settings.index_path.parent.glob("index.sqlite*"))
    plans = {}
    with replica:
        cid = 700_000_000 + (streams // 2) // 4 * 7919
        for label, span in (("1 day", 1), ("30 days", 30), ("365 days", 365)):
            start = DAY_START_US + (days - span) * US_PER_DAY
            seconds, plan = median_of(lambda s=start: replica.plan(cid, "bid_ask", s, DAY_START_US + days * US_PER_DAY),
                                      15)
            plans[label] = (seconds, len(plan.archives))
    header(f"object store 3: the published index: per stream-hour, and a synthetic index of {rows:,} stream-hours "
           f"({streams} streams x {days} days x {hours_per_day} h, day files)")
    print(f"{'tick type':<10} {'ticks':>10} {'day file B/tick':>16} {'hour_bars B/stream-hour':>24} {'zstd':>6}")
    print(f"{'bid_ask':<10} {day['rows']:>10,} {day['day_bytes'] / day['rows']:>16.2f} {day['bars'][0]:>24,.0f} "
          f"{day['bars'][1]:>6,.0f}")
    for tick_type, (per_tick, bars, packed, count) in types.items():
        print(f"{tick_type:<10} {count:>10,} {per_tick:>16.2f} {bars:>24,.0f} {packed:>6,.0f}")
    print(f"the day's published snapshot (section 1): {day['index_bytes']:,} B zstd for {day['hours']} stream-hours = "
          f"{day['index_bytes'] / day['hours']:,.0f} B/stream-hour (the hours' 1-minute bars travel beside each file, not in it)")
    print(f"synthetic index (tick_archives + published_files + data_statistics, no hour_bars): built in {build_s:.1f} s; "
          f"SQLite {raw / 2**20:.0f} MiB ({raw / rows:.0f} B/stream-hour)")
    print(f"publication through the real path (backup, trim, VACUUM, zstd, upload, manifest, pointer): "
          f"{publish_s:.1f} s; snapshot {snapshot / 2**20:.1f} MiB ({snapshot / rows:.1f} B/stream-hour), manifest "
          f"{objects['manifest.parquet'] / 2**20:.2f} MiB ({streams * days:,} day files)")
    print(f"a read server installs it (download, unpack, quick_check, backup into its index): {install_s:.1f} s "
          f"({installed / 2**20:.0f} MiB)")
    print(f"{'plan one bid_ask stream over':<30} {'median ms':>10} {'index rows':>11}")
    for label, (seconds, count) in plans.items():
        print(f"{label:<30} {seconds * 1e3:>10.2f} {count:>11,}")
    return {"rows": rows, "raw": raw, "snapshot": snapshot, "publish_s": publish_s, "install_s": install_s,
            "plans": plans, "types": types}


def main(quick: bool = False) -> dict:
    hours = QUICK_HOURS if quick else 24
    started = time.perf_counter()
    s3 = MotoS3()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-object-store-") as folder:
            tmp = Path(folder)
            day = record_and_publish(s3, tmp / "recorder", hours)
            reads = section_reads(s3, tmp, day, 3)
            servers = section_servers(s3, tmp, day["ticks"].num_rows, hours, 2 if quick else 3)
            index = section_index(s3, tmp, day, quick)
    finally:
        s3.close()
    print(f"object store bench ran in {time.perf_counter() - started:.0f} s")
    return {"reads": reads, "servers": servers, "index": index}


if __name__ == "__main__":
    main(parse_args(__doc__).quick)
