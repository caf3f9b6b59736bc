"""Settings: one pydantic-settings class, environment prefix ``IBSTREAM_``.

Every field can be set by keyword or by environment variable, e.g.
``IBSTREAM_DATA_ROOT=/srv/ticks`` or ``IBSTREAM_ROTATION_INTERVAL=PT5M`` (durations are ISO-8601,
e.g. ``PT5M``, ``PT30S``, ``P31D``). The defaults run out of the box.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, time, timedelta
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from ibstream.storage.config import StorageSettings

TickTypeName = Literal["bid_ask", "last", "all_last", "mid_point"]  # storage.schemas.TickType values


class ContractSpec(BaseModel):
    """One contract to record, by IB ``con_id`` or by symbol (resolved with ``reqContractDetails``).

    JSON, e.g. ``{"con_id": 265598, "tick_types": ["bid_ask", "last"]}`` or
    ``{"symbol": "MNQ", "sec_type": "FUT", "exchange": "CME", "expiry": "202612"}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    con_id: int | None = Field(None, gt=0, description="IB contract id; enough on its own.")
    symbol: str | None = Field(None, min_length=1, description="Symbol, e.g. AAPL or MNQ (when no con_id).")
    sec_type: str = Field("STK", description="STK, FUT, CASH, IND, ... (with symbol).")
    exchange: str = Field("", description="Exchange to subscribe on, e.g. SMART or CME; '' takes IB's.")
    currency: str = Field("USD", description="Currency (with symbol).")
    expiry: str = Field("", description="YYYYMM or YYYYMMDD for futures and options (with symbol).")
    tick_types: tuple[TickTypeName, ...] = Field(
        ("bid_ask", "last"), min_length=1,
        description="Any of bid_ask, last, all_last, mid_point (IB's BidAsk, Last, AllLast, MidPoint).")
    roll_days_before_expiry: int | None = Field(
        None, ge=0, le=365, description="A future by symbol without expiry rolls to the next expiry this many "
        "calendar days before the last trade date (unset: the roll_days_before_expiry setting).")
    roll_time: time | None = Field(
        None, description="Wall time of the roll in the exchange's zone, e.g. 17:00 (unset: the roll_time setting).")

    @model_validator(mode="after")
    def _named(self) -> "ContractSpec":
        if self.con_id is None and self.symbol is None:
            raise ValueError("a contract needs a con_id (e.g. 265598) or a symbol (e.g. AAPL with sec_type STK)")
        if len(set(self.tick_types)) != len(self.tick_types):
            raise ValueError(f"tick_types lists a type twice: {list(self.tick_types)}")
        if not self.rolls and (self.roll_days_before_expiry is not None or self.roll_time is not None):
            raise ValueError(f"{self.describe()} does not roll: roll_days_before_expiry and roll_time apply to a "
                             "future given by symbol with sec_type FUT and no expiry or con_id")
        return self

    @property
    def rolls(self) -> bool:
        """A future by symbol without expiry: recorded as its front contract, rolled automatically."""
        return self.con_id is None and self.sec_type.upper() == "FUT" and not self.expiry

    def describe(self) -> str:
        if self.con_id is not None:
            return f"conId {self.con_id}"
        return " ".join(part for part in (self.symbol, self.sec_type, self.expiry, self.exchange, self.currency) if part)


class TokenSpec(BaseModel):
    """A bearer token as the server keeps it: a name, a role (read or admin) and the token's SHA-256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, pattern=r"^\S+$")
    role: Literal["read", "admin"]
    sha256: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="`ibstream token` prints it; never the token.")


class ShardSpec(BaseModel):
    """Read servers a coordinator sends part of the queries to: ``locations`` serve the ``contract_ids``
    (left out: every contract) over ``[start, end)`` (left out: unbounded). JSON, e.g.
    ``{"locations": ["grpc://10.0.0.2:8815", "grpc://10.0.0.3:8815"], "contract_ids": [265598]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    locations: tuple[str, ...] = Field(min_length=1, description="Flight locations, tried in this order.")
    contract_ids: tuple[int, ...] | None = None
    start: datetime | None = None
    end: datetime | None = None

    @field_validator("locations")
    @classmethod
    def _flight_uris(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for location in value:
            if not location.startswith(("grpc://", "grpc+tcp://", "grpc+tls://")) or "://" == location[-3:]:
                raise ValueError(f"shard location {location[:100]!r} is not a Flight URI; use grpc://host:port or "
                                 "grpc+tls://host:port")
        return value

    @model_validator(mode="after")
    def _range(self) -> "ShardSpec":
        for name, when in (("start", self.start), ("end", self.end)):
            if when is not None and when.tzinfo is None:
                raise ValueError(f"shard {name} {when.isoformat()} has no time zone; add one, e.g. Z for UTC")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"shard range is empty: start {self.start.isoformat()} is not before end "
                             f"{self.end.isoformat()}")
        return self


class Settings(StorageSettings):
    """Configuration of the recorder, the store (:class:`~ibstream.storage.config.StorageSettings`) and the
    Flight server."""

    model_config = SettingsConfigDict(env_prefix="IBSTREAM_", extra="forbid", frozen=True)

    flight_host: str = Field(
        "127.0.0.1", description="Interface the Flight server binds to. Another than loopback needs TLS and tokens "
        "(or allow_insecure).")
    flight_port: int = Field(8815, ge=0, le=65535, description="Flight server port; 0 picks a free one.")
    tls_cert_file: Path | None = Field(
        None, description="PEM certificate chain of the Flight server; with tls_key_file it serves grpc+tls://.")
    tls_key_file: Path | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM root certificates of client certificates: set, every client must present a "
        "certificate they signed (mutual TLS).")
    tokens: tuple[TokenSpec, ...] = Field(
        (), description="Bearer tokens as JSON, stored hashed: IBSTREAM_TOKENS='[{\"name\": \"alice\", \"role\": "
        "\"read\", \"sha256\": \"sha256:...\"}]' (`ibstream token` makes one). Any token given: every call needs one.")
    token_file: Path | None = Field(
        None, description="A file of tokens, one '<name> <role> sha256:<hex>' per line (`ibstream token --token-file`).")
    max_streams_per_token: int = Field(
        16, gt=0, description="With tokens: most do_get streams one token may hold at once (of max_streams).")
    allow_insecure: bool = Field(
        False, description="Serve another address than loopback without TLS or tokens (warned about at start).")
    max_query_span: timedelta = Field(
        timedelta(days=31), description="Longest [start, end) a single query may cover."
    )
    max_query_rows: int = Field(
        200_000_000, gt=0, description="Largest estimated row count a single query may return."
    )
    max_bar_span: timedelta = Field(
        timedelta(days=366), description="Longest [start, end) a query for bars (any resolution but tick) may cover.")
    max_bars: int = Field(
        10_000_000, gt=0, description="Most bars one query may ask for: span / resolution (and filled rows).")
    max_streams: int = Field(
        64, gt=0, description="Most do_get streams served from ibstream.storage or live at once; past it a do_get is refused "
        "with UNAVAILABLE ('server busy'), so memory stays bounded. Cached results do not count.")
    live_queue_rows: int = Field(
        500_000, gt=0, description="Ticks a live reader may fall behind the recorder before it is dropped (it resumes "
        "from its cursor); bounds each live stream's memory.")
    live_poll_interval: timedelta = Field(
        timedelta(milliseconds=50),
        description="A server on a store another process records into reads new ticks for live streams at least "
        "this often (woken sooner by each acknowledgement where inotify works: live_notify).")
    ib_host: str = Field("127.0.0.1", description="Host of TWS / IB Gateway (or `ibstream simulate`).")
    ib_port: int = Field(
        4002, ge=1, le=65535,
        description="API port: IB Gateway 4001 live / 4002 paper, TWS 7496 live / 7497 paper.")
    ib_client_id: int = Field(
        17, ge=0, description="API client id; must be unique per gateway (error 326 moves to the next one).")
    contracts: tuple[ContractSpec, ...] = Field(
        (ContractSpec(con_id=711280073), ContractSpec(con_id=265598)),
        description="What to record, as JSON: IBSTREAM_CONTRACTS='[{\"con_id\": 265598, \"tick_types\": "
        "[\"bid_ask\", \"last\"]}]'. Default: MNQ Dec-2026 and AAPL, bid_ask and last.")
    ib_connect_timeout: timedelta = Field(
        timedelta(seconds=10), description="Give up a connection attempt (handshake + nextValidId) after this.")
    ib_reconnect_initial: timedelta = Field(
        timedelta(seconds=1), description="First wait before reconnecting; doubles per failed attempt.")
    ib_reconnect_max: timedelta = Field(timedelta(seconds=60), description="Longest wait between reconnects.")
    ib_heartbeat: timedelta = Field(
        timedelta(seconds=10),
        description="After this long without any message, ask the gateway for its time; after 3x, reconnect.")
    ib_resubscribe_pause: timedelta = Field(
        timedelta(seconds=15),
        description="Least time between two requests for the same stream (IB: one per instrument per 15 s).")
    ib_limit_retry: timedelta = Field(
        timedelta(seconds=60), description="Retry a stream refused with 10190 (tick-by-tick limit) after this.")
    ib_reconnect_delay: timedelta = Field(
        timedelta(0), description="Wait before the first reconnect after a connection that was up at least "
        "ib_reconnect_stable drops (0: at once); failed attempts then back off from ib_reconnect_initial.")
    ib_reconnect_stable: timedelta = Field(
        timedelta(seconds=5), description="A connection up this long counts as good: when it drops, reconnect after "
        "ib_reconnect_delay and restart the backoff. One that drops sooner counts as a failed attempt.")
    market_data_fallback: bool = Field(
        False, description="Record a stream IB refuses tick-by-tick (its limit, 10190) from reqMktData quotes and "
        "trades meanwhile (coverage: recorded, reason market_data_fallback), back to tick-by-tick once a line frees.")
    roll_days_before_expiry: int = Field(
        8, ge=0, le=365, description="A future given by symbol without expiry rolls this many calendar days before "
        "its last trade date (per contract: ContractSpec.roll_days_before_expiry).")
    roll_time: time = Field(
        time(17), description="Wall time of a roll in the exchange's zone (17:00: the Globex open).")
    roll_overlap: timedelta = Field(
        timedelta(minutes=10), description="Record both expiries from this long before a roll to this long after it "
        "(both count against the tick-by-tick limit meanwhile).")
    flush_interval: timedelta = Field(
        timedelta(milliseconds=5), description="Group commit: the first tick after a quiet spell is appended and "
        "fsynced at once; while ticks keep coming, flushes start at most this often (5 ms: tick -> acknowledged "
        "p99 under 15 ms at 5,000 ticks/s, bench/bench_ingest.py).")
    backfill_enabled: bool = Field(
        True, description="While recording from TWS / IB Gateway, fill coverage gaps from IB's historical ticks "
        "every backfill_interval (proto_docs/backfill.md); `ibstream backfill` does one run by hand.")
    backfill_interval: timedelta = Field(
        timedelta(minutes=10), description="How often the recording process backfills gaps (from one interval "
        "after it starts).")
    backfill_client_id: int | None = Field(
        None, ge=0, description="API client id of the backfill's own connection (unset: ib_client_id + 100), so "
        "it never disturbs the recorder's tick-by-tick connection.")
    backfill_max_requests: int = Field(
        50, gt=0, description="A run starts no new gap once it has sent this many historical requests (a gap "
        "begun is finished); with the 10-minute interval this stays under IB's 60 requests in 10 minutes.")
    backfill_max_age: timedelta = Field(
        timedelta(days=7), description="Gaps that ended longer ago than this are not backfilled.")
    backfill_request_timeout: timedelta = Field(
        timedelta(seconds=60), description="A historical request IB has not answered after this ends the run (the "
        "gap stays a gap and is tried again on the next run).")
    backfill_pacing_backoff: timedelta = Field(
        timedelta(seconds=10), description="First extra wait after IB's pacing violation (162) before the page is "
        "asked again; doubles per violation in a row, up to backfill_pacing_window.")
    backfill_pacing_identical: timedelta = Field(
        timedelta(seconds=15), description="IB pacing: no identical historical request within this.")
    backfill_pacing_burst_window: timedelta = Field(
        timedelta(seconds=2), description="IB pacing: at most backfill_pacing_burst_limit requests for one "
        "contract and whatToShow within this.")
    backfill_pacing_burst_limit: int = Field(5, ge=1, description="IB pacing: see backfill_pacing_burst_window.")
    backfill_pacing_window: timedelta = Field(
        timedelta(minutes=10), description="IB pacing: at most backfill_pacing_window_limit requests (BID_ASK "
        "counting 2) within this.")
    backfill_pacing_window_limit: int = Field(60, ge=2, description="IB pacing: see backfill_pacing_window.")
    backfill_pacing_max_open: int = Field(50, ge=1, description="IB pacing: historical requests open at once.")

    max_held_ticks: int = Field(
        2_000_000, gt=0,
        description="Ticks per stream the recorder holds in memory while storage refuses them (disk full, I/O "
        "error); past it the newest ticks are dropped, counted, and coverage gets a 'storage_unavailable' gap.")
    storage_retry_max: timedelta = Field(
        timedelta(seconds=5),
        description="While storage is unavailable the recorder retries after flush_interval, doubling per failed "
        "attempt up to this.")
    storage_summary_interval: timedelta = Field(
        timedelta(seconds=30),
        description="While storage is unavailable or ticks are dropped, the recorder logs one summary line this often.")
    disk_warn_free_bytes: int = Field(
        1024**3, ge=0,
        description="The recorder warns once when free space on the data root falls below this (and says when it "
        "recovers); checked about every 10 s. 0 disables the check.")
    monitoring_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the HTTP monitoring endpoints (GET /metrics for Prometheus, GET /health); unset: off; "
        "0 picks a free one. Same access rules as Flight: tokens (any role) when configured, TLS with tls_cert_file.")
    monitoring_host: str = Field(
        "127.0.0.1", description="Interface the monitoring endpoints bind to. Another than loopback needs TLS and "
        "tokens (or allow_insecure).")
    http_port: int | None = Field(
        None, ge=0, le=65535,
        description="Port of the HTTP gateway (REST + Server-Sent Events over the same store and limits as Flight, "
        "IB-Stream's v2 URLs; proto_docs/http-gateway.md); unset: off; 0 picks a free one. Same access rules as "
        "Flight: tokens (their roles) when configured, TLS with tls_cert_file.")
    http_host: str = Field(
        "127.0.0.1", description="Interface the HTTP gateway binds to. Another than loopback needs TLS and tokens "
        "(or allow_insecure).")
    health_silence_threshold: timedelta = Field(
        timedelta(minutes=5),
        description="GET /health fails (503) when a stream inside its trading session has had no tick for longer "
        "than this, or the IB connection has been down for longer than this.")
    shards: tuple[ShardSpec, ...] = Field(
        (), description="Make this server a coordinator: get_flight_info sends the published part of each tick "
        "query to these read servers (endpoint locations, replicas in order), as JSON: IBSTREAM_SHARDS='[{\"locations\": "
        "[\"grpc://10.0.0.2:8815\"]}]'. What is not published yet, bars and live streams stay here.")
    stop_flush_timeout: timedelta = Field(
        timedelta(seconds=10),
        description="On stop, how long the final flush keeps retrying while storage is unavailable before it gives "
        "up and reports the held ticks it could not store.")

    @field_validator("contracts")
    @classmethod
    def _distinct_contracts(cls, value: tuple[ContractSpec, ...]) -> tuple[ContractSpec, ...]:
        names = [spec.describe() for spec in value]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise ValueError(f"contracts lists {', '.join(twice)} more than once; merge their tick_types")
        return value

    @field_validator("ib_reconnect_delay", "ib_reconnect_stable", "roll_overlap")
    @classmethod
    def _not_negative(cls, value: timedelta, info) -> timedelta:
        if value < timedelta(0):
            raise ValueError(f"{info.field_name} must not be negative, e.g. PT0S or PT10M; got {value}")
        return value

    @field_validator("health_silence_threshold")
    @classmethod
    def _positive_threshold(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError(f"the health silence threshold must be longer than zero, e.g. PT5M (5 minutes); got "
                             f"{value}")
        return value

    @classmethod
    def of(cls, storage: StorageSettings) -> "Settings":
        """``storage`` itself when it is the app's settings, else the app's defaults (and ``IBSTREAM_*``
        variables) around those storage settings: what a server or recorder given only a store uses."""
        return storage if isinstance(storage, cls) else cls(**dict(storage))

    @model_validator(mode="after")
    def _access(self) -> "Settings":
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("TLS needs both tls_cert_file and tls_key_file (PEM); give both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs the server's own tls_cert_file and tls_key_file")
        if not self.loopback and not self.allow_insecure and not (self.tls and self.authenticated):
            missing = " and ".join(part for part, given in (("TLS (IBSTREAM_TLS_CERT_FILE, IBSTREAM_TLS_KEY_FILE)",
                                                              self.tls),
                                                             ("tokens (IBSTREAM_TOKEN_FILE or IBSTREAM_TOKENS)",
                                                              self.authenticated)) if not given)
            raise ValueError(f"flight_host {self.flight_host} is not a loopback address: serving it needs {missing}, "
                             "or IBSTREAM_ALLOW_INSECURE=true to serve it unprotected")
        if self.monitoring_port is not None:
            if not self.monitoring_loopback and not self.allow_insecure and not (self.tls and self.authenticated):
                missing = " and ".join(part for part, given in (
                    ("TLS (IBSTREAM_TLS_CERT_FILE, IBSTREAM_TLS_KEY_FILE)", self.tls),
                    ("tokens (IBSTREAM_TOKEN_FILE or IBSTREAM_TOKENS)", self.authenticated)) if not given)
                raise ValueError(f"monitoring_host {self.monitoring_host} is not a loopback address: serving /metrics "
                                 f"and /health there needs {missing}, or IBSTREAM_ALLOW_INSECURE=true to serve them "
                                 "unprotected")
            if self.monitoring_port and self.monitoring_port == self.flight_port:
                raise ValueError(f"monitoring_port {self.monitoring_port} is the Flight server's port too; pick "
                                 "another (0: any free port)")
        if self.http_port is not None:
            if not self.http_loopback and not self.allow_insecure and not (self.tls and self.authenticated):
                missing = " and ".join(part for part, given in (
                    ("TLS (IBSTREAM_TLS_CERT_FILE, IBSTREAM_TLS_KEY_FILE)", self.tls),
                    ("tokens (IBSTREAM_TOKEN_FILE or IBSTREAM_TOKENS)", self.authenticated)) if not given)
                raise ValueError(f"http_host {self.http_host} is not a loopback address: serving the HTTP gateway "
                                 f"there needs {missing}, or IBSTREAM_ALLOW_INSECURE=true to serve it unprotected")
            if self.http_port and self.http_port in (self.flight_port, self.monitoring_port):
                other = "the Flight server's" if self.http_port == self.flight_port else "monitoring_port's"
                raise ValueError(f"http_port {self.http_port} is {other} port too; pick another (0: any free port)")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def authenticated(self) -> bool:
        return bool(self.tokens) or self.token_file is not None

    @property
    def loopback(self) -> bool:
        """Whether the Flight server binds a loopback address only (reachable from this machine alone)."""
        return _is_loopback(self.flight_host)

    @property
    def monitoring_loopback(self) -> bool:
        """Whether the monitoring endpoints bind a loopback address only."""
        return _is_loopback(self.monitoring_host)

    @property
    def http_loopback(self) -> bool:
        """Whether the HTTP gateway binds a loopback address only."""
        return _is_loopback(self.http_host)

    @property
    def flight_location(self) -> str:
        return f"{'grpc+tls' if self.tls else 'grpc'}://{self.flight_host}:{self.flight_port}"


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
