"""The archive on an object store: the recorder publishes, read servers on other machines serve.

The recorder keeps its buffer and archive on local disk. Every ``publish_interval`` a
:class:`Publisher` uploads the archive files the index names and has not uploaded yet, then the
index itself, then ``index/LATEST`` naming it: the pointer is the one publication point, so an
hour is visible to read servers once or not at all, at every crash point and on every retried
upload (proto_docs/storage-layout.md, "Object storage"):

- ``archive/<hive folders>/<name>-<sha256[:16]>.parquet``: an archive file under a name that
  holds its content hash, so an object never changes; a retried upload writes the same bytes to
  the same key. Nothing is renamed (a rename on S3 is a copy and a delete, not atomic).
- ``index/index-<seq>.sqlite.zst``: a copy of the index holding only hours whose file is uploaded,
  zstd-compressed, never overwritten once a pointer names it.
- ``manifest.parquet``: one row per archive object the index names (``path`` is its full URL), so
  DuckDB, Spark or Trino read the archive as a table without ibstream and without counting a
  replaced or half-published file.
- ``index/LATEST``: JSON naming the newest index (its seq, key, SHA-256), written last.

Objects no published index names any more (retention, compaction) are deleted
``retention_grace`` after the index stopped naming them, so a read server on the previous index
still reads them whole. A read server (:class:`Replica`) polls the pointer, installs a newer
index into its own ``index.sqlite`` and downloads the files queries need into a bounded local
cache (:class:`ReadCache`).

Filesystems are :mod:`pyarrow.fs` (S3 and S3-compatible stores, GCS, local or mounted folders);
S3 requests are retried ``object_retries`` times with AWS's default backoff (25 ms doubling).
Multipart uploads (files past 5 MiB) that a crash cuts off are left to the bucket's
AbortIncompleteMultipartUpload lifecycle rule: pyarrow cannot list them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from ibstream.core.errors import CorruptFileError, InvalidConfigError, ServerUnavailableError, StorageError
from ibstream.core.times import from_us, iso
from ibstream.storage.config import StorageSettings
from ibstream.storage.failpoints import failpoint
from ibstream.storage.index import Index, PublishedFile

log = logging.getLogger(__name__)

POINTER = "index/LATEST"
POINTER_FORMAT = 1
MANIFEST = "manifest.parquet"
KEEP_INDEXES = 3  # published indexes kept besides the newest (a read server may be downloading one)
CHUNK = 4 << 20
REPLICA_MARKER = "REPLICA"  # in a read server's data root: it holds copies only


def _now_us() -> int:
    return time.time_ns() // 1000


def redacted_url(url: str) -> str:
    """The URL without credentials or query (for messages and logs)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return urllib.parse.urlunsplit((parts.scheme, host + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))


class ObjectStore:
    """A folder of objects on a :mod:`pyarrow.fs` filesystem, by key relative to ``archive_url``."""

    def __init__(self, url: str, retries: int = 6):
        self.url = redacted_url(url)
        try:
            self.fs, self.base = _filesystem(url, retries)
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InvalidConfigError(f"archive_url {self.url[:200]!r} cannot be opened ({exc}); use "
                                     "s3://bucket/prefix (options as ?endpoint_override=host:port&scheme=http"
                                     "&region=...), gs://bucket/prefix or file:///folder") from None
        self.local = self.fs.type_name == "local"
        if self.local:
            os.makedirs(self.base, exist_ok=True)

    def path(self, key: str) -> str:
        return f"{self.base}/{key}"

    def full_url(self, key: str) -> str:
        """The object's URL as outside engines name it (no credentials, no options; a local folder's: a path)."""
        if self.local:
            return self.path(key)
        scheme = urllib.parse.urlsplit(self.url).scheme
        return f"{scheme}://{self.path(key)}"

    def _failed(self, doing: str, key: str, exc: BaseException) -> ServerUnavailableError:
        return ServerUnavailableError(f"the object store {self.url} failed {doing} {key}: {str(exc)[:300]}; it is "
                                      "retried (check the store's address, credentials and health)")

    def put_file(self, source: Path, key: str) -> int:
        """Upload a local file; returns its size as stored. An object is written whole or not at all
        (on a local folder: a temporary name, then a rename)."""
        target = self.path(key)
        temporary = f"{target}.{uuid.uuid4().hex}.part" if self.local else target
        try:
            if self.local:
                os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(source, "rb") as handle, self.fs.open_output_stream(temporary, compression=None) as out:
                shutil.copyfileobj(handle, out, CHUNK)
            if self.local:
                with open(temporary, "rb") as handle:
                    os.fsync(handle.fileno())
                os.replace(temporary, target)
            return self.size(key)
        except (pa.ArrowException, OSError) as exc:
            if self.local and os.path.exists(temporary):
                os.unlink(temporary)
            raise self._failed("writing", key, exc) from None

    def put_bytes(self, data: bytes, key: str, scratch: Path) -> None:
        scratch.write_bytes(data)
        try:
            self.put_file(scratch, key)
        finally:
            scratch.unlink(missing_ok=True)

    def get_bytes(self, key: str) -> bytes | None:
        """A small object's bytes; None if there is none."""
        try:
            with self.fs.open_input_stream(self.path(key), compression=None) as stream:
                return stream.read()
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as exc:
            if "NoSuchKey" in str(exc) or "not found" in str(exc).lower():
                return None
            raise self._failed("reading", key, exc) from None

    def download(self, key: str, target: Path) -> str:
        """Copy an object to a local file; returns the SHA-256 of what was written."""
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            try:
                with self.fs.open_input_stream(self.path(key), compression=None) as stream:
                    while chunk := stream.read(CHUNK):
                        digest.update(chunk)
                        try:
                            out.write(chunk)
                        except OSError as exc:  # this server's disk, not the store: UNAVAILABLE all the same
                            raise _LocalDiskError(
                                f"cannot write {target} ({exc.strerror or exc}): the read server's folder for copies "
                                "of the object store is full or failing; free space or lower read_cache_max_bytes") \
                                from None
            except _LocalDiskError:
                out.close()
                target.unlink(missing_ok=True)
                raise
            except (pa.ArrowException, OSError) as exc:
                out.close()
                target.unlink(missing_ok=True)
                raise self._failed("reading", key, exc) from None
        return digest.hexdigest()

    def size(self, key: str) -> int:
        info = self.fs.get_file_info(self.path(key))
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(key)
        return info.size

    def keys(self, prefix: str) -> list[str]:
        """Keys under a folder (recursively); empty if there is none."""
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True))
        except (pa.ArrowException, OSError) as exc:
            raise self._failed("listing", prefix, exc) from None
        start = len(self.base) + 1
        return sorted(i.path[start:] for i in infos if i.type == pafs.FileType.File)

    def delete(self, key: str) -> None:
        try:
            self.fs.delete_file(self.path(key))
        except FileNotFoundError:
            pass
        except (pa.ArrowException, OSError) as exc:
            raise self._failed("deleting", key, exc) from None


class _LocalDiskError(ServerUnavailableError):
    pass


def _filesystem(url: str, retries: int) -> tuple[pafs.FileSystem, str]:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "s3":
        options = dict(urllib.parse.parse_qsl(parts.query))
        unknown = set(options) - {"endpoint_override", "scheme", "region"}
        if unknown:
            raise ValueError(f"unknown option {sorted(unknown)[0]!r} (known: endpoint_override, scheme, region)")
        if not parts.hostname:
            raise ValueError("no bucket")
        fs = pafs.S3FileSystem(
            access_key=urllib.parse.unquote(parts.username) if parts.username else None,
            secret_key=urllib.parse.unquote(parts.password) if parts.password else None,
            region=options.get("region"), endpoint_override=options.get("endpoint_override"),
            scheme=options.get("scheme", "https"), allow_delayed_open=True, connect_timeout=5, request_timeout=30,
            retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=retries))
        return fs, (parts.hostname + parts.path).rstrip("/")
    if not parts.scheme:
        return pafs.LocalFileSystem(), str(Path(url).resolve())
    fs, base = pafs.FileSystem.from_uri(url)
    return fs, base.rstrip("/")


def object_key(file_path: str, sha256: str) -> str:
    """``archive/<folders>/<stem>-<sha256[:16]>.parquet`` for the archive file ``file_path``."""
    folder, _, name = file_path.rpartition("/")
    stem = name.removesuffix(".parquet")
    return f"archive/{folder}/{stem}-{sha256[:16]}.parquet"


def bars_key(object_key: str) -> str:
    """Where an archive object's hours' 1-minute pre-aggregates are: ``<stem>.bars.arrow`` beside it."""
    return object_key.removesuffix(".parquet") + ".bars.arrow"


BARS_SCHEMA = pa.schema([pa.field("hour_start_us", pa.int64(), nullable=False),
                         pa.field("bars", pa.binary(), nullable=False)])


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PublishReport:
    seq: int | None  # the index published (None: nothing changed)
    uploaded: int  # files
    uploaded_bytes: int
    deleted: int  # objects no index names, past their grace period

    def describe(self) -> str:
        if self.seq is None:
            return f"nothing new to publish; deleted {self.deleted} unreferenced objects" if self.deleted else \
                "nothing new to publish"
        return (f"published index {self.seq} with {self.uploaded} new files ({self.uploaded_bytes:,} bytes); "
                f"deleted {self.deleted} unreferenced objects")


class Publisher:
    """Publishes the recorder's archive and index to ``archive_url`` (see the module docstring)."""

    def __init__(self, settings: StorageSettings, index: Index):
        assert settings.archive_url is not None
        self.settings, self.index = settings, index
        self.objects = ObjectStore(settings.archive_url, settings.object_retries)
        self.scratch = settings.data_root / "publish"
        target = index.publication_target()
        if target != self.objects.url:
            if target is not None:
                log.warning("archive_url changed from %s to %s: every archive file is uploaded to the new store; the "
                            "old one is left as it is", target, self.objects.url)
            index.restart_publication(self.objects.url)
        last = index.last_publication()
        self.seq: int | None = None if last is None else last[0]
        self._lock = threading.Lock()

    def run_once(self, now_us: int | None = None) -> PublishReport:
        with self._lock:
            return self._run(_now_us() if now_us is None else now_us)

    def _run(self, now_us: int) -> PublishReport:
        self.scratch.mkdir(parents=True, exist_ok=True)
        for leftover in self.scratch.iterdir():  # a cut-off run's copies
            leftover.unlink()
        pointer = self.objects.get_bytes(POINTER)
        remote = _pointer_seq(pointer, self.objects.url)
        if pointer is None and self.index.last_publication() is not None:
            log.warning("%s has no %s although index %s was published there: the store was emptied or replaced; "
                        "every archive file is uploaded again", self.objects.url, POINTER, self.seq)
            self.index.restart_publication(self.objects.url)
            self.seq = None
        uploaded, uploaded_bytes = self._upload_files(now_us)
        changes = self.index.changes()
        last = self.index.last_publication()
        seq = None
        if uploaded or last is None or last[1] != changes or (remote or 0) < last[0]:
            seq = max(remote or 0, last[0] if last else 0) + 1
            horizons = self._publish_index(seq, now_us)
            self.index.record_publication(seq, now_us, changes, json.dumps(horizons))
            failpoint("publish.after_record")
            self.seq = seq
        deleted = self._collect(now_us)
        return PublishReport(seq, uploaded, uploaded_bytes, deleted)

    def _upload_files(self, now_us: int) -> tuple[int, int]:
        """Upload every file the index names that is not uploaded as it is now."""
        published = self.index.published_files()
        count = total = 0
        for relative in sorted(self.index.all_archive_paths()):
            local = self.settings.archive_root / relative
            try:
                facts = local.stat()
            except FileNotFoundError:
                continue  # replaced by compaction since the list was read: the next run publishes the new file
            known = published.get(relative)
            if known is not None and known.size_bytes == facts.st_size and known.mtime_ns == facts.st_mtime_ns:
                continue
            sha = file_sha256(local)
            key = object_key(relative, sha)
            size = self.objects.put_file(local, key)
            if size != facts.st_size:
                raise ServerUnavailableError(f"the object store {self.objects.url} holds {size:,} bytes of {key} "
                                             f"after uploading {facts.st_size:,}; it is uploaded again next run")
            bars = self._upload_bars(relative, key)
            failpoint("publish.after_upload")
            self.index.add_published(PublishedFile(relative, key, size, sha, facts.st_mtime_ns, now_us, *bars), now_us)
            count, total = count + 1, total + size
        if count:
            log.info("uploaded %d archive files (%s bytes) to %s", count, f"{total:,}", self.objects.url)
        return count, total

    def _upload_bars(self, relative: str, key: str) -> tuple[int | None, str | None]:
        """Upload the 1-minute pre-aggregates of the file's hours beside it (they would be most of the
        published index: ~4-8 KB an hour); returns the sidecar's (size, SHA-256), or (None, None)."""
        rows = self.index.hour_bars_of_file(relative)
        if not rows:
            return None, None
        table = pa.table({"hour_start_us": [hour for hour, _ in rows], "bars": [blob for _, blob in rows]},
                         schema=BARS_SCHEMA)
        sidecar = self.scratch / "bars.arrow"
        options = pa.ipc.IpcWriteOptions(compression="zstd")  # ~8 KB an hour raw, ~1.7 KB compressed
        with pa.OSFile(str(sidecar), "wb") as sink, pa.ipc.new_file(sink, BARS_SCHEMA, options=options) as writer:
            writer.write_table(table)
        try:
            self.objects.put_file(sidecar, bars_key(key))
            return sidecar.stat().st_size, file_sha256(sidecar)
        finally:
            sidecar.unlink()

    def _publish_index(self, seq: int, now_us: int) -> list[list]:
        """Upload a copy of the index holding only published hours, the manifest, then the pointer."""
        copy = self.scratch / f"index-{seq}.sqlite"
        self.index.backup_to(copy)
        conn = sqlite3.connect(copy, isolation_level=None)
        try:
            uploaded = "SELECT file_path FROM published_files"
            rows = conn.execute(
                "SELECT contract_id, tick_type, MAX(CASE WHEN file_path IN (" + uploaded + ") THEN hour_start_us "
                "END) + 3600000000, MIN(CASE WHEN file_path NOT IN (" + uploaded + ") THEN hour_start_us END) "
                "FROM tick_archives GROUP BY contract_id, tick_type").fetchall()
            horizons = [[cid, tt, until if first_missing is None else min(until or 0, first_missing)]
                        for cid, tt, until, first_missing in rows if until is not None]
            conn.execute("DELETE FROM tick_archives WHERE file_path NOT IN (" + uploaded + ")")
            conn.execute("DELETE FROM published_files WHERE file_path NOT IN (SELECT file_path FROM tick_archives)")
            conn.execute("DELETE FROM hour_bars WHERE (contract_id, tick_type, hour_start_us) IN (SELECT a.contract_id, "
                         "a.tick_type, a.hour_start_us FROM tick_archives a JOIN published_files p USING (file_path) "
                         "WHERE p.bars_sha256 IS NOT NULL)")  # they are in the files' sidecars; expired hours' stay
            for table in ("unreferenced_objects", "superseded_files", "publications"):
                conn.execute(f"DELETE FROM {table}")
            conn.execute("INSERT INTO publications VALUES (?, ?, 0, ?)", (seq, now_us, json.dumps(horizons)))
            manifest = _manifest(conn, self.objects)
            conn.execute("VACUUM")
        finally:
            conn.close()
        packed = self.scratch / f"index-{seq}.sqlite.zst"
        with open(copy, "rb") as source, pa.CompressedOutputStream(str(packed), "zstd") as out:
            shutil.copyfileobj(source, out, CHUNK)
        copy.unlink()
        index_key = f"index/index-{seq:012d}.sqlite.zst"
        self.objects.put_file(packed, index_key)
        failpoint("publish.after_index")
        sink = self.scratch / MANIFEST
        pq.write_table(manifest, sink, compression="zstd")
        self.objects.put_file(sink, MANIFEST)
        sink.unlink()
        failpoint("publish.after_manifest")
        pointer = {"format": POINTER_FORMAT, "seq": seq, "index": index_key, "sha256": file_sha256(packed),
                   "bytes": packed.stat().st_size, "published_at": iso(now_us)}
        packed.unlink()
        self.objects.put_bytes(json.dumps(pointer).encode(), POINTER, self.scratch / "LATEST")
        failpoint("publish.after_pointer")
        log.info("published index %d to %s (%d streams)", seq, self.objects.url, len(horizons))
        return horizons

    def _collect(self, now_us: int) -> int:
        """Forget files the index names no more; delete objects unreferenced for ``retention_grace`` and
        published indexes older than the newest :data:`KEEP_INDEXES`."""
        if self.seq is None:
            return 0
        gone = sorted(set(self.index.published_files()) - self.index.all_archive_paths())
        if gone:
            self.index.unpublish(gone, now_us)
        grace = int(self.settings.retention_grace.total_seconds() * 1_000_000)
        doomed = self.index.unreferenced_objects(now_us - grace)
        for key in doomed:
            self.objects.delete(key)
            self.objects.delete(bars_key(key))
        if doomed:
            self.index.forget_unreferenced(doomed)
        for key in self.objects.keys("index"):
            name = key.rpartition("/")[2]
            if name.startswith("index-") and int(name[6:18]) < self.seq - KEEP_INDEXES:
                self.objects.delete(key)
        return len(doomed)


def _pointer_seq(pointer: bytes | None, url: str) -> int | None:
    """The seq ``index/LATEST`` names; None if there is none, or it cannot be read (it is then replaced)."""
    if pointer is None:
        return None
    try:
        return int(json.loads(pointer)["seq"])
    except (ValueError, KeyError, TypeError):
        log.warning("%s/%s is not an ibstream pointer (%r); it is replaced", url, POINTER, pointer[:80])
        return None


def parse_horizons(text: str) -> dict[tuple[int, str], int]:
    return {(int(cid), str(tt)): int(until) for cid, tt, until in json.loads(text)}


MANIFEST_SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False), pa.field("tick_type", pa.string(), nullable=False),
    pa.field("contract_id", pa.int64(), nullable=False), pa.field("date", pa.string(), nullable=False),
    pa.field("first_ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("last_ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("rows", pa.int64(), nullable=False), pa.field("bytes", pa.int64(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False)])


def _manifest(conn: sqlite3.Connection, objects: ObjectStore) -> pa.Table:
    """One row per object the (published) index names: what outside engines read."""
    rows = conn.execute(
        "SELECT p.object_key, a.tick_type, a.contract_id, MIN(a.hour_start_us), MIN(a.start_us), MAX(a.end_us), "
        "SUM(a.tick_count), p.size_bytes, p.sha256 FROM tick_archives a JOIN published_files p USING (file_path) "
        "GROUP BY p.object_key ORDER BY a.tick_type, a.contract_id, MIN(a.hour_start_us)").fetchall()
    columns = list(zip(*rows)) if rows else [()] * 9
    return pa.table({
        "path": [objects.full_url(k) for k in columns[0]], "tick_type": list(columns[1]),
        "contract_id": list(columns[2]), "date": [f"{from_us(h):%Y-%m-%d}" for h in columns[3]],
        "first_ts": list(columns[4]), "last_ts": list(columns[5]), "rows": list(columns[6]),
        "bytes": list(columns[7]), "sha256": list(columns[8])}, schema=MANIFEST_SCHEMA)


class ReadCache:
    """Downloaded archive objects in a local folder, at most ``max_bytes`` (least recently used go first).

    Objects never change (their names hold their hash), so a cached copy is never stale; each is
    checked against its published SHA-256 when it is downloaded."""

    def __init__(self, objects: ObjectStore, root: Path, max_bytes: int):
        self.objects, self.root, self.max_bytes = objects, root, max_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fetching: dict[str, threading.Lock] = {}
        self._sizes: dict[Path, int] = {}
        for path in root.rglob("*"):
            if path.is_file():
                if path.name.endswith(".part"):
                    path.unlink()  # a download cut off
                else:
                    self._sizes[path] = path.stat().st_size
        self.hits = self.misses = self.downloaded_bytes = 0

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(self._sizes.values())

    def fetch(self, key: str, size: int, sha256: str) -> Path:
        path = self.root / key
        with self._lock:
            gate = self._fetching.setdefault(key, threading.Lock())
        with gate:
            if path.exists():
                os.utime(path)
                self.hits += 1
                return path
            self.misses += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            part = path.with_name(f"{path.name}.{uuid.uuid4().hex}.part")
            digest = self.objects.download(key, part)
            if digest != sha256 or part.stat().st_size != size:
                got = part.stat().st_size
                part.unlink()
                raise CorruptFileError(
                    f"the object {key} in {self.objects.url} does not match its published SHA-256 ({got:,} bytes, "
                    f"{size:,} expected); it was damaged in the store: the recording host still has the file "
                    "(run `ibstream verify` there; the next publication uploads a sound copy under a new name)")
            os.replace(part, path)
            self.downloaded_bytes += size
            with self._lock:
                self._sizes[path] = size
                self._fetching.pop(key, None)
            self._evict(keep=path)
            return path

    def _evict(self, keep: Path) -> None:
        with self._lock:
            total = sum(self._sizes.values())
            if total <= self.max_bytes:
                return
            order = sorted(self._sizes, key=lambda p: p.stat().st_mtime_ns if p.exists() else 0)
            for path in order:
                if total <= self.max_bytes:
                    break
                if path == keep:
                    continue
                total -= self._sizes.pop(path)
                path.unlink(missing_ok=True)  # a reader that has it open keeps reading it (POSIX)


class Replica:
    """A read server's view of a published archive: the newest published index, installed into the
    local ``index.sqlite``, and the files it names, downloaded on demand into :class:`ReadCache`."""

    def __init__(self, settings: StorageSettings, index: Index, on_refresh: Callable[[], None] = lambda: None):
        assert settings.archive_url is not None
        self.settings, self.index, self.on_refresh = settings, index, on_refresh
        self.objects = ObjectStore(settings.archive_url, settings.object_retries)
        self.cache = ReadCache(self.objects, settings.data_root / "objects", settings.read_cache_max_bytes)
        last = index.last_publication()
        self.seq: int | None = None if last is None else last[0]
        self._lock = threading.Lock()

    def refresh(self) -> bool:
        """Install the newest published index if it is newer than ours; returns whether it was."""
        with self._lock:
            raw = self.objects.get_bytes(POINTER)
            if raw is None:
                raise ServerUnavailableError(f"nothing is published at {self.objects.url} yet (no {POINTER}); start "
                                             "the recorder with this archive_url, or check the URL")
            try:
                pointer = json.loads(raw)
                seq, key, sha = int(pointer["seq"]), str(pointer["index"]), str(pointer["sha256"])
            except (ValueError, KeyError, TypeError):
                raise CorruptFileError(f"{self.objects.url}/{POINTER} is not an ibstream pointer: {raw[:80]!r}; "
                                       "the recorder rewrites it at its next publication") from None
            if self.seq is not None and seq <= self.seq:
                return False
            work = self.settings.data_root / "replica"
            work.mkdir(parents=True, exist_ok=True)
            packed, unpacked = work / "index.sqlite.zst", work / "index.sqlite"
            try:
                if self.objects.download(key, packed) != sha:
                    raise CorruptFileError(f"the published index {key} in {self.objects.url} does not match the "
                                           "SHA-256 its pointer names; the recorder's next publication replaces it")
                with pa.CompressedInputStream(pa.OSFile(str(packed)), "zstd") as source, open(unpacked, "wb") as out:
                    shutil.copyfileobj(source, out, CHUNK)
                self._install(unpacked, key)
            finally:
                packed.unlink(missing_ok=True)
                unpacked.unlink(missing_ok=True)
            self.seq = seq
        self.on_refresh()
        log.info("serving index %d of %s (published %s)", seq, self.objects.url, pointer.get("published_at", "?"))
        return True

    def _install(self, copy: Path, key: str) -> None:
        source = sqlite3.connect(copy)
        try:
            try:
                problems = source.execute("PRAGMA quick_check").fetchall()
                source.execute("SELECT COUNT(*) FROM published_files").fetchone()
            except sqlite3.DatabaseError as exc:
                problems = [(str(exc),)]
            if problems != [("ok",)]:
                raise CorruptFileError(f"the published index {key} in {self.objects.url} is not a sound ibstream "
                                       f"index ({problems[0][0][:200]}); the recorder's next publication replaces it")
            target = sqlite3.connect(self.index.path, timeout=30)
            try:
                source.backup(target)  # one transaction: queries see the old index or the new one
            finally:
                target.close()
        finally:
            source.close()

    def require(self, seq: int) -> None:
        if self.seq is not None and self.seq >= seq:
            return
        try:
            self.refresh()
        except (ServerUnavailableError, StorageError) as exc:
            log.info("cannot catch up to index %d: %s", seq, exc)
        if self.seq is None or self.seq < seq:
            raise ServerUnavailableError(f"this read server has index {self.seq}, the ticket was planned on index "
                                         f"{seq}, which is not readable here yet; try another location or again")

    def hour_bars(self, contract_id: int, tick_type: str, start_us: int, end_us: int) -> dict[int, bytes]:
        """The 1-minute pre-aggregates of the stream's hours in [start_us, end_us): from the sidecars of
        their files (downloaded into the cache like them), and expired hours' from the index."""
        found = self.index.hour_bars(contract_id, tick_type, start_us, end_us)
        hours_of: dict[str, set[int]] = {}  # a day file's sidecar may hold an hour a backfill moved out of it since
        for entry in self.index.archives(contract_id, tick_type, start_us, end_us):
            hours_of.setdefault(entry.file_path, set()).add(entry.hour_start_us)
        for relative, hours in hours_of.items():
            published = self.index.published_file(relative)
            if published is None or published.bars_sha256 is None or published.bars_size is None:
                continue
            path = self.cache.fetch(bars_key(published.object_key), published.bars_size, published.bars_sha256)
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_file(source).read_all()
            for hour, blob in zip(table["hour_start_us"].to_pylist(), table["bars"].to_pylist()):
                if hour in hours and start_us <= hour < end_us:
                    found[hour] = blob
        return found

    def fetch(self, relative: str) -> Path:
        """The local copy of the archive file ``relative`` (downloaded if needed)."""
        published = self.index.published_file(relative)
        if published is None:
            raise StorageError(f"the published index names {relative} in tick_archives but not in published_files; "
                               "the recorder's next publication replaces it")
        return self.cache.fetch(published.object_key, published.size_bytes, published.sha256)


def check_replica_root(data_root: Path) -> None:
    """A read server's data root holds only copies: refuse a recorder's (its index would be overwritten)."""
    marker = data_root / REPLICA_MARKER
    if marker.exists():
        return
    if (data_root / "buffer").exists() or (data_root / "index.sqlite").exists() or (data_root / "archive").exists():
        raise InvalidConfigError(
            f"data_root {data_root} holds a recorder's store; a read server (replica) keeps its own copies and would "
            "overwrite its index: give it an empty folder with --data-root")
    data_root.mkdir(parents=True, exist_ok=True)
    marker.write_text("A read server's cache of a published ibstream archive (safe to delete).\n")


__all__ = ["BARS_SCHEMA", "MANIFEST", "POINTER", "ObjectStore", "PublishReport", "Publisher", "ReadCache", "Replica",
           "bars_key", "check_replica_root", "object_key", "parse_horizons", "redacted_url"]
