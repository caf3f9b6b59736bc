"""S3 conditional writes (If-None-Match: *, If-Match: etag) on moto 5.2.5; pyarrow and s3fs exposure."""
import boto3, botocore, pyarrow.fs as pafs, s3fs
from moto.server import ThreadedMotoServer
srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False); srv.start()
host, port = srv.get_host_and_port(); ep = f"http://{host}:{port}"
s3 = boto3.client("s3", endpoint_url=ep, aws_access_key_id="k", aws_secret_access_key="s", region_name="us-east-1")
s3.create_bucket(Bucket="arch")
def attempt(label, fn):
    try: r = fn(); print(label, "-> OK", r.get("ETag") if isinstance(r, dict) else r)
    except botocore.exceptions.ClientError as e: print(label, "->", e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"])
    except Exception as e: print(label, "->", type(e).__name__, str(e)[:150])
attempt("put If-None-Match=* (new)", lambda: s3.put_object(Bucket="arch", Key="a", Body=b"1", IfNoneMatch="*"))
attempt("put If-None-Match=* (exists)", lambda: s3.put_object(Bucket="arch", Key="a", Body=b"2", IfNoneMatch="*"))
print("   content now:", s3.get_object(Bucket="arch", Key="a")["Body"].read())
etag = s3.head_object(Bucket="arch", Key="a")["ETag"]
attempt("put If-Match=<current etag>", lambda: s3.put_object(Bucket="arch", Key="a", Body=b"3", IfMatch=etag))
attempt("put If-Match=<stale etag>", lambda: s3.put_object(Bucket="arch", Key="a", Body=b"4", IfMatch=etag))
# multipart complete with If-None-Match
def mpu(key, body):
    u = s3.create_multipart_upload(Bucket="arch", Key=key)["UploadId"]
    e = s3.upload_part(Bucket="arch", Key=key, UploadId=u, PartNumber=1, Body=body)["ETag"]
    return s3.complete_multipart_upload(Bucket="arch", Key=key, UploadId=u, IfNoneMatch="*",
                                        MultipartUpload={"Parts": [{"ETag": e, "PartNumber": 1}]})
attempt("mpu complete If-None-Match=* (new)", lambda: mpu("m", b"x"))
attempt("mpu complete If-None-Match=* (exists)", lambda: mpu("m", b"y"))
print("   content now:", s3.get_object(Bucket="arch", Key="m")["Body"].read())
# pyarrow: metadata keys are passed as headers? try
fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", access_key="k", secret_key="s", region="us-east-1")
def pa_put():
    with fs.open_output_stream("arch/a", metadata={"If-None-Match": "*"}) as o: o.write(b"pyarrow")
    return s3.get_object(Bucket="arch", Key="a")["Body"].read()
attempt("pyarrow open_output_stream(metadata={'If-None-Match':'*'}) over existing", pa_put)
# s3fs
fs2 = s3fs.S3FileSystem(key="k", secret="s", client_kwargs={"endpoint_url": ep, "region_name": "us-east-1"})
attempt("s3fs pipe_file(mode='create') new", lambda: fs2.pipe_file("arch/c", b"1", mode="create"))
attempt("s3fs pipe_file(mode='create') exists", lambda: fs2.pipe_file("arch/c", b"2", mode="create"))
def s3fs_x():
    with fs2.open("arch/c", "xb") as f: f.write(b"3")
attempt("s3fs open('xb') exists", s3fs_x)
print("   content now:", s3.get_object(Bucket="arch", Key="c")["Body"].read())
srv.stop()
