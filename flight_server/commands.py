"""The Flight wire contract: the JSON command in ``FlightDescriptor.for_command`` and the
ticket of each endpoint. Documented in proto_docs/flight-protocol.md.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ibstream.errors import InvalidRequestError
from storage.schemas import TickType
from storage.times import iso, now_us, to_us

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
            problems.append(f"{where}: {error['msg'].removeprefix('Value error, ')} (got {error.get('input')!r})")
        else:
            problems.append(error["msg"].removeprefix("Value error, "))
    return "; ".join(problems)


class TicksCommand(BaseModel):
    """A query for the ticks of one contract and some tick types over [start, end).

    ``start`` and ``end`` are ISO-8601 times with a UTC offset (``Z`` or ``+hh:mm``); ``end``
    omitted means "now" at the moment the server plans the query.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    contract_id: int = Field(gt=0)
    tick_types: list[TickType] = Field(min_length=1)
    start: datetime
    end: datetime | None = None

    @field_validator("tick_types", mode="before")
    @classmethod
    def _tick_types(cls, value):
        values = [value] if isinstance(value, str) else value
        if isinstance(values, list):
            for item in values:
                if isinstance(item, str):
                    TickType.parse(item)  # the message lists the legal values
            if len(set(values)) != len(values):
                raise ValueError(f"tick_types lists a type twice: {values}")
        return values

    @field_validator("start", "end")
    @classmethod
    def _aware(cls, value: datetime | None, info) -> datetime | None:
        if value is not None:
            to_us(value, name=info.field_name)  # raises for naive times
        return value

    @model_validator(mode="after")
    def _ordered(self) -> "TicksCommand":
        if self.end is not None and self.end <= self.start:
            raise ValueError(
                f"range is empty or inverted: start {self.start.isoformat()} is not before end "
                f"{self.end.isoformat()}; the range is [start, end)"
            )
        return self

    @classmethod
    def parse(cls, raw: bytes) -> "TicksCommand":
        try:
            payload = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequestError(
                f"command is not valid JSON ({exc}); expected an object such as "
                '{"version": 1, "contract_id": 711280073, "tick_types": ["bid_ask"], '
                '"start": "2025-01-10T14:30:00Z", "end": "2025-01-10T15:00:00Z"}'
            ) from None
        if not isinstance(payload, dict):
            raise InvalidRequestError(f"command must be a JSON object; got {type(payload).__name__}")
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

    def range_us(self) -> tuple[int, int]:
        return to_us(self.start, name="start"), now_us() if self.end is None else to_us(self.end, name="end")


class Ticket(BaseModel):
    """One endpoint's stream: a single tick type over a pinned range (microseconds, UTC)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = 1
    contract_id: int = Field(gt=0)
    tick_type: TickType
    start_us: int
    end_us: int

    @model_validator(mode="after")
    def _ordered(self) -> "Ticket":
        if self.end_us <= self.start_us:
            raise ValueError(f"ticket range is empty: [{iso(self.start_us)}, {iso(self.end_us)})")
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
        return self.model_dump_json().encode()


def command(contract_id: int, tick_types: list[str] | str, start: datetime, end: datetime | None = None) -> bytes:
    """The command bytes for a query (what :class:`clients.Client` sends)."""
    types = [tick_types] if isinstance(tick_types, str) else list(tick_types)
    payload = {"version": COMMAND_VERSION, "contract_id": contract_id, "tick_types": types, "start": _iso(start)}
    if end is not None:
        payload["end"] = _iso(end)
    return json.dumps(payload).encode()


def _iso(value: datetime) -> str:
    to_us(value)  # refuse naive times before they leave the client
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
