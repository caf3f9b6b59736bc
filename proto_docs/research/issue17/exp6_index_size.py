"""Size of a published SQLite index snapshot: tick_archives rows per (stream, hour), with ibstream's own DDL
(imported read-only from /work/main/storage/index.py). Snapshot via sqlite3 backup API, compressed with zstd."""
import sqlite3, os, sys, time, zstandard
sys.path.insert(0, "/work/main")
import importlib.util
spec = importlib.util.spec_from_file_location("idx", "/work/main/storage/index.py")
src = open("/work/main/storage/index.py").read()
ns = {}; exec(src[src.index("COVERAGE_DDL"):src.index("SCHEMA_VERSION")], ns)
def build(streams, days):
    p = f"/tmp/issue17/idx_{streams}_{days}.sqlite"; os.path.exists(p) and os.remove(p)
    c = sqlite3.connect(p); c.executescript(ns["SCHEMA"])
    H = 3600 * 10**6; d0 = 1736467200 * 10**6; rows = []
    for s in range(streams):
        cid, tt = 700000000 + s // 3, ("bid_ask", "last", "mid_point")[s % 3]
        for d in range(days):
            for h in range(24):
                hs = d0 + (d * 24 + h) * H
                path = f"tick_type={tt}/contract_id={cid}/date=2025-01-{10+d%20:02d}/hour=all/day-{hs}.parquet"
                rows.append((cid, tt, hs, hs + 17, hs + H - 3, path, 50000, 400000, 2000000, 5.0, h * 2, 2))
    c.executemany("""insert into tick_archives(contract_id,tick_type,hour_start_us,start_us,end_us,file_path,tick_count,
        file_size_bytes,arrow_size_bytes,compression_ratio,row_group_start,row_group_count) values (?,?,?,?,?,?,?,?,?,?,?,?)""", rows)
    c.commit(); c.execute("vacuum"); c.close()
    raw = open(p, "rb").read(); t0 = time.time(); z = zstandard.ZstdCompressor(level=3).compress(raw); zt = time.time() - t0
    n = len(rows); print(f"streams={streams:4d} days={days:4d} rows={n:9,d}  sqlite={len(raw)/2**20:8.1f} MiB ({len(raw)/n:.0f} B/row)  zstd={len(z)/2**20:7.1f} MiB  compress {zt:.2f}s")
for streams, days in ((30, 30), (30, 365), (300, 30), (300, 365)): build(streams, days)
