"""The Flight wire contract: the JSON command in ``FlightDescriptor.for_command`` and the
ticket of each endpoint. Documented in proto_docs/flight-protocol.md.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from ibstream.core.cursors import Cursor
from ibstream.core.errors import InvalidRequestError
from ibstream.core.resolutions import DAILY, TICK, normalize_kind, parse_resolution, parse_window
from ibstream.core.ticks import TickType
from ibstream.core.times import iso, to_us

COMMAND_VERSION = 1


def _format(exc: ValidationError, what: str) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or what
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown field {where!r}")
        elif error["type"] == "missing":
            problems.append(f"missing field {where!r}")
        elif error["loc"]:
            message = error["msg"].removeprefix("Value error, ")
            received = repr(error.get("input"))
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
            raise ValueError(f"session_date was {value!r}; use a date from 1970-01-01 to 2199-12-31")
    return value


def _aware(value: datetime, info: ValidationInfo) -> datetime:
    to_us(value, name=info.field_name or "time")  # refuses naive times, saying how to give an offset
    return value


AwareTime = Annotated[datetime, AfterValidator(_aware)]
def _cursor(value: str) -> str:
    Cursor.parse(value)
    return value


CursorText = Annotated[str, AfterValidator(_cursor)]
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
    contract_id: int | None = Field(None, gt=0)
    contract_ids: list[Annotated[int, Field(gt=0)]] | None = Field(None, min_length=1)
    tick_types: list[TickType] = Field(min_length=1)
    start: AwareTime | None = None
    end: AwareTime | None = None
    window: Window | None = None
    session: SessionKind | None = None
    session_date: SessionDate | None = None
    resolution: Resolution = TICK
    fill: bool = False
    daily_session: SessionKind | None = None
    live: bool = False
    cursor: CursorText | None = None

    @field_validator("tick_types", mode="before")
    @classmethod
    def _tick_types(cls, value):
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list):
            for item in values:
                if isinstance(item, str):
                    TickType.parse(item)  # the message lists the legal values
            _distinct("tick_types", values)
        return values

    @field_validator("contract_ids")
    @classmethod
    def _contract_ids(cls, value):
        return value if value is None else _distinct("contract_ids", value)

    @model_validator(mode="after")
    def _consistent(self) -> "QueryCommand":
        if (self.contract_id is None) == (self.contract_ids is None):
            raise ValueError("give exactly one of contract_id (one contract) or contract_ids (a list)")
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
        if payload.get("version", COMMAND_VERSION) != COMMAND_VERSION:
            raise InvalidRequestError(
                f"command version was {payload.get('version')!r}; this server speaks version {COMMAND_VERSION}"
            )
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid command: {_format(exc, 'command')}") from None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

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
        raise ValueError(f"{name} lists a value twice: {values}")
    return values


def _json_object(raw: bytes, what: str, example: str) -> dict:
    try:
        payload = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"{what} is not valid JSON ({exc}); expected an object such as {example}") from None
    if not isinstance(payload, dict):
        raise InvalidRequestError(f"{what} must be a JSON object; got {type(payload).__name__}")
    return payload


EXAMPLE_COMMAND = ('{"version": 1, "contract_id": 711280073, "tick_types": ["bid_ask"], '
                   '"start": "2025-01-10T14:30:00Z", "end": "2025-01-10T15:00:00Z"}')


class Ticket(BaseModel):
    """One endpoint's stream: a single tick type over a pinned range (microseconds, UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    contract_id: int = Field(gt=0)
    tick_type: TickType
    start_us: int
    end_us: int
    resolution: Resolution = TICK
    fill: bool = False
    daily_session: SessionKind | None = None
    live: bool = False
    skip: int = Field(0, ge=0)  # ticks at start_us already delivered (a resumed cursor's n)

    @model_validator(mode="after")
    def _ordered(self) -> "Ticket":
        if self.end_us <= self.start_us:
            raise ValueError(f"ticket range is empty: [{iso(self.start_us)}, {iso(self.end_us)})")
        _check_bar_options(self.resolution, self.fill, self.daily_session)
        return self

    @classmethod
    def parse(cls, raw: bytes) -> "Ticket":
        try:
            return cls.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidRequestError(
                f"invalid ticket: {_format(exc, 'ticket')}; use a ticket from get_flight_info"
            ) from None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


def command(contract_ids: int | Sequence[int], tick_types: str | Sequence[str], start: datetime | None = None,
            end: datetime | None = None, *, window: str | None = None, session: str | None = None,
            session_date: str | date | None = None, resolution: str = TICK, fill: bool = False,
            daily_session: str | None = None, live: bool = False, cursor: str | None = None) -> bytes:
    """The command bytes for a query (what :class:`ibstream.Client` sends), built and checked by the one
    command model, :class:`QueryCommand` (a bad argument fails here, with the server's message)."""
    payload: dict = {"version": COMMAND_VERSION}
    if isinstance(contract_ids, int):
        payload["contract_id"] = contract_ids
    else:
        payload["contract_ids"] = list(contract_ids)
    payload["tick_types"] = [tick_types] if isinstance(tick_types, str) else list(tick_types)
    optional = {"start": None if start is None else iso_time(start), "end": None if end is None else iso_time(end),
                "window": window, "session": session,
                "session_date": session_date.isoformat() if isinstance(session_date, date) else session_date,
                "resolution": None if resolution == TICK else resolution, "fill": fill or None,
                "daily_session": daily_session, "live": live or None, "cursor": cursor}
    payload |= {name: value for name, value in optional.items() if value is not None}
    return QueryCommand.parse(json.dumps(payload).encode()).to_bytes()


def iso_time(value: datetime) -> str:
    to_us(value)  # refuse naive times before they leave the client
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# -- do_action bodies --------------------------------------------------------------------------

class ActionBody(BaseModel):
    """The JSON body of a ``do_action`` call; each action's fields are below."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contract_id: int = Field(gt=0)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def parse(cls, raw: bytes, action: str) -> Self:
        payload = _json_object(raw or b"{}", f"the body of action {action!r}", '{"contract_id": 711280073}')
        try:
            return cls.model_validate(payload)
        except ValidationError as exc:
            raise InvalidRequestError(f"invalid body for action {action!r}: {_format(exc, 'body')}") from None


class StatisticsBody(ActionBody):
    """``statistics``: the daily statistics of a contract (all its tick types, or one)."""

    tick_type: TickType | None = None


class SessionsBody(ActionBody):
    """``sessions``: every session kind of a contract on a trading date (or current / previous)."""

    date: SessionDate = "current"


class CoverageBody(ActionBody):
    """``coverage``: when a stream was recorded and when not (and why) over [start, end)."""

    tick_type: TickType
    start: AwareTime
    end: AwareTime | None = None


ACTION_BODIES: dict[str, type[ActionBody]] = {"statistics": StatisticsBody, "sessions": SessionsBody,
                                              "coverage": CoverageBody}


def action_body(action: str, **fields) -> bytes:
    """The body bytes of a ``do_action`` call (what :class:`ibstream.Client` sends), built and checked
    by the action's model; ``None`` fields are left out."""
    body = json.dumps({name: value for name, value in fields.items() if value is not None}).encode()
    model = ACTION_BODIES.get(action)
    return body if model is None else model.parse(body, action).to_bytes()  # an unknown action: the server says so
