"""Read-side faults and stall timing."""
import time, sys, boto3, pyarrow.fs as pafs, pyarrow.parquet as pq
from moto.server import ThreadedMotoServer
from faultproxy import FaultProxy
import common
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start()
host, port = srv.get_host_and_port()
boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").create_bucket(Bucket="arch")
p = FaultProxy(host, port, stall_seconds=60)
def mkfs(**kw): return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{p.port}", scheme="http", access_key="k", secret_key="s", region="us-east-1", **kw)
fs = mkfs(); common.write_hour("arch/r.parquet", common.hour_table(common.H0, 50_000), filesystem=fs)
def run(fault, n, label="", **kw):
    fs = mkfs(**kw)
    p.rules.clear(); p.log.clear(); p.fail(n, fault, lambda m, pth: m in ("GET",) and "r.parquet" in pth)
    t0 = time.time(); err = None
    try:
        with fs.open_input_file("arch/r.parquet") as f: rows = pq.ParquetFile(f).read_row_groups([0]).num_rows
    except Exception as e: err = f"{type(e).__name__}: {str(e)[:200]}"; rows = None
    print(f"== read GET fault={fault} x{n} {label} took {time.time()-t0:.1f}s rows={rows} error={err}")
    print("   requests (t+s, method, fault):", [(round(t - t0, 1), m, fl) for t, m, pth, fl, *r in p.log])
run("503", 1); run("503", 5); run("reset", 1); run("stall", 1)
run("stall", 1, "connect_timeout=1 request_timeout=2", connect_timeout=1, request_timeout=2)
run("stall", 5, "max_attempts=10", retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10))
run("503", 5, "max_attempts=10", retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=10))
run("503", 5, "AwsDefault(max_attempts=10)", retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=10))
srv.stop()
