"""The Flight wire contract: the JSON command in ``FlightDescriptor.for_command`` and the
ticket of each endpoint. Documented in proto_docs/flight-protocol.md.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Literal, Self, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ibstream.core.continuous import Continuous
from ibstream.core.cursors import MAX_CURSOR_N, Cursor
from ibstream.core.errors import InvalidRequestError, shown
from ibstream.core.resolutions import DAILY, TICK, normalize_kind, parse_resolution, parse_window
from ibstream.core.ticks import TickType
from ibstream.core.times import FOREVER_US, MAX_CONTRACT_ID, MAX_US, MIN_US, in_range_us, iso, to_us

COMMAND_VERSION = 1
MAX_JSON_BYTES = 64 * 1024  # a command, ticket or action body larger than this is refused unread
MAX_CONTRACTS = 1_000  # contract_ids of one command
MAX_INDEX_SEQ = 2**63 - 1  # a ticket's index_seq (a published index's sequence number)
ContractId = Annotated[StrictInt, Field(gt=0, le=MAX_CONTRACT_ID)]


def _version(value: object) -> object:
    if type(value) is not int or value != COMMAND_VERSION:
        raise ValueError(f"version was {shown(value)}; this server speaks version {COMMAND_VERSION} (the integer)")
    return value


Version = Annotated[Literal[1], BeforeValidator(_version)]
_Model = TypeVar("_Model", bound=BaseModel)


def _format(exc: ValidationError, what: str) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or what
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown field {shown(where)}")
        elif error["type"] == "missing":
            problems.append(f"missing field {shown(where)}")
        elif error["loc"]:
            message = error["msg"].removeprefix("Value error, ")
            received = shown(error.get("input"))
            problems.append(f"{where}: {message}" + ("" if f"was {received}" in message else f" (got {received})"))
        else:
            problems.append(error["msg"].removeprefix("Value error, "))
    return "; ".join(problems)


def _window(value: str) -> str:
    parse_window(value)
    return value


def _session_date(value: str) -> str:
    if value not in ("current", "previous"):
        try:
            day = date.fromisoformat(value)
        except ValueError:
            raise ValueError("use a trading date YYYY-MM-DD, 'current' or 'previous'") from None
        if not date(1970, 1, 1) <= day < date(2200, 1, 1):
            raise ValueError(f"session_date was {shown(value)}; use a date from 1970-01-01 to 2199-12-31")
    return value


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    name = info.field_name or "time"
    in_range_us(to_us(value, name=name), name=name)  # refuses naive times, saying how to give an offset
    return value


AwareTime = Annotated[datetime, AfterValidator(_aware)]
def _cursor(value: str) -> str:
    Cursor.parse(value)
    return value


CursorText = Annotated[str, AfterValidator(_cursor)]


def _continuous(value: str) -> str:
    Continuous.parse(value)
    return value


ContinuousText = Annotated[str, AfterValidator(_continuous)]
Resolution = Annotated[str, AfterValidator(parse_resolution)]
SessionKind = Annotated[str, AfterValidator(normalize_kind)]
Window = Annotated[str, AfterValidator(_window)]
SessionDate = Annotated[str, AfterValidator(_session_date)]


class QueryCommand(BaseModel):
    """A query: ticks or bars of one or more contracts and tick types over a time range.

    The range is exactly one of: ``start`` (ISO-8601 with offset) and optional ``end`` (omitted:
    now), ``window`` (a rolling window ending now, e.g. ``"15m"``, ``"24h"``, ``"7d"``), or
    ``session`` (a trading session kind of each contract) with ``session_date`` (a date,
    ``"current"`` or ``"previous"``; default ``"current"``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    contract_id: ContractId | None = None
    contract_ids: list[ContractId] | None = Field(None, min_length=1, max_length=MAX_CONTRACTS)
    continuous: ContinuousText | None = None
    tick_types: list[TickType] = Field(min_length=1, max_length=len(TickType))
    start: AwareTime | None = None
    end: AwareTime | None = None
    window: Window | None = None
    session: SessionKind | None = None
    session_date: SessionDate | None = None
    resolution: Resolution = TICK
    fill: StrictBool = False
    daily_session: SessionKind | None = None
    live: StrictBool = False
    cursor: CursorText | None = None
    provenance: StrictBool = False

    @field_validator("tick_types", mode="before")
    @classmethod
    def _tick_types(cls, value):
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list):
            for item in values:
                if isinstance(item, str):
                    TickType.parse(item)  # the message lists the legal values
        return values

    @field_validator("tick_types", "contract_ids")
    @classmethod
    def _distinct_items(cls, value, info: ValidationInfo):
        return value if value is None else _distinct(info.field_name or "list", value)

    @model_validator(mode="after")
    def _consistent(self) -> "QueryCommand":
        named = [name for name in ("contract_id", "contract_ids", "continuous") if getattr(self, name) is not None]
        if len(named) != 1:
            raise ValueError("give exactly one of contract_id (one contract), contract_ids (a list) or continuous "
                             f"(e.g. 'MNQ.c.0'); got {' and '.join(named) if named else 'none of them'}")
        if self.provenance and self.live:
            raise ValueError("provenance (the source column) applies to stored ticks, not to a live stream")
        if self.continuous is not None and (self.session or self.live or self.cursor):
            raise ValueError("a continuous contract is read over start/end or a window; sessions, live streams and "
                             "cursors follow one expiry: give its contract_id (the roll schedule names it)")
        if self.provenance and self.resolution != TICK:
            raise ValueError("provenance (the source column) applies to ticks; bars leave it out")
        given = [name for name in ("start", "window", "session", "cursor") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "give the range exactly one way: start (with an optional end), window (e.g. '24h'), session "
                "(e.g. 'regular', with session_date) or cursor (to resume a stream); got "
                f"{' and '.join(given) if given else 'none of them'}")
        if self.end is not None and self.start is None and self.cursor is None:
            raise ValueError("end needs start (or cursor); a window or a session already fixes the end")
        if self.cursor is not None and len(self.contracts) * len(self.tick_types) != 1:
            raise ValueError("a cursor resumes one stream: give one contract_id and one tick type with it")
        if self.cursor is not None and self.resolution != TICK:
            raise ValueError("a cursor is a tick position: resume bars with start at the last bar's ts instead")
        if self.live and self.fill:
            raise ValueError("fill applies to stored ranges; a live bar stream sends only bars that have ticks")
        if self.live and self.resolution == DAILY:
            raise ValueError("live bars go up to 1h; resolution '1d' is served for stored ranges only")
        if self.session_date is not None and self.session is None:
            raise ValueError("session_date needs session, e.g. \"session\": \"regular\"")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(
                f"range is empty or inverted: start {self.start.isoformat()} is not before end "
                f"{self.end.isoformat()}; the range is [start, end)"
            )
        _check_bar_options(self.resolution, self.fill, self.daily_session)
        if self.session is not None and self.daily_session not in (None, self.session):
            raise ValueError(f"daily_session {self.daily_session!r} differs from session {self.session!r}; daily bars "
                             "of a session query are that session's: leave daily_session out")
        return self

    @classmethod
    def parse(cls, raw: bytes) -> "QueryCommand":
        payload = _json_object(raw, "command", EXAMPLE_COMMAND)
        version = payload.get("version", COMMAND_VERSION)
        if type(version) is not int or version != COMMAND_VERSION:
            raise InvalidRequestError(
                f"command version was {shown(version)}; this server speaks version {COMMAND_VERSION} (the integer)")
        return _validated(cls, payload, "invalid command", "command")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @property
    def pinned(self) -> bool:
        """Whether the query means the same ticks whenever it is asked: an explicit ``start`` or cursor and
        ``end``, of contracts by id (no window, session, continuous contract or live stream, which move
        with now or with the roll schedule)."""
        return (self.end is not None and self.window is None and self.session is None and self.continuous is None
                and not self.live)

    @property
    def contracts(self) -> list[int]:
        return [self.contract_id] if self.contract_id is not None else list(self.contract_ids or ())

    @property
    def day_kind(self) -> str:
        """The session kind daily bars are built from."""
        return self.daily_session or self.session or "extended"


def _check_bar_options(resolution: str, fill: bool, daily_session: str | None) -> None:
    if fill and resolution == TICK:
        raise ValueError("fill applies to bars; give a resolution such as '1m'")
    if daily_session is not None and resolution != DAILY:
        raise ValueError(f"daily_session applies to resolution '1d' only (resolution was {resolution!r})")


def _distinct(name: str, values: list) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} lists a value twice: {shown([str(v) for v in values])}")
    return values


def _json_object(raw: bytes, what: str, example: str) -> dict:
    if len(raw) > MAX_JSON_BYTES:
        raise InvalidRequestError(f"{what} is {len(raw):,} bytes, over the limit of {MAX_JSON_BYTES:,}; "
                                  f"expected an object such as {example}")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep, a number too long
        reason = "nested too deep" if isinstance(exc, RecursionError) else shown(str(exc), 120)
        raise InvalidRequestError(f"{what} is not valid JSON ({reason}); expected an object such as {example}") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError(f"{what} must be a JSON object; got {type(payload).__name__}")
    return payload


def _validated(model: type[_Model], payload: dict | bytes, prefix: str, what: str, hint: str = "") -> _Model:
    """``payload`` (a parsed object, or JSON bytes) as ``model``; every failure an InvalidRequestError
    naming the fields (values cut to a few dozen characters)."""
    try:
        return model.model_validate_json(payload) if isinstance(payload, bytes) else model.model_validate(payload)
    except ValidationError as exc:
        raise InvalidRequestError(f"{prefix}: {_format(exc, what)}{hint}") from None
    except (ValueError, TypeError, RecursionError, OverflowError) as exc:  # raised past pydantic by a validator
        raise InvalidRequestError(f"{prefix}: {shown(str(exc), 200)}{hint}") from None


EXAMPLE_COMMAND = ('{"version": 1, "contract_id": 711280073, "tick_types": ["bid_ask"], '
                   '"start": "2025-01-10T14:30:00Z", "end": "2025-01-10T15:00:00Z"}')


class Ticket(BaseModel):
    """One endpoint's stream: a single tick type over a pinned range (microseconds, UTC).

    Its fields are bounded like a command's (a forged ticket is refused, and ``do_get`` applies the
    server's limits to it again): contract ids up to 2^31 - 1, times from 1970 to 2200 (a live
    stream's end may be :data:`~ibstream.core.times.FOREVER_US`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Version = 1
    contract_id: ContractId
    tick_type: TickType
    start_us: int = Field(ge=MIN_US, le=MAX_US)
    end_us: int = Field(ge=MIN_US, le=FOREVER_US)
    resolution: Resolution = TICK
    fill: bool = False
    daily_session: SessionKind | None = None
    live: bool = False
    skip: int = Field(0, ge=0, le=MAX_CURSOR_N)  # ticks at start_us already delivered (a resumed cursor's n)
    index_seq: int | None = Field(None, ge=0, le=MAX_INDEX_SEQ)  # the published index a coordinator planned with
    continuous: ContinuousText | None = None  # a piece of this continuous contract: rows say their expiry
    provenance: bool = False  # a source column: live, backfill or fallback

    @model_validator(mode="after")
    def _ordered(self) -> "Ticket":
        if self.end_us <= self.start_us:
            raise ValueError(f"ticket range is empty: [{iso(self.start_us)}, {iso(min(self.end_us, MAX_US))})")
        if self.end_us > MAX_US and not (self.live and self.end_us == FOREVER_US):
            raise ValueError(f"end_us was {self.end_us}; past 2200-01-01 only a live ticket's open end is allowed")
        if self.start_us < MIN_US:
            raise ValueError(f"start_us was {self.start_us}; use a time from 1970-01-01")
        if self.live and self.fill:
            raise ValueError("fill applies to stored ranges; a live bar stream sends only bars that have ticks")
        if self.live and self.resolution == DAILY:
            raise ValueError("live bars go up to 1h; resolution '1d' is served for stored ranges only")
        if self.live and (self.continuous or self.provenance):
            raise ValueError("continuous and provenance apply to stored ranges, not to a live ticket")
        if self.provenance and self.resolution != TICK:
            raise ValueError("provenance (the source column) applies to ticks; bars leave it out")
        _check_bar_options(self.resolution, self.fill, self.daily_session)
        return self

    @classmethod
    def parse(cls, raw: bytes) -> "Ticket":
        if len(raw) > MAX_JSON_BYTES:
            raise InvalidRequestError(f"invalid ticket: {len(raw):,} bytes; use a ticket from get_flight_info")
        return _validated(cls, raw, "invalid ticket", "ticket", "; use a ticket from get_flight_info")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# Valid commands and tickets kept parsed (frozen models; errors are not kept): a client and a dashboard repeat
# them, and the server parses a do_get's ticket for its stats and again to read it. At most 256 commands and
# 1,024 tickets of MAX_JSON_BYTES each.
parsed_command = functools.lru_cache(maxsize=256)(QueryCommand.parse)
parsed_ticket = functools.lru_cache(maxsize=1024)(Ticket.parse)


def command(contract_ids: int | str | Sequence[int], tick_types: str | Sequence[str], start: datetime | None = None,
            end: datetime | None = None, *, window: str | None = None, session: str | None = None,
            session_date: str | date | None = None, resolution: str = TICK, fill: bool = False,
            daily_session: str | None = None, live: bool = False, cursor: str | None = None,
            provenance: bool = False) -> bytes:
    """The command bytes for a query (what :class:`ibstream.Client` sends), built and checked by the one
    command model, :class:`QueryCommand` (a bad argument fails here, with the server's message)."""
    payload: dict = {"version": COMMAND_VERSION}
    if isinstance(contract_ids, int):
        payload["contract_id"] = contract_ids
    elif isinstance(contract_ids, str):
        payload["continuous"] = contract_ids
    else:
        payload["contract_ids"] = list(contract_ids)
    payload["tick_types"] = [tick_types] if isinstance(tick_types, str) else list(tick_types)
    optional = {"start": None if start is None else iso_time(start), "end": None if end is None else iso_time(end),
                "window": window, "session": session,
                "session_date": session_date.isoformat() if isinstance(session_date, date) else session_date,
                "resolution": None if resolution == TICK else resolution, "fill": fill or None,
                "daily_session": daily_session, "live": live or None, "cursor": cursor,
                "provenance": provenance or None}
    payload |= {name: value for name, value in optional.items() if value is not None}
    return parsed_command(json.dumps(payload).encode()).to_bytes()


def iso_time(value: datetime) -> str:
    to_us(value)  # refuse naive times before they leave the client
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- do_action bodies --------------------------------------------------------------------------

class ActionBody(BaseModel):
    """The JSON body of a ``do_action`` call; each action's fields are below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def parse(cls, raw: bytes, action: str) -> Self:
        payload = _json_object(raw or b"{}", f"the body of action {shown(action)}", '{"contract_id": 711280073}')
        return _validated(cls, payload, f"invalid body for action {shown(action)}", "body")


class ContractBody(ActionBody):
    contract_id: ContractId


class StatisticsBody(ContractBody):
    """``statistics``: the daily statistics of a contract (all its tick types, or one)."""

    tick_type: TickType | None = None


class SessionsBody(ContractBody):
    """``sessions``: every session kind of a contract on a trading date (or current / previous)."""

    date: SessionDate = "current"


class CoverageBody(ContractBody):
    """``coverage``: when a stream was recorded and when not (and why) over [start, end)."""

    tick_type: TickType
    start: AwareTime
    end: AwareTime | None = None


class ScrubBody(ActionBody):
    """``scrub`` (role admin): check the next ``files`` archive files now, as the recorder's scrub job does."""

    files: StrictInt = Field(10, ge=1, le=100_000)


class RollsBody(ActionBody):
    """``rolls``: the recorded roll schedule of a continuous future's root (e.g. MNQ)."""

    root: Annotated[str, Field(min_length=1, max_length=16, pattern=r"^[A-Z0-9][A-Z0-9_-]*$")]


ACTION_BODIES: dict[str, type[ActionBody]] = {"statistics": StatisticsBody, "sessions": SessionsBody,
                                              "coverage": CoverageBody, "scrub": ScrubBody, "rolls": RollsBody}


def action_body(action: str, **fields) -> bytes:
    """The body bytes of a ``do_action`` call (what :class:`ibstream.Client` sends), built and checked
    by the action's model; ``None`` fields are left out."""
    body = json.dumps({name: value for name, value in fields.items() if value is not None}).encode()
    model = ACTION_BODIES.get(action)
    return body if model is None else model.parse(body, action).to_bytes()  # an unknown action: the server says so
