"""DuckDB 1.4.4 + pip-installed extensions (duckdb-ext-iceberg/avro/httpfs): iceberg_scan local and on moto S3."""
import json, glob, os, duckdb, duckdb_ext
extdir = os.path.join(list(duckdb_ext.__path__)[0], "extensions")
con = duckdb.connect(config={"extension_directory": extdir, "autoinstall_known_extensions": False})
for e in ("avro", "iceberg", "httpfs"): con.sql(f"LOAD {e}")
print("duckdb", duckdb.__version__, con.sql("select extension_name, extension_version from duckdb_extensions() where loaded and extension_name in ('iceberg','avro','httpfs')").fetchall())
meta = sorted(glob.glob("/tmp/issue17/ice_local/warehouse/ticks/bid_ask/metadata/*.metadata.json"))[-1]
def q(label, sql):
    try: print(label, con.sql(sql).fetchall())
    except Exception as e: print(label, "FAIL", type(e).__name__, str(e)[:300])
q("local iceberg_scan by contract_id:", f"select contract_id, count(*) from iceberg_scan('{meta}') group by all order by 1")
q("local iceberg_scan types:", f"select column_name, column_type, null from (describe select * from iceberg_scan('{meta}'))")
q("local iceberg_metadata:", f"select status, content, file_path[-45:], record_count from iceberg_metadata('{meta}')")
st = json.load(open("/tmp/issue17/ice_s3/state.json")); p = st["props"]
con.sql(f"""CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 's', REGION 'us-east-1', ENDPOINT '{p['s3.endpoint'].removeprefix('http://')}',
            URL_STYLE 'path', USE_SSL false)""")
q("s3 iceberg_scan:", f"select contract_id, count(*) from iceberg_scan('{st['metadata']}') group by all order by 1")
q("s3 iceberg_scan filter pushdown (explain has filter?):", f"select count(*) from iceberg_scan('{st['metadata']}') where contract_id = 711280074 and ts >= '2025-01-10 15:00:00+00'")
q("s3 read_parquet hive glob:", "select contract_id, hour, count(*) from read_parquet('s3://arch/archive/tick_type=bid_ask/*/*/*/*.parquet', hive_partitioning=true) group by all order by 1,2")
