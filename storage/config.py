"""What the store needs to know: where it lives, how segments rotate and commit, how hours archive.

:class:`StorageSettings` is the part of :class:`ibstream.settings.Settings` that storage reads;
the app's settings extend it, so a ``Settings`` is always a ``StorageSettings``. Environment
prefix ``IBSTREAM_`` as for every setting; durations are ISO-8601 (``PT5M``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class RetentionRule(BaseModel):
    """How long the raw ticks of the streams it names are kept: ``contract_id`` and ``tick_type``
    narrow it (left out: every contract, every tick type). Their 1-minute pre-aggregates (bars of
    1m and up), daily statistics and coverage are kept for ever.

    JSON, e.g. ``{"ticks_days": 90}`` (every stream) or
    ``{"contract_id": 265598, "tick_type": "bid_ask", "ticks_days": 30}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contract_id: int | None = Field(None, gt=0, le=2**31 - 1)
    tick_type: Literal["bid_ask", "last", "all_last", "mid_point"] | None = None
    ticks_days: int = Field(ge=1, le=36_600, description="Days after an hour ends that its raw ticks are kept.")

    @property
    def specificity(self) -> int:
        return (self.contract_id is not None) * 2 + (self.tick_type is not None)


class StorageSettings(BaseSettings):
    """Configuration of the store: segments, archive, index, result cache, scrubbing."""

    model_config = SettingsConfigDict(env_prefix="IBSTREAM_", extra="forbid", frozen=True)

    data_root: Path = Field(
        Path("data"),
        description="Root folder of the store: buffer/ (IPC segments), archive/ (Parquet), index.sqlite.",
    )
    rotation_interval: timedelta = Field(
        timedelta(minutes=15),
        description="Segments rotate at UTC multiples of this interval; it must divide one hour.",
    )
    segment_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="A segment also rotates once it grows past this many bytes."
    )
    fsync: Literal["batch", "none"] = Field(
        "batch",
        description=(
            "'batch': a batch is acknowledged after fsync (survives power loss). "
            "'none': acknowledged after write(2) (survives a process crash, not an OS crash)."
        ),
    )
    archive_delay: timedelta = Field(
        timedelta(minutes=1),
        description="An hour is archived to Parquet once it ended this long ago (wall clock).",
    )
    archive_check_interval: timedelta = Field(
        timedelta(seconds=30), description="How often the background archiver looks for closed hours."
    )
    parquet_compression: Literal["zstd", "snappy", "lz4", "gzip", "none"] = Field(
        "zstd", description="Parquet codec for archived hours (see bench/bench_storage.py)."
    )
    parquet_compression_level: int | None = Field(
        15, description="Codec level (zstd 1-22); None for the codec's default. Changing it changes the files "
        "written from then on only; every level reads the same (see bench/bench_storage.py)."
    )
    cache_max_bytes: int = Field(
        1024 * 1024 * 1024, ge=0,
        description="Size bound of the result cache (Arrow bytes) for queries over archived (closed) ranges; 0 "
        "disables it. One result is cached only if it takes at most a quarter of this.")
    cache_ttl: timedelta = Field(timedelta(minutes=5), description="A cached result is dropped this long after it was computed.")
    batch_rows: int = Field(
        32_768, gt=0,
        description="Largest record batch the server sends, in rows: 32,768 bid_ask rows are ~2 MB, well under "
        "gRPC's default 4 MiB message limit of Go/Rust/Java clients.",
    )
    scrub_interval: timedelta = Field(
        timedelta(minutes=5),
        description="The recording process checks a few archive files this often (page CRCs, counts, ts order), in "
        "turn, so damage is found and quarantined without waiting for `ibstream verify`; 0 turns it off.")
    scrub_files: int = Field(10, gt=0, description="Archive files checked per scrub run.")
    retention: tuple[RetentionRule, ...] = Field(
        (), description="Raw-tick retention, JSON: IBSTREAM_RETENTION='[{\"ticks_days\": 90}]' keeps ticks 90 days "
        "and 1-minute bars (and up), statistics and coverage for ever. The most specific rule of a stream wins "
        "(contract and tick type, then contract, then tick type, then neither). Default: keep everything.")
    retention_check_interval: timedelta = Field(
        timedelta(hours=1), description="How often the recording process expires ticks past their retention.")
    retention_grace: timedelta = Field(
        timedelta(minutes=5), description="An expired hour's file (and an hourly file compaction replaced) is "
        "deleted this long after the index stopped naming it, so a reader that planned it just before still reads "
        "it whole.")
    warm_recent: timedelta = Field(
        timedelta(hours=2), description="At start, a server reads this much of each stream's newest ticks (and the "
        "current regular session) once in the background, so the first queries find them decoded; 0 turns it off.")
    compact_check_interval: timedelta = Field(
        timedelta(hours=1), description="How often the recording process merges closed UTC days of hourly archive "
        "files into one file per stream and day (row groups per hour); 0 turns it off (`ibstream compact` still "
        "works).")
    compact_delay: timedelta = Field(
        timedelta(hours=1), description="A UTC day is compacted once it ended this long ago and every hour of it "
        "is archived.")
    live_notify: bool = Field(
        True, description="A server on a store another process records into wakes its live streams on each "
        "acknowledged batch (inotify on the stream's folder) instead of waiting for live_poll_interval; it polls "
        "where that is not available (not Linux, another host's NFS, an older recorder). False: poll only.")

    archive_url: str | None = Field(
        None, description="Object store the recorder publishes sealed hours and its index to, e.g. "
        "'s3://bucket/ibstream?endpoint_override=127.0.0.1:9000&scheme=http&region=us-east-1' (keys from "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the URL's user:password), 'gs://bucket/prefix' or "
        "'file:///mnt/share/ibstream'; read servers (`ibstream serve --replica`) serve it. Unset: local only.")
    replica: bool = Field(
        False, description="Serve the archive published at archive_url instead of a recorder's data root: data_root "
        "is then this server's own cache (index copy and downloaded files); nothing is recorded here.")
    publish_interval: timedelta = Field(
        timedelta(minutes=1), description="How often the recording process publishes newly archived hours and its "
        "index to archive_url.")
    replica_refresh_interval: timedelta = Field(
        timedelta(seconds=30), description="How often a read server looks for a newer published index.")
    read_cache_max_bytes: int = Field(
        10 * 1024**3, gt=0, description="A read server keeps downloaded archive files in data_root/objects/ up to "
        "this many bytes (least recently used go first).")
    object_retries: int = Field(
        6, ge=1, le=50, description="Attempts per object-store request (503 SlowDown, timeouts, resets) before it "
        "fails; backoff doubles from 25 ms.")

    @model_validator(mode="after")
    def _replica_source(self) -> "StorageSettings":
        if self.replica and not self.archive_url:
            raise ValueError("replica is set but archive_url is not: a read server serves the archive a recorder "
                             "publishes there; set IBSTREAM_ARCHIVE_URL (e.g. s3://bucket/ibstream)")
        return self

    @field_validator("retention")
    @classmethod
    def _distinct_rules(cls, value: tuple[RetentionRule, ...]) -> tuple[RetentionRule, ...]:
        scopes = [(r.contract_id, r.tick_type) for r in value]
        if len(set(scopes)) != len(scopes):
            raise ValueError("retention names the same contract and tick type twice; keep one rule per scope")
        return value

    def ticks_days(self, contract_id: int, tick_type: str) -> int | None:
        """Days the raw ticks of a stream are kept (None: for ever), by its most specific rule."""
        rules = [r for r in self.retention if r.contract_id in (None, contract_id) and r.tick_type in (None, tick_type)]
        return max(rules, key=lambda r: r.specificity).ticks_days if rules else None

    @field_validator("rotation_interval")
    @classmethod
    def _divides_hour(cls, value: timedelta) -> timedelta:
        micros = value // timedelta(microseconds=1)
        if micros <= 0 or micros % 1_000_000 or 3_600_000_000 % micros:
            raise ValueError(
                f"rotation_interval was {value}; it must be whole seconds and divide one hour exactly "
                "(e.g. 5s, 1m, 5m, 15m, 30m, 1h) so that segments never straddle an hour"
            )
        return value

    @property
    def buffer_root(self) -> Path:
        return self.data_root / "buffer"

    @property
    def archive_root(self) -> Path:
        return self.data_root / "archive"

    @property
    def index_path(self) -> Path:
        return self.data_root / "index.sqlite"
