"""pyarrow S3FileSystem retry behaviour against injected faults (FaultProxy in front of moto 5.2.5)."""
import time, sys, boto3, pyarrow as pa, pyarrow.fs as pafs, pyarrow.parquet as pq
from moto.server import ThreadedMotoServer
from faultproxy import FaultProxy
import common

srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start()
host, port = srv.get_host_and_port()
s3 = boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
s3.create_bucket(Bucket="arch")
p = FaultProxy(host, port, stall_seconds=float(sys.argv[1]) if len(sys.argv) > 1 else 20)

def mkfs(**kw):
    return pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{p.port}", scheme="http", access_key="k", secret_key="s",
                             region="us-east-1", **kw)

def keys(): return sorted(o["Key"] for o in s3.list_objects_v2(Bucket="arch").get("Contents", []))
def mpus(): return len(s3.list_multipart_uploads(Bucket="arch").get("Uploads", []))
big = b"y" * (12 << 20)   # 12 MiB: 3 parts of 5 MiB (pyarrow's part size grows from 5 MiB)

def case(name, fault, match, data, n=1, **fskw):
    p.rules.clear(); p.log.clear(); p.fail(n, fault, match)
    fs = mkfs(**fskw); key = f"arch/{name}.bin"; t0 = time.time(); err = None
    try:
        with fs.open_output_stream(key) as out: out.write(data)
    except Exception as e: err = f"{type(e).__name__}: {str(e)[:160]}"
    reqs = [(m, pth.split("?")[1][:22] if "?" in pth else "", fl) for _, m, pth, fl, *rest in p.log]
    print(f"\n== {name}: fault={fault} x{n}  took {time.time()-t0:.1f}s  error={err}")
    print("   requests:", reqs)
    print("   object visible:", key[5:] in keys(), " open MPUs:", mpus())

is_put_obj = lambda m, pth: m == "PUT" and "?" not in pth
is_part = lambda m, pth: m == "PUT" and "partNumber=2" in pth
is_complete = lambda m, pth: m == "POST" and "uploadId=" in pth
small = b"x" * 1000
case("single_503x1", "503", is_put_obj, small, 1, allow_delayed_open=True)
case("single_503x5", "503", is_put_obj, small, 5, allow_delayed_open=True)
case("mpu_default_small", "503", lambda m, pth: False, small, 0)
case("mpu_part_503x1", "503", is_part, big, 1)
case("mpu_part_503x5", "503", is_part, big, 5)
case("mpu_complete_503x1", "503", is_complete, big, 1)
case("mpu_complete_200err_x5", "200error", is_complete, big, 5)
case("mpu_complete_dropped", "drop_response", is_complete, big, 1)
case("single_put_dropped", "drop_response", is_put_obj, small, 1, allow_delayed_open=True)
case("single_put_reset", "reset", is_put_obj, small, 1, allow_delayed_open=True)
case("single_stall", "stall", is_put_obj, small, 1, allow_delayed_open=True)
case("single_stall_timeout", "stall", is_put_obj, small, 1, allow_delayed_open=True, request_timeout=2, connect_timeout=1)

# reads
fs = mkfs(); common.write_hour("arch/r.parquet", common.hour_table(common.H0, 50_000), filesystem=fs)
for fault, n in (("503", 1), ("503", 5), ("reset", 1), ("stall", 1)):
    p.rules.clear(); p.log.clear(); p.fail(n, fault, lambda m, pth: m == "GET" and "r.parquet" in pth)
    t0 = time.time(); err = None
    try:
        with fs.open_input_file("arch/r.parquet") as f: rows = pq.ParquetFile(f).read_row_groups([0]).num_rows
    except Exception as e: err = f"{type(e).__name__}: {str(e)[:160]}"; rows = None
    print(f"\n== read GET fault={fault} x{n} took {time.time()-t0:.1f}s rows={rows} error={err}")
    print("   requests:", [(m, fl) for _, m, pth, fl, *r in p.log])
srv.stop()
