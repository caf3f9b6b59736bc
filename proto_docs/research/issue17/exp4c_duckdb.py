"""DuckDB reading the archive without ibstream code: iceberg extension? httpfs? fsspec-registered S3."""
import json, time, duckdb, boto3, s3fs, pyarrow.fs as pafs
from moto.server import ThreadedMotoServer
import common
print("duckdb", duckdb.__version__)
con = duckdb.connect()
for ext in ("iceberg", "httpfs"):
    t0 = time.time()
    try: con.sql(f"INSTALL {ext}"); con.sql(f"LOAD {ext}"); print(f"INSTALL {ext}: OK")
    except Exception as e: print(f"INSTALL {ext}: {type(e).__name__}: {str(e)[:200]} ({time.time()-t0:.1f}s)")
print("installed extensions:", con.sql("select extension_name, installed, loaded from duckdb_extensions() where installed").fetchall())
# 1. local Hive-partitioned archive: plain read_parquet with hive_partitioning
q = """select contract_id, count(*), min(ts), sum(bid_size) from read_parquet('/tmp/issue17/ice_local/archive/tick_type=bid_ask/*/*/*/*.parquet',
       hive_partitioning=true) where contract_id = 711280073 group by all"""
print("local hive read:", con.sql(q).fetchall())
print("hive types:", con.sql("describe select * from read_parquet('/tmp/issue17/ice_local/archive/tick_type=bid_ask/*/*/*/*.parquet', hive_partitioning=true)").fetchall()[-4:])
# 2. files listed by the Iceberg manifest (pyiceberg plan_files) handed to DuckDB
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.expressions import EqualTo
cat = SqlCatalog("ibstream", uri="sqlite:////tmp/issue17/ice_local/catalog.sqlite", warehouse="file:///tmp/issue17/ice_local/warehouse")
tbl = cat.load_table("ticks.bid_ask_by_day")
files = [t.file.file_path.removeprefix("file://") for t in tbl.scan().plan_files()]
print("iceberg-listed files -> duckdb:", con.sql(f"select count(*) from read_parquet({files!r})").fetchall())
# 2b. pyiceberg -> arrow -> duckdb (zero copy)
arrow = tbl.scan(row_filter=EqualTo("bid_past_low", False)).to_arrow()
print("pyiceberg to_arrow -> duckdb:", con.sql("select count(*) from arrow").fetchall())
# 3. S3 without httpfs: register an fsspec (s3fs) filesystem
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start(); host, port = srv.get_host_and_port(); ep = f"http://{host}:{port}"
boto3.client("s3", endpoint_url=ep, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").create_bucket(Bucket="arch")
pfs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="k", secret_key="s", region="us-east-1")
for h in range(3):
    common.write_hour(f"arch/archive/tick_type=bid_ask/contract_id=711280073/date=2025-01-10/hour={14+h}/data.parquet",
                      common.hour_table(common.H0 + h * common.HOUR_US, 20_000), filesystem=pfs)
fs = s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": ep, "region_name": "us-east-1"})
con.register_filesystem(fs)
t0 = time.time()
try:
    print("s3 via fsspec glob+hive:", con.sql("""select hour, count(*) from read_parquet('s3://arch/archive/tick_type=bid_ask/*/*/*/*.parquet',
          hive_partitioning=true) where hour = 15 group by all""").fetchall(), f"{time.time()-t0:.2f}s")
except Exception as e: print("s3 via fsspec:", type(e).__name__, str(e)[:300])
srv.stop()
