"""A seeded fuzzer: 10,000+ hostile commands, tickets, action bodies and headers against a real
server. Each gets OK, INVALID_ARGUMENT or NOT_FOUND with a tagged message of bounded length
(never INTERNAL, UNKNOWN or RESOURCE_EXHAUSTED); the server stays up, answers a good query
exactly afterwards, and its memory and open index connections stay bounded."""

from __future__ import annotations

import json
import random
import resource

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from ibstream.core.errors import MESSAGE_LIMIT
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import Served, ticks, utc

CID = MNQ.contract_id
SEED = 20261202
GOOD_COMMAND = {"version": 1, "contract_id": CID, "tick_types": ["bid_ask"], "start": "2025-01-10T14:00:00Z",
                "end": "2025-01-10T15:00:00Z"}
GOOD_TICKET = {"version": 1, "contract_id": CID, "tick_type": "bid_ask", "start_us": 1_736_517_600_000_000,
               "end_us": 1_736_521_200_000_000}
GOOD_BODIES = {"statistics": {"contract_id": CID}, "sessions": {"contract_id": CID, "date": "2025-01-10"},
               "coverage": {"contract_id": CID, "tick_type": "bid_ask", "start": "2025-01-10T00:00:00Z"}}

HOSTILE = [
    None, True, False, 0, -1, 1.0, 1.5, 2**31, 2**31 - 1, 2**62, 2**63, 2**64, -(2**63), 10**30, float("1e308"),
    "", " ", "x" * 9_000, "\u0000", "\udcff", "💥", "bid_ask", "BID_ASK", "last ", "1m", "0s", "-5m", "99999999999d",
    "1d", "tick", "regular", "extended", "current", "previous", "2025-13-40", "9999-12-31", "0001-01-01",
    "2025-01-10T14:30:00", "2025-01-10T14:30:00Z", "0001-01-01T00:00:00-23:59", "9999-12-31T23:59:59+23:59",
    "9999-12-31T23:59:59.999999-23:59", "1970-01-01T00:00:00Z", "2199-12-31T23:59:59Z", "2200-01-01T00:00:00Z",
    "1736519400123456:1", "-1:0", "4611686018427387904:0", "4611686018427387905:99", "1:-1", "1:2:3", "::",
    f"{2**62}:{2**40}", "9" * 5_000, [], [None], [[]], [{}], [1, 1], ["bid_ask", "bid_ask"], ["bid_ask", ["last"]],
    [{"a": 1}], list(range(2_000)), {}, {"$ne": 1}, {"a": [1, {"b": None}]},
]


def mutate(rng: random.Random, good: dict, fields: list[str]) -> dict:
    """``good`` with one to three fields set to hostile values, removed, or joined by an unknown one."""
    value = dict(good)
    for _ in range(rng.randint(1, 3)):
        move = rng.random()
        name = rng.choice(fields)
        if move < 0.75:
            value[name] = rng.choice(HOSTILE)
        elif move < 0.9:
            value.pop(name, None)
        else:
            value[rng.choice(["granularity", "x" * 500, "", "__class__"])] = rng.choice(HOSTILE)
    return value


def garbage(rng: random.Random) -> bytes:
    """Bytes a JSON parser may choke on."""
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randbytes(rng.randint(0, 200))
    if kind == 1:
        return b"[" * rng.choice([100, 5_000, 60_000]) + b"]" * 3
    if kind == 2:
        return b'{"a":' * rng.choice([100, 5_000]) + b"1" + b"}" * 10
    if kind == 3:
        return b'{"version": 1, "contract_id": ' + b"9" * rng.choice([400, 4_400, 20_000]) + b"}"
    if kind == 4:
        return json.dumps(rng.choice([[1], "text", 3, None, True])).encode()
    if kind == 5:
        return b'{"window": "' + b"9" * 70_000 + b'"}'
    if kind == 6:
        return json.dumps(GOOD_COMMAND).encode()[: rng.randint(0, 60)]
    return b"\xff\xfe" + rng.randbytes(20)


def encoded(rng: random.Random, value: dict) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", errors="surrogatepass")
    except (ValueError, OverflowError):  # NaN and infinities: the server never sees them as numbers
        return garbage(rng)


def status(call) -> str:
    """The gRPC status of a call as our names (reading every batch of a stream)."""
    try:
        call()
    except pa.ArrowInvalid as exc:
        return "INVALID_ARGUMENT", str(exc)
    except pa.ArrowKeyError as exc:
        return "NOT_FOUND", str(exc)
    except flight.FlightTimedOutError as exc:
        return "DEADLINE_EXCEEDED", str(exc)
    except flight.FlightInternalError as exc:
        return "INTERNAL", str(exc)
    except flight.FlightUnavailableError as exc:
        return "UNAVAILABLE", str(exc)
    except flight.FlightError as exc:
        return type(exc).__name__, str(exc)
    except pa.ArrowException as exc:
        return f"arrow {type(exc).__name__}", str(exc)
    return "OK", ""


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


@pytest.fixture
def fuzzed(store: Store):
    store.append(CID, "bid_ask", ticks(utc(2025, 1, 10, 14), 2_000))
    store.append(CID, "last", ticks(utc(2025, 1, 10, 14), 500, "last"))
    running = Served(store)
    client = flight.connect(running.location)
    yield store, running, client
    client.close()
    running.close()


def test_ten_thousand_hostile_inputs_get_invalid_or_not_found_and_the_server_stays_up(fuzzed):
    store, served, client = fuzzed
    rng = random.Random(SEED)
    short = flight.FlightCallOptions(timeout=2)
    outcomes: dict[tuple[str, str], int] = {}
    first_rss = None
    for i in range(10_500):
        kind = ("command", "ticket", "action", "garbage command", "garbage ticket")[i % 5]
        if kind == "command":
            payload = encoded(rng, mutate(rng, GOOD_COMMAND, [*GOOD_COMMAND, "window", "session", "session_date",
                                                              "resolution", "fill", "daily_session", "cursor",
                                                              "contract_ids", "live"]))
            call = lambda: client.get_flight_info(flight.FlightDescriptor.for_command(payload))  # noqa: E731
        elif kind == "ticket":
            ticket = mutate(rng, GOOD_TICKET, [*GOOD_TICKET, "resolution", "fill", "daily_session", "skip", "live"])
            if ticket.get("live") is True:
                ticket["live"] = rng.choice([1, "true", None])  # a valid live ticket would stream until cut off
            payload = encoded(rng, ticket)
            call = lambda: client.do_get(flight.Ticket(payload), short).read_all()  # noqa: E731
        elif kind == "action":
            name = rng.choice([*GOOD_BODIES, "verify", "", "x" * 9_000, "statistics\u0000"])
            body = encoded(rng, mutate(rng, GOOD_BODIES.get(name, {"contract_id": CID}),
                                       ["contract_id", "tick_type", "date", "start", "end"]))
            call = lambda: list(client.do_action(flight.Action(name, body)))  # noqa: E731
        elif kind == "garbage command":
            payload = garbage(rng)
            call = lambda: client.get_flight_info(flight.FlightDescriptor.for_command(payload))  # noqa: E731
        else:
            payload = garbage(rng)
            call = lambda: client.do_get(flight.Ticket(payload), short).read_all()  # noqa: E731
        code, message = status(call)
        outcomes[kind, code] = outcomes.get((kind, code), 0) + 1
        assert code in ("OK", "INVALID_ARGUMENT", "NOT_FOUND"), (kind, code, message[:500])
        if code != "OK":
            assert message.startswith("[ibstream."), message[:300]
            assert len(message.split(". Detail:")[0]) <= MESSAGE_LIMIT + 60, len(message)
        if kind.startswith("garbage"):
            assert code == "INVALID_ARGUMENT", (kind, message[:300])
        if i == 1_000:
            first_rss = rss_mb()
    assert sum(outcomes.values()) == 10_500
    assert {code for _, code in outcomes} >= {"OK", "INVALID_ARGUMENT", "NOT_FOUND"}, outcomes
    assert rss_mb() - first_rss < 300, (first_rss, rss_mb())  # 9,500 calls later: no growth that matters
    assert store.index.open_connections <= 16
    good = client.get_flight_info(flight.FlightDescriptor.for_command(json.dumps(GOOD_COMMAND).encode()))
    served_ticks = client.do_get(good.endpoints[0].ticket).read_all()
    assert served_ticks.num_rows == 2_000
    assert served_ticks.equals(store.read(CID, "bid_ask", utc(2025, 1, 10, 14), utc(2025, 1, 10, 15)))


@pytest.mark.parametrize("ticket, message", [
    ({**GOOD_TICKET, "start_us": 0, "end_us": 2**62 - 1, "resolution": "1s", "fill": True},
     "end_us was 4611686018427387903; past 2200-01-01 only a live ticket's open end is allowed"),
    ({**GOOD_TICKET, "start_us": 0, "end_us": 7_258_118_400_000_000, "resolution": "1s", "fill": True},
     "request too large: range [1970-01-01T00:00:00Z, 2200-01-01T00:00:00Z) spans more than 366 days"),
    ({**GOOD_TICKET, "start_us": 0, "end_us": 7_258_118_400_000_000, "resolution": "1d"}, "request too large: range"),
    ({**GOOD_TICKET, "start_us": 1_736_517_600_000_000, "end_us": 1_736_517_600_000_000 + 360 * 86_400_000_000,
      "resolution": "1s", "fill": True}, "request too large: about 31,104,000 bars of 1s"),
    ({**GOOD_TICKET, "contract_id": 2**40, "live": True}, "contract_id: Input should be less than or equal to"),
    ({**GOOD_TICKET, "start_us": -1}, "start_us: Input should be greater than or equal to 0"),
    ({**GOOD_TICKET, "end_us": 2**62, "live": False}, "past 2200-01-01 only a live ticket's open end is allowed"),
    ({**GOOD_TICKET, "version": 1.0}, "version was 1.0; this server speaks version 1 (the integer)"),
    ({**GOOD_TICKET, "skip": 2**40}, "skip: Input should be less than or equal to 2147483648"),
    ({**GOOD_TICKET, "end_us": 2**62, "live": True, "resolution": "1d"}, "live bars go up to 1h"),
    ({**GOOD_TICKET, "end_us": 2**62, "live": True, "resolution": "1m", "fill": True}, "fill applies to stored ranges"),
])
def test_a_forged_ticket_gets_no_more_than_its_command_could(fuzzed, ticket, message):
    _, _, client = fuzzed
    with pytest.raises(pa.ArrowInvalid, match="request too large|invalid ticket") as caught:
        client.do_get(flight.Ticket(json.dumps(ticket).encode())).read_all()
    assert message in str(caught.value)


@pytest.mark.parametrize("command, message", [
    ({**GOOD_COMMAND, "version": 1.0}, "command version was 1.0; this server speaks version 1 (the integer)"),
    ({**GOOD_COMMAND, "tick_types": ["bid_ask", ["last"]]}, "tick_types.1: Input should be"),
    ({**GOOD_COMMAND, "start": "0001-01-01T00:00:00-23:59"}, "start was 0001-01-01T23:59:00Z"),
    ({**GOOD_COMMAND, "end": "9999-12-31T23:59:59+23:59"}, "use a time from 1970-01-01 to 2199-12-31"),
    ({**GOOD_COMMAND, "cursor": f"{2**62}:0", "start": None}, "out of range; use a time from 1970-01-01"),
    ({**GOOD_COMMAND, "window": "9" * 9_000, "start": None, "end": None}, "... (9,002 characters)"),
    ({**GOOD_COMMAND, "contract_id": 10**30}, "contract_id: Input should be less than or equal to 2147483647"),
    ({**GOOD_COMMAND, "live": "yes"}, "live: Input should be a valid boolean"),
])
def test_extreme_commands_get_one_bounded_message(fuzzed, command, message):
    _, _, client = fuzzed
    payload = json.dumps({k: v for k, v in command.items() if v is not None}).encode()
    with pytest.raises(pa.ArrowInvalid) as caught:
        client.get_flight_info(flight.FlightDescriptor.for_command(payload))
    assert message in str(caught.value)
    assert len(str(caught.value).split(". Detail:")[0]) < 1_000


@pytest.mark.parametrize("payload, message", [
    (b"[" * 70_000, "command is 70,000 bytes, over the limit of 65,536"),
    (b"[" * 50_000 + b"]" * 50_000 + b"", "over the limit of 65,536"),
    (b"[" * 20_000 + b"]" * 20_000, "nested too deep"),
    (b'{"contract_id": ' + b"9" * 5_000 + b"}", "Exceeds the limit (4300 digits)"),
])
def test_json_the_parser_cannot_take_is_an_invalid_request(fuzzed, payload, message):
    _, _, client = fuzzed
    with pytest.raises(pa.ArrowInvalid) as caught:
        client.get_flight_info(flight.FlightDescriptor.for_command(payload))
    assert message in str(caught.value)
