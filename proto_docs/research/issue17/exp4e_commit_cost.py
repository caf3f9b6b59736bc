"""Cost of one Iceberg commit per sealed hour: time, metadata.json growth, files written (local SqlCatalog)."""
import os, glob, shutil, time, pyarrow.fs as pafs
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.types import NestedField, TimestamptzType, DoubleType, DecimalType, BooleanType
from pyiceberg.partitioning import PartitionSpec, PartitionField
from pyiceberg.transforms import DayTransform
import common
root = "/tmp/issue17/ice_commit"; shutil.rmtree(root, ignore_errors=True); os.makedirs(root + "/files")
cat = SqlCatalog("c", uri=f"sqlite:///{root}/cat.sqlite", warehouse=f"file://{root}/wh"); cat.create_namespace("t")
cols = [NestedField(1, "ts", TimestamptzType(), True), NestedField(2, "ib_time", TimestamptzType(), True), NestedField(3, "bid_price", DoubleType(), True),
        NestedField(4, "ask_price", DoubleType(), True), NestedField(5, "bid_size", DecimalType(18, 8), True), NestedField(6, "ask_size", DecimalType(18, 8), True),
        NestedField(7, "bid_past_low", BooleanType(), True), NestedField(8, "ask_past_high", BooleanType(), True)]
tbl = cat.create_table("t.bid_ask", Schema(*cols), partition_spec=PartitionSpec(PartitionField(1, 1000, DayTransform(), "d")))
N = 150; paths = []
for i in range(N):
    p = f"{root}/files/h{i}.parquet"; common.write_hour(p, common.hour_table(common.H0 + i * common.HOUR_US, 200)); paths.append(p)
times = []
for i, p in enumerate(paths):
    t0 = time.time(); tbl.add_files([p]); times.append(time.time() - t0)
    if i + 1 in (1, 50, 150):
        meta = sorted(glob.glob(f"{root}/wh/t/bid_ask/metadata/*.metadata.json"))[-1]
        print(f"commit {i+1}: {times[-1]*1000:.0f} ms, metadata.json {os.path.getsize(meta)/1024:.0f} KiB, metadata files {len(os.listdir(f'{root}/wh/t/bid_ask/metadata'))}")
t0 = time.time(); n = tbl.scan().to_arrow().num_rows; print(f"scan all {n} rows over {N} manifests: {time.time()-t0:.2f}s")
print("expire_snapshots API:", [m for m in dir(tbl.maintenance.expire_snapshots()) if not m.startswith("_")])

t0 = time.time(); tbl2 = cat.load_table("t.bid_ask"); print(f"batched: add_files(50 files) in one commit:", end=" ")
ps = []
for i in range(50):
    p = f"{root}/files/b{i}.parquet"; common.write_hour(p, common.hour_table(common.H0 + (200 + i) * common.HOUR_US, 200)); ps.append(p)
t0 = time.time(); tbl2.add_files(ps); print(f"{(time.time()-t0)*1000:.0f} ms")
