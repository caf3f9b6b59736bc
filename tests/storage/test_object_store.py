"""The archive on an object store: the recorder publishes sealed hours and its index to a real
S3-compatible server on loopback (moto), read servers with no shared disk serve exactly the same
ticks, and outside engines read the same rows; faults (503s, stalls, resets, lost answers, kills at
every step, damaged objects) never make an hour visible twice or half."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prometheus_client import generate_latest

from ibstream.core.errors import CorruptFileError, InvalidConfigError, InvalidRequestError, ServerUnavailableError
from ibstream.core.times import to_us
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.failpoints import ENV, EXIT_CODE
from ibstream.storage.object_store import MANIFEST, POINTER
from ibstream.storage.synthetic import MNQ
from tests.helpers import ROOT, append_in_batches, between, flight_answers, free_port, ticks, utc

CID = MNQ.contract_id
FIRST = utc(2025, 1, 10, 20)
EVERYTHING = (utc(2025, 1, 1), utc(2025, 2, 1))


def recorder_settings(root: Path, url: str, **extra) -> Settings:
    return Settings(data_root=root, rotation_interval=timedelta(minutes=15), archive_delay=timedelta(0), fsync="none",
                    flight_port=0, archive_url=url, object_retries=6, **extra)


def replica_settings(root: Path, url: str, **extra) -> Settings:
    return Settings(data_root=root, archive_url=url, replica=True, flight_port=0, object_retries=3,
                    warm_recent=timedelta(0), **extra)


@pytest.fixture
def recorded(tmp_path, s3):
    """Five archived hours of MNQ quotes and one still in the buffer, in a store publishing to ``s3``."""
    settings = recorder_settings(tmp_path / "recorder", s3.url())
    quotes = ticks(FIRST, 30_000, rate_scale=0.1)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 11, 0, 30))  # the hours before midnight; 00:00.. stays buffered
    return settings, quotes


def test_published_hours_are_served_by_a_read_server_with_no_shared_disk(recorded, s3, tmp_path):
    settings, quotes = recorded
    with Store(settings) as store:
        report = store.publish(now=utc(2025, 1, 11, 1))
        assert (report.seq, report.uploaded) == (1, 4)
        local_archived = between(quotes, FIRST, utc(2025, 1, 11))
        keys = s3.keys("ibstream/")
        assert [k for k in keys if k.startswith("ibstream/index/")] == ["ibstream/index/LATEST",
                                                                        "ibstream/index/index-000000000001.sqlite.zst"]
        assert len([k for k in keys if k.startswith("ibstream/archive/") and k.endswith(".parquet")]) == 4
        assert store.shardable_until(CID, "bid_ask") == to_us(utc(2025, 1, 11))
        assert store.published_seq == 1
        again = store.publish(now=utc(2025, 1, 11, 1, 1))
        assert (again.seq, again.uploaded) == (None, 0)  # nothing changed: nothing uploaded

    sidecars = [k for k in keys if k.endswith(".bars.arrow")]
    assert len(sidecars) == 4  # each file's hours' 1-minute pre-aggregates, beside it (not in the index copy)
    with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
        assert replica.published_seq == 1
        assert not replica.index.hour_bars(CID, "bid_ask", 0, to_us(utc(2026, 1, 1)))
        cache = replica.replica.cache
        with Store(settings, read_only=True) as local:
            for resolution in ("1m", "1h", "1d"):
                assert replica.bars(CID, "bid_ask", to_us(FIRST), to_us(utc(2025, 1, 11)), resolution).equals(
                    local.bars(CID, "bid_ask", to_us(FIRST), to_us(utc(2025, 1, 11)), resolution)), resolution
        assert cache.misses == 4  # the sidecars only: bars never read a tick file
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(local_archived)
        assert cache.misses == 8 and cache.size_bytes == sum(
            s3.client().head_object(Bucket=s3.bucket, Key=k)["ContentLength"] for k in s3.keys("ibstream/archive/"))
        replica.read(CID, "bid_ask", *EVERYTHING)
        assert cache.misses == 8  # cached: nothing downloaded again
        metrics = _metrics(replica)
        assert metrics["ibstream_published_index"] == 1
        assert (metrics["ibstream_read_cache_misses_total"], metrics["ibstream_read_cache_bytes"]) == (
            8, cache.size_bytes)


def _metrics(store: Store) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from ibstream.monitoring import Monitor

    monitor = Monitor(Settings.of(store.settings), store)
    try:
        text = generate_latest(monitor.registry).decode()
    finally:
        monitor.close()
    return {sample.name: sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if not sample.labels}


def test_a_later_publication_reaches_a_running_read_server_and_never_shows_an_hour_twice(recorded, s3, tmp_path):
    settings, quotes = recorded
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
        with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
            first = replica.read(CID, "bid_ask", *EVERYTHING)
            store.archive(now=utc(2025, 1, 12))
            store.compact(now=utc(2025, 1, 12, 2))  # the hourly files of Jan 10 become one day file
            report = store.publish(now=utc(2025, 1, 12, 3))
            assert report.seq == 2
            assert replica.read(CID, "bid_ask", *EVERYTHING).equals(first)  # still index 1 until it refreshes
            replica.require_index(2)  # what a coordinator's ticket does
            assert replica.published_seq == 2
            assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
        manifest = pq.read_table(s3.url(direct=True).split("?")[0].replace("s3://test:test@", "") + "/" + MANIFEST,
                                 filesystem=_fs(s3))
        assert sum(manifest["rows"].to_pylist()) == quotes.num_rows
        assert len(manifest) == 2  # the Jan 10 day file and the Jan 11 hourly file; none of the replaced ones


def _fs(s3):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key="test", secret_key="test", endpoint_override=s3.endpoint, scheme="http",
                             region="us-east-1")


def test_duckdb_reads_the_published_archive_as_a_table_without_ibstream(recorded, s3):
    """An outside engine: DuckDB with s3fs (no httpfs offline), the manifest naming the files."""
    import s3fs

    settings, quotes = recorded
    with Store(settings) as store:
        store.archive(now=utc(2025, 1, 12))
        store.publish(now=utc(2025, 1, 12, 1))
    con = duckdb.connect()
    con.register_filesystem(s3fs.S3FileSystem(key="test", secret="test",
                                              client_kwargs={"endpoint_url": f"http://{s3.endpoint}"}))
    con.execute(f"SET VARIABLE files = (SELECT list(path) FROM read_parquet('s3://{s3.bucket}/ibstream/{MANIFEST}') "
                "WHERE tick_type = 'bid_ask' AND contract_id = ?)", [CID])
    rows = con.execute("SELECT count(*), min(ts), max(ts), sum(bid_price) FROM read_parquet(getvariable('files'), "
                       "hive_partitioning = true)").fetchone()
    assert rows[0] == quotes.num_rows
    assert rows[1:3] == (quotes["ts"][0].as_py(), quotes["ts"][-1].as_py())
    assert rows[3] == pa.compute.sum(quotes["bid_price"]).as_py()


def test_transient_object_store_faults_are_retried_and_persistent_ones_publish_nothing(recorded, s3, tmp_path):
    settings, quotes = recorded
    proxy = s3.proxy
    proxy.fail(2, "503", lambda method, path: method == "PUT")
    proxy.fail(1, "reset", lambda method, path: method == "PUT")
    proxy.fail(1, "drop_response", lambda method, path: method == "PUT")
    with Store(settings) as store:
        assert store.publish(now=utc(2025, 1, 11, 1)).seq == 1  # retried within object_retries
    proxy.clear()
    with Store(settings) as store:
        store.archive(now=utc(2025, 1, 12))
        proxy.fail(1000, "503", lambda method, path: method == "PUT")
        with pytest.raises(ServerUnavailableError, match="the object store s3://.* failed writing"):
            store.publish(now=utc(2025, 1, 12, 1))
        proxy.clear()
        with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
            assert replica.read(CID, "bid_ask", *EVERYTHING).equals(between(quotes, FIRST, utc(2025, 1, 11)))
        assert store.publish(now=utc(2025, 1, 12, 2)).seq == 2
    with Store(replica_settings(tmp_path / "reader2", s3.url()), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_reads_retry_transient_faults_and_a_store_that_stays_down_is_unavailable_not_damage(recorded, s3, tmp_path):
    settings, quotes = recorded
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
    expected = between(quotes, FIRST, utc(2025, 1, 11))
    with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
        s3.proxy.fail(2, "503", lambda method, path: method == "GET" and "/archive/" in path)
        s3.proxy.fail(1, "reset", lambda method, path: method == "GET" and "/archive/" in path)
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(expected)
    with Store(replica_settings(tmp_path / "reader2", s3.url()), read_only=True) as replica:
        s3.proxy.fail(1000, "503", lambda method, path: method == "GET" and "/archive/" in path)
        with pytest.raises(ServerUnavailableError, match="failed reading archive/"):
            replica.read(CID, "bid_ask", *EVERYTHING)
        s3.proxy.clear()
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(expected)  # and it reads once the store is back


def test_a_damaged_object_is_reported_by_name_and_never_served(recorded, s3, tmp_path):
    settings, _ = recorded
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
    key = [k for k in s3.keys("ibstream/archive/") if k.endswith(".parquet")][0]
    body = bytearray(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
    with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
        with pytest.raises(CorruptFileError, match="does not match its published SHA-256"):
            replica.read(CID, "bid_ask", *EVERYTHING)
        assert not list((tmp_path / "reader" / "objects").rglob("*.part"))


def test_the_read_cache_stays_within_its_bound(recorded, s3, tmp_path):
    settings, quotes = recorded
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
    sizes = [s3.client().head_object(Bucket=s3.bucket, Key=k)["ContentLength"] for k in s3.keys("ibstream/archive/")
             if k.endswith(".parquet")]
    bound = max(sizes) + min(sizes)  # room for about two files
    with Store(replica_settings(tmp_path / "reader", s3.url(), read_cache_max_bytes=bound), read_only=True) as replica:
        for _ in range(2):
            assert replica.read(CID, "bid_ask", *EVERYTHING).equals(between(quotes, FIRST, utc(2025, 1, 11)))
            assert replica.replica.cache.size_bytes <= bound
        on_disk = sum(p.stat().st_size for p in (tmp_path / "reader" / "objects").rglob("*") if p.is_file())
        assert on_disk <= bound


@pytest.mark.parametrize("point", ["publish.after_upload", "publish.after_index", "publish.after_manifest",
                                   "publish.after_pointer", "publish.after_record"])
def test_a_kill_at_each_step_of_publication_shows_every_hour_once_or_not_at_all(recorded, s3, tmp_path, point):
    settings, quotes = recorded
    published = between(quotes, FIRST, utc(2025, 1, 11))
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
        store.archive(now=utc(2025, 1, 12))
    script = textwrap.dedent(f"""
        from datetime import UTC, datetime, timedelta
        from ibstream.settings import Settings
        from ibstream.storage import Store
        settings = Settings.model_validate_json({settings.model_dump_json()!r})
        with Store(settings) as store:
            store.publish(now=datetime(2025, 1, 12, 1, tzinfo=UTC))
        """)
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, ENV: point}, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == EXIT_CODE, done.stderr
    with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
        after_kill = replica.read(CID, "bid_ask", *EVERYTHING)
        visible = json.loads(s3.client().get_object(Bucket=s3.bucket, Key="ibstream/" + POINTER)["Body"].read())
        assert after_kill.equals(quotes if visible["seq"] == 2 else published)
        assert visible["seq"] == (2 if point in ("publish.after_pointer", "publish.after_record") else 1)
    with Store(settings) as store:  # the next run finishes the job
        report = store.publish(now=utc(2025, 1, 12, 2))
        assert report.uploaded == 0 or point == "publish.after_upload"
        assert store.published_seq in (2, 3)
    with Store(replica_settings(tmp_path / "reader2", s3.url()), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_unreferenced_objects_are_deleted_after_the_grace_period_and_old_indexes_pruned(recorded, s3):
    settings, quotes = recorded
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
        hourly = set(s3.keys("ibstream/archive/"))
        store.archive(now=utc(2025, 1, 12))
        store.compact(now=utc(2025, 1, 12, 2))
        store.publish(now=utc(2025, 1, 12, 3))  # the replaced hourly objects become unreferenced
        assert hourly <= set(s3.keys("ibstream/archive/"))
        for minute in range(1, 6):
            store.index.put_hour_bars(CID, "bid_ask", 0, b"%d" % minute)  # a change: another publication
            store.publish(now=utc(2025, 1, 12, 3, minute))
        assert hourly <= set(s3.keys("ibstream/archive/"))  # within retention_grace (5 min)
        store.publish(now=utc(2025, 1, 12, 3, 10))
        assert not hourly & set(s3.keys("ibstream/archive/"))
        indexes = [k for k in s3.keys("ibstream/index/") if k.endswith(".zst")]
        assert len(indexes) == 4 and indexes[-1].endswith(f"{store.published_seq:012d}.sqlite.zst")


def test_bad_settings_and_a_recorders_folder_are_refused_with_what_to_do(tmp_path, s3, recorded):
    settings, _ = recorded
    with pytest.raises(ValueError, match="replica is set but archive_url is not"):
        Settings(data_root=tmp_path / "x", replica=True)
    with pytest.raises(InvalidConfigError, match="holds a recorder's store"):
        Store(replica_settings(settings.data_root, s3.url()), read_only=True)
    with pytest.raises(InvalidConfigError, match="unknown option 'endpoint'"):
        Store(recorder_settings(tmp_path / "y", "s3://b/p?endpoint=127.0.0.1:1"))
    with pytest.raises(ServerUnavailableError, match="nothing is published at s3://ticks/empty yet"):
        Store(replica_settings(tmp_path / "z", s3.url("empty")), read_only=True)


def test_a_local_folder_works_as_the_object_store_too(tmp_path):
    shared = tmp_path / "share"
    settings = recorder_settings(tmp_path / "recorder", shared.as_uri())
    quotes = ticks(FIRST, 10_000, rate_scale=0.1)
    with Store(settings) as store:
        append_in_batches(store, quotes)
        store.archive(now=utc(2025, 1, 12))
        store.publish(now=utc(2025, 1, 12, 1))
    assert not list(shared.rglob("*.part"))
    with Store(replica_settings(tmp_path / "reader", shared.as_uri()), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
    con = duckdb.connect()
    files = con.execute(f"SELECT list(path) FROM read_parquet('{shared / MANIFEST}')").fetchone()[0]
    assert all(path.startswith(str(shared / "archive")) for path in files)
    rows = con.execute("SELECT count(*) FROM read_parquet(?)", [files])
    assert rows.fetchone()[0] == quotes.num_rows


def test_ibstream_publish_then_serve_replica_answers_flight_queries_exactly(recorded, s3, tmp_path):
    """The operator's path: `ibstream publish` on the recording host, `ibstream serve --replica` elsewhere."""

    from ibstream.clients import Client
    from tests.helpers import ibstream, wait_until

    settings, quotes = recorded
    status = ibstream("status", "--data-root", str(settings.data_root), IBSTREAM_ARCHIVE_URL=s3.url())
    assert "  published: nothing yet\n" in status.stdout
    done = ibstream("publish", "--data-root", str(settings.data_root), "--archive-url", s3.url())
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("published index 1 with 4 new files")
    status = ibstream("status", "--data-root", str(settings.data_root), IBSTREAM_ARCHIVE_URL=s3.url())
    assert "  published: index 1 to s3://ticks/ibstream " in status.stdout
    assert " ago; 0 archive files not uploaded yet\n" in status.stdout
    port = free_port()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("IBSTREAM_")}
    server = subprocess.Popen([sys.executable, "-m", "ibstream.cli", "--log-level", "WARNING", "serve", "--replica",
                               "--archive-url", s3.url(), "--data-root", str(tmp_path / "reader"), "--flight-port",
                               str(port)], cwd=ROOT, env=environment)
    try:
        wait_until(lambda: flight_answers(port), what="the read server to listen")
        with Client(f"grpc://127.0.0.1:{port}") as client:
            got = client.tables(CID, "bid_ask", *EVERYTHING)["bid_ask"]
        assert got.equals(between(quotes, FIRST, utc(2025, 1, 11)))
        with Client(f"grpc://127.0.0.1:{port}") as client, pytest.raises(InvalidRequestError,
                                                                            match="served by the server beside"):
            next(iter(client.live(CID, "bid_ask", FIRST)))
    finally:
        server.terminate()
        server.wait(30)
    refused = ibstream("serve", "--replica", "--archive-url", s3.url(), "--data-root", str(settings.data_root))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "holds a recorder's store" in refused.stderr
    missing = ibstream("serve", "--replica", "--data-root", str(tmp_path / "r2"))
    assert missing.returncode == 2 and "replica is set but archive_url is not" in missing.stderr


def test_stalled_requests_are_retried_during_publication_and_reads(recorded, s3, tmp_path):
    settings, quotes = recorded
    s3.proxy.stall_seconds = 6
    s3.proxy.fail(1, "stall", lambda method, path: method == "PUT" and "/archive/" in path)
    with Store(settings) as store:
        assert store.publish(now=utc(2025, 1, 11, 1)).seq == 1
    s3.proxy.fail(1, "stall", lambda method, path: method == "GET" and "/archive/" in path)
    with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(between(quotes, FIRST, utc(2025, 1, 11)))
    assert [fault for _, _, fault in s3.proxy.log].count("stall") == 2


def test_a_changed_or_emptied_archive_url_gets_everything_uploaded_again(recorded, s3, tmp_path):
    settings, quotes = recorded
    with Store(settings) as store:
        store.archive(now=utc(2025, 1, 12))
        store.publish(now=utc(2025, 1, 12, 1))
        files = len(store.index.all_archive_paths())
    moved = settings.model_copy(update={"archive_url": s3.url("elsewhere")})
    with Store(moved) as store:
        assert store.publish(now=utc(2025, 1, 12, 2)).uploaded == files
    for key in s3.keys("elsewhere/"):
        s3.client().delete_object(Bucket=s3.bucket, Key=key)  # the bucket emptied behind the recorder's back
    with Store(moved) as store:
        report = store.publish(now=utc(2025, 1, 12, 3))
        assert (report.seq, report.uploaded) == (1, files)
    with Store(replica_settings(tmp_path / "reader", s3.url("elsewhere")), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_a_full_cache_disk_on_a_read_server_is_unavailable_and_leaves_no_partial_copy(recorded, s3, tmp_path,
                                                                                      small_disk):
    settings, quotes = recorded
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
    with Store(replica_settings(small_disk / "reader", s3.url()), read_only=True) as replica:
        from tests.helpers import fill

        fill(small_disk / "ballast")
        with pytest.raises(ServerUnavailableError, match="folder for copies of the object store is full"):
            replica.read(CID, "bid_ask", *EVERYTHING)
        assert not list((small_disk / "reader" / "objects").rglob("*.part"))
        (small_disk / "ballast").unlink()
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(between(quotes, FIRST, utc(2025, 1, 11)))


def test_a_damaged_published_index_or_pointer_is_refused_and_the_read_server_keeps_its_index(recorded, s3, tmp_path):
    settings, quotes = recorded
    expected = between(quotes, FIRST, utc(2025, 1, 11))
    with Store(settings) as store:
        store.publish(now=utc(2025, 1, 11, 1))
        with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
            store.archive(now=utc(2025, 1, 12))
            store.publish(now=utc(2025, 1, 12, 1))
            key = [k for k in s3.keys("ibstream/index/") if k.endswith("2.sqlite.zst")][0]
            body = bytearray(s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read())
            body[len(body) // 3] ^= 0x01
            s3.client().put_object(Bucket=s3.bucket, Key=key, Body=bytes(body))
            with pytest.raises(CorruptFileError, match="does not match the SHA-256 its pointer names"):
                replica.replica.refresh()
            s3.client().put_object(Bucket=s3.bucket, Key="ibstream/" + POINTER, Body=b"{not json")
            with pytest.raises(CorruptFileError, match="is not an ibstream pointer"):
                replica.replica.refresh()
            assert replica.published_seq == 1
            assert replica.read(CID, "bid_ask", *EVERYTHING).equals(expected)  # still index 1, whole
            with pytest.raises(ServerUnavailableError, match="has index 1, the ticket was planned on index 2"):
                replica.require_index(2)
            store.index.put_hour_bars(CID, "bid_ask", 0, b"x")  # a change: the next run publishes again
            assert store.publish(now=utc(2025, 1, 12, 2)).seq == 3  # a pointer it cannot read is replaced
            replica.replica.refresh()
            assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)


def test_a_lost_recorder_index_is_rebuilt_and_publication_goes_on_with_nothing_twice(recorded, s3, tmp_path):
    from ibstream.storage.maintenance import reindex

    settings, quotes = recorded
    with Store(settings) as store:
        store.archive(now=utc(2025, 1, 12))
        store.publish(now=utc(2025, 1, 12, 1))
    objects = set(s3.keys("ibstream/archive/"))
    settings.index_path.unlink()
    reindex(settings)
    with Store(settings) as store:
        report = store.publish(now=utc(2025, 1, 12, 2))
        assert report.seq == 2  # after the store's own pointer, not from 1 again
    assert set(s3.keys("ibstream/archive/")) == objects  # the same files under the same names
    with Store(replica_settings(tmp_path / "reader", s3.url()), read_only=True) as replica:
        assert replica.read(CID, "bid_ask", *EVERYTHING).equals(quotes)
