"""Settings: one pydantic-settings class, environment prefix ``IBSTREAM_``.

Every field can be set by keyword or by environment variable, e.g.
``IBSTREAM_DATA_ROOT=/srv/ticks`` or ``IBSTREAM_ROTATION_INTERVAL=PT5M`` (durations are ISO-8601,
e.g. ``PT5M``, ``PT30S``, ``P31D``). The defaults run out of the box.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the recorder, the store and the Flight server."""

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
        9, description="Codec level (zstd 1-22); None for the codec's default."
    )
    flight_host: str = Field("127.0.0.1", description="Interface the Flight server binds to.")
    flight_port: int = Field(8815, ge=0, le=65535, description="Flight server port; 0 picks a free one.")
    max_query_span: timedelta = Field(
        timedelta(days=31), description="Longest [start, end) a single query may cover."
    )
    max_query_rows: int = Field(
        200_000_000, gt=0, description="Largest estimated row count a single query may return."
    )
    batch_rows: int = Field(
        32_768, gt=0,
        description="Largest record batch the server sends, in rows: 32,768 bid_ask rows are ~2 MB, well under "
        "gRPC's default 4 MiB message limit of Go/Rust/Java clients.",
    )

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

    @property
    def flight_location(self) -> str:
        return f"grpc://{self.flight_host}:{self.flight_port}"
