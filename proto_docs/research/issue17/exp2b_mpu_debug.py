import boto3, pyarrow.fs as pafs
from moto.server import ThreadedMotoServer
from faultproxy import FaultProxy
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start()
host, port = srv.get_host_and_port()
boto3.client("s3", endpoint_url=f"http://{host}:{port}", aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1").create_bucket(Bucket="arch")
p = FaultProxy(host, port)
fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{p.port}", scheme="http", access_key="k", secret_key="s", region="us-east-1")
try:
    with fs.open_output_stream("arch/x.bin") as out: out.write(b"x" * 1000)
except OSError as e: print("ERR", e)
for l in p.log: print(l)
