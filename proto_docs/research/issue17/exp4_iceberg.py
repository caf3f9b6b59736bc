"""pyiceberg SqlCatalog (SQLite) + add_files of ibstream-format Parquet files, local or on moto S3.
usage: exp4_iceberg.py local|s3"""
import os, sys, shutil, datetime, decimal
import pyarrow as pa, pyarrow.parquet as pq, pyarrow.fs as pafs
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.schema import Schema
from pyiceberg.types import NestedField, TimestamptzType, DoubleType, DecimalType, BooleanType, LongType
from pyiceberg.partitioning import PartitionSpec, PartitionField
from pyiceberg.transforms import IdentityTransform, DayTransform, HourTransform
from pyiceberg.expressions import EqualTo, And, GreaterThanOrEqual, LessThan
from pyiceberg.typedef import Record
import common

mode = sys.argv[1] if len(sys.argv) > 1 else "local"
root = f"/tmp/issue17/ice_{mode}"; shutil.rmtree(root, ignore_errors=True); os.makedirs(root)
props = {"uri": f"sqlite:///{root}/catalog.sqlite"}
if mode == "local":
    props["warehouse"] = f"file://{root}/warehouse"; fs = pafs.LocalFileSystem(); base = f"{root}/archive"; uri = lambda p: "file://" + p
else:
    import boto3
    from moto.server import ThreadedMotoServer
    srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start(); host, port = srv.get_host_and_port()
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").create_bucket(Bucket="arch")
    props.update({"warehouse": "s3://arch/iceberg", "s3.endpoint": f"http://{host}:{port}", "s3.access-key-id": "k",
                  "s3.secret-access-key": "s", "s3.region": "us-east-1"})
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="k", secret_key="s", region="us-east-1")
    base = "arch/archive"; uri = lambda p: "s3://" + p
cat = SqlCatalog("ibstream", **props)
cat.create_namespace("ticks")

# files in the archive layout, written with ibstream's parquet_options
CID = 711280073
def hive(hour):  # hour index 0.. from 2025-01-10T14
    d = f"{base}/tick_type=bid_ask/contract_id={CID}/date=2025-01-10/hour={14+hour}"
    if mode == "local": os.makedirs(d, exist_ok=True)
    return f"{d}/data.parquet"
hours = [common.hour_table(common.H0 + h * common.HOUR_US, 20_000) for h in range(3)]
hourly = []
for h in range(2):
    common.write_hour(hive(h), hours[h], filesystem=fs); hourly.append(uri(hive(h)))
dayp = f"{base}/tick_type=bid_ask/contract_id={CID + 1}/date=2025-01-10/hour=all"
if mode == "local": os.makedirs(dayp, exist_ok=True)
common.write_hour(f"{dayp}/day-1.parquet", None, filesystem=fs, row_groups=hours) if False else None
with pq.ParquetWriter(f"{dayp}/day-1.parquet", common.BID_ASK, filesystem=fs, **{k: v for k, v in common.parquet_options(common.BID_ASK).items() if k != "row_group_size"}) as w:
    for t in hours: w.write_table(t)
dayfile = uri(f"{dayp}/day-1.parquet")

cols = [NestedField(1, "ts", TimestamptzType(), required=True), NestedField(2, "ib_time", TimestamptzType(), required=True),
        NestedField(3, "bid_price", DoubleType(), required=True), NestedField(4, "ask_price", DoubleType(), required=True),
        NestedField(5, "bid_size", DecimalType(18, 8), required=True), NestedField(6, "ask_size", DecimalType(18, 8), required=True),
        NestedField(7, "bid_past_low", BooleanType(), required=True), NestedField(8, "ask_past_high", BooleanType(), required=True)]
def attempt(label, fn):
    try: r = fn(); print(f"[OK]   {label}" + (f": {r}" if r is not None else "")); return r
    except Exception as e: print(f"[FAIL] {label}: {type(e).__name__}: {str(e)[:300]}")

# A: no partition column: partition by day(ts) only, add_files infers the partition value from ts min/max
tA = cat.create_table("ticks.bid_ask_by_day", Schema(*cols),
        partition_spec=PartitionSpec(PartitionField(1, 1000, DayTransform(), "ts_day")))
attempt("A add_files(hourly files) into day(ts)-partitioned table", lambda: tA.add_files(hourly))
attempt("A add_files(day file) into day(ts)-partitioned table", lambda: tA.add_files([dayfile]))
attempt("A re-add same file (check_duplicate_files)", lambda: tA.add_files(hourly[:1]))
attempt("A scan ts in hour 15", lambda: tA.scan(row_filter=And(GreaterThanOrEqual("ts", "2025-01-10T15:00:00+00:00"),
        LessThan("ts", "2025-01-10T16:00:00+00:00"))).to_arrow().num_rows)
tAh = cat.create_table("ticks.bid_ask_by_hour", Schema(*cols), partition_spec=PartitionSpec(PartitionField(1, 1000, HourTransform(), "ts_hour")))
attempt("A' add_files(hourly) into hour(ts) table", lambda: tAh.add_files(hourly))
attempt("A' add_files(day file) into hour(ts) table", lambda: tAh.add_files([dayfile]))

# B: identity(contract_id), the column only in the path
colsB = cols + [NestedField(9, "contract_id", LongType(), required=False)]
specB = PartitionSpec(PartitionField(9, 1000, IdentityTransform(), "contract_id"), PartitionField(1, 1001, DayTransform(), "ts_day"))
tB = cat.create_table("ticks.bid_ask", Schema(*colsB), partition_spec=specB)
attempt("B add_files(file without contract_id) into identity(contract_id) table", lambda: tB.add_files(hourly[:1]))
# C: build the DataFile ourselves with the partition value from the path, then fast_append
from pyiceberg.io.pyarrow import data_file_statistics_from_parquet_metadata, compute_statistics_plan, parquet_path_to_id_mapping, _check_pyarrow_schema_compatible
from pyiceberg.manifest import DataFile, DataFileContent, FileFormat
def data_file(table, path, contract_id):
    md = table.io.new_input(path); n = len(md)
    with md.open() as s: meta = pq.read_metadata(s)
    _check_pyarrow_schema_compatible(table.schema(), meta.schema.to_arrow_schema(), format_version=table.metadata.format_version)
    st = data_file_statistics_from_parquet_metadata(parquet_metadata=meta, stats_columns=compute_statistics_plan(table.schema(), table.properties),
                                                   parquet_column_mapping=parquet_path_to_id_mapping(table.schema()))
    day = (meta.row_group(0).column(0).statistics.min - datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)).days
    return DataFile.from_args(content=DataFileContent.DATA, file_path=path, file_format=FileFormat.PARQUET,
        partition=Record(contract_id, day), file_size_in_bytes=n, sort_order_id=None, spec_id=table.metadata.default_spec_id,
        equality_ids=None, key_metadata=None, **st.to_serialized_dict())
def append(table, files):
    with table.transaction() as tx:
        with tx.update_snapshot().fast_append() as fa:
            for f in files: fa.append_data_file(f)
attempt("C fast_append(DataFile with partition Record from path) x2 hourly + day file",
        lambda: append(tB, [data_file(tB, hourly[0], CID), data_file(tB, hourly[1], CID), data_file(tB, dayfile, CID + 1)]))
def scanC():
    t = tB.scan(row_filter=And(EqualTo("contract_id", CID), GreaterThanOrEqual("ts", "2025-01-10T15:00:00+00:00"))).to_arrow()
    return f"rows={t.num_rows} contract_ids={set(t.column('contract_id').to_pylist())} schema={t.schema.types}"
attempt("C scan contract_id==CID and ts>=15:00", scanC)
attempt("C plan_files for contract_id==CID+1", lambda: [(t.file.file_path[-40:], t.file.record_count) for t in tB.scan(row_filter=EqualTo("contract_id", CID + 1)).plan_files()])
attempt("C snapshots", lambda: [(s.snapshot_id, s.summary.operation.value) for s in tB.snapshots()])
# D: replace hourly files by a day file (compaction) = overwrite snapshot: delete 2 files, add 1
def compact():
    with tB.transaction() as tx:
        with tx.update_snapshot().overwrite() as ow:
            for t in tB.scan(row_filter=EqualTo("contract_id", CID)).plan_files():
                ow.delete_data_file(t.file)
            ow.append_data_file(data_file(tB, dayfile, CID))
    return [(s.summary.operation.value, s.summary.get("added-data-files"), s.summary.get("deleted-data-files")) for s in tB.snapshots()]
attempt("D overwrite (compaction: 2 hourly out, 1 day file in)", compact)
attempt("D scan after compaction", lambda: tB.scan(row_filter=EqualTo("contract_id", CID)).to_arrow().num_rows)
attempt("D metadata_location", lambda: tB.metadata_location)
# E: nullable vs required: what does the scan return?
attempt("E arrow schema of scan", lambda: str(tA.scan(limit=1).to_arrow().schema).replace("\n", "; ")[:400])
# F: field ids present -> rejected?
def with_ids():
    t = hours[0].cast(pa.schema([f.with_metadata({b"PARQUET:field_id": str(i + 1).encode()}) for i, f in enumerate(common.BID_ASK)]))
    p = f"{base}/withids.parquet"; pq.write_table(t, p, filesystem=fs); return tA.add_files([uri(p)])
attempt("F add_files(file with field ids)", with_ids)
print("catalog tables:", cat.list_tables("ticks"))
print("files under warehouse:", [i.path for i in (fs.get_file_info(pafs.FileSelector(f"{root}/warehouse" if mode == 'local' else "arch/iceberg", recursive=True))) if i.type == pafs.FileType.File][:6], "...")
import json; json.dump({"metadata": tB.metadata_location, "files": hourly + [dayfile], "props": props}, open(f"{root}/state.json", "w"))
if mode == "s3": input() if os.environ.get("HOLD") else srv.stop()
