"""moto ThreadedMotoServer on loopback + pyarrow.fs.S3FileSystem: write/read/list/move/row-group reads."""
import time, boto3, pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq
from moto.server import ThreadedMotoServer
import common

srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start()
host, port = srv.get_host_and_port(); ep = f"http://{host}:{port}"; print("moto at", ep)
s3 = boto3.client("s3", endpoint_url=ep, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
s3.create_bucket(Bucket="arch")
fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="k", secret_key="s",
                       region="us-east-1", allow_bucket_creation=False)
key = "arch/archive/tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour=14/data.parquet"
t = common.hour_table(common.H0, 50_000)
common.write_hour(key, t, filesystem=fs)
print("written size", fs.get_file_info(key).size)
print("listing", [i.path for i in fs.get_file_info(pafs.FileSelector("arch/archive", recursive=True)) if i.type == pafs.FileType.File])
# day file: one run of row groups per hour
day = "arch/archive/tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour=all/day-1.parquet"
hours = [common.hour_table(common.H0 + h * common.HOUR_US, 20_000) for h in range(3)]
common.write_hour(day, hours[0], filesystem=fs, row_groups=hours)
with fs.open_input_file(day) as f:
    pf = pq.ParquetFile(f, page_checksum_verification=True)
    print("day file row groups", pf.num_row_groups, [pf.metadata.row_group(i).num_rows for i in range(pf.num_row_groups)])
    rg = pf.read_row_groups([1]); print("rg1 rows", rg.num_rows, rg.column("ts")[0], "equal:", rg.equals(hours[1]))
# move: what does it do on S3?
s3.list_objects_v2(Bucket="arch")
t0 = time.time(); fs.move(key, key + ".moved"); print("move took", round(time.time() - t0, 3))
print("after move", [o["Key"] for o in s3.list_objects_v2(Bucket="arch")["Contents"]])
# dataset read through hive partitioning
import pyarrow.dataset as ds
d = ds.dataset("arch/archive/tick_type=bid_ask", filesystem=fs, format="parquet", partitioning="hive")
print("dataset files", len(d.files), "schema has partition cols:", d.schema.names[-3:])
srv.stop()
