"""Access control on a real server: TLS (and mutual TLS) with certificates made here, bearer tokens
with roles over every RPC, a per-token stream cap, and binding rules."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
from pathlib import Path

import pyarrow.flight as flight
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pydantic import ValidationError

from ibstream.clients import Client
from ibstream.core.errors import (
    InvalidConfigError,
    PermissionDeniedError,
    ServerBusyError,
    ServerUnavailableError,
    UnauthenticatedError,
)
from ibstream.flight_server import FlightServer
from ibstream.flight_server.auth import read_token_file, token_line
from ibstream.flight_server.commands import command
from ibstream.settings import Settings
from ibstream.storage import Store
from ibstream.storage.synthetic import MNQ
from tests.helpers import ticks, utc

CID = MNQ.contract_id
READER, ADMIN = "reader-token-0123456789", "admin-token-9876543210"
START, END = utc(2025, 1, 10, 14), utc(2025, 1, 10, 15)


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_key, issuer_name: x509.Name | None, *, ca: bool, sans=()) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A certificate authority, a server certificate for 127.0.0.1/localhost and a client certificate."""
    root = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("ibstream test CA", ca_key, ca_key, None, ca=True)
    server_key, client_key = _key(), _key()
    server = _cert("localhost", server_key, ca_key, ca.subject, ca=False,
                   sans=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client = _cert("analyst", client_key, ca_key, ca.subject, ca=False)
    files = {"ca": ca.public_bytes(serialization.Encoding.PEM), "server": server.public_bytes(serialization.Encoding.PEM),
             "server_key": _pem_key(server_key), "client": client.public_bytes(serialization.Encoding.PEM),
             "client_key": _pem_key(client_key)}
    paths = {}
    for name, data in files.items():
        paths[name] = root / f"{name}.pem"
        paths[name].write_bytes(data)
    return paths


def start(tmp_path: Path, **settings) -> tuple[FlightServer, str]:
    values = dict(data_root=tmp_path / "data", flight_port=0, fsync="none")
    store = Store(Settings(**(values | settings)))
    store.append(CID, "bid_ask", ticks(START, 1_000))
    server = FlightServer(store, settings=Settings(**(values | settings)))
    scheme = "grpc+tls" if "tls_cert_file" in settings else "grpc"
    return server, f"{scheme}://127.0.0.1:{server.port}"


@pytest.fixture
def token_file(tmp_path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# name role digest\n{token_line('reader', 'read', READER)}\n{token_line('ops', 'admin', ADMIN)}\n")
    return path


@pytest.fixture
def secured(tmp_path, pki, token_file):
    server, location = start(tmp_path, tls_cert_file=pki["server"], tls_key_file=pki["server_key"],
                             token_file=token_file, max_streams_per_token=2)
    yield server, location
    server.shutdown()
    server.store.close()


CALLS = {
    "get_flight_info": lambda c: c.get_flight_info(flight.FlightDescriptor.for_command(command(CID, "bid_ask", START, END))),
    "get_schema": lambda c: c.get_schema(flight.FlightDescriptor.for_command(command(CID, "bid_ask", START, END))),
    "do_get": lambda c: c.do_get(c.get_flight_info(flight.FlightDescriptor.for_command(
        command(CID, "bid_ask", START, END))).endpoints[0].ticket).read_all(),
    "list_flights": lambda c: list(c.list_flights()),
    "list_actions": lambda c: c.list_actions(),
    "do_action statistics": lambda c: list(c.do_action(flight.Action("statistics", json.dumps(
        {"contract_id": CID}).encode()))),
    "do_action scrub": lambda c: list(c.do_action(flight.Action("scrub", b'{"files": 1}'))),
}
UNAUTHENTICATED = {name: flight.FlightUnauthenticatedError for name in CALLS} | {
    "get_schema": OSError}  # pyarrow raises get_schema's UNAUTHENTICATED as a plain OSError (the message is ours)
EXPECTED = {  # token -> what each call gets
    None: UNAUTHENTICATED,
    "wrong-token": UNAUTHENTICATED,
    READER: {name: None for name in CALLS} | {"do_action scrub": flight.FlightUnauthorizedError},
    ADMIN: {name: None for name in CALLS},
}


@pytest.mark.parametrize("token", list(EXPECTED), ids=["no token", "wrong token", "read", "admin"])
def test_every_rpc_needs_a_token_of_the_right_role(secured, pki, token):
    _, location = secured
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    client = flight.connect(location, tls_root_certs=pki["ca"].read_bytes())
    options = flight.FlightCallOptions(headers=headers)
    try:
        for name, call in CALLS.items():
            expected = EXPECTED[token][name]
            wrapped = lambda c, call=call: call(_WithOptions(c, options))  # noqa: E731
            if expected is None:
                wrapped(client)
                continue
            with pytest.raises(expected) as caught:
                wrapped(client)
            message = str(caught.value)
            if token is None:
                assert "[ibstream.unauthenticated] this server needs a token: send the header 'authorization: " \
                       "Bearer <token>'" in message, (name, message)
            elif token == "wrong-token":
                assert "[ibstream.unauthenticated] the token is not one this server knows" in message, (name, message)
            else:
                assert ("[ibstream.permission_denied] action 'scrub' needs a token with role 'admin'; the token "
                        "'reader' has role 'read'") in message, message
    finally:
        client.close()


class _WithOptions:
    """A FlightClient whose calls all carry ``options`` (what a plain pyarrow client does by hand)."""

    def __init__(self, client: flight.FlightClient, options: flight.FlightCallOptions):
        self._client, self._options = client, options

    def __getattr__(self, name):
        method = getattr(self._client, name)
        return lambda *args: method(*args, options=self._options)


def test_our_client_sends_its_token_and_maps_the_errors(secured, pki, monkeypatch):
    _, location = secured
    with Client(location, token=READER, tls_root_certs=pki["ca"]) as client:
        assert client.ticks(CID, "bid_ask", START, END).height == 1_000
        with pytest.raises(PermissionDeniedError, match="needs a token with role 'admin'"):
            client._action("scrub", files=1)
    monkeypatch.setenv("IBSTREAM_TOKEN", ADMIN)
    monkeypatch.setenv("IBSTREAM_TLS_ROOT_CERTS", str(pki["ca"]))
    with Client(location) as client:  # both from the environment
        assert client.ticks(CID, "bid_ask", START, END).height == 1_000
    monkeypatch.delenv("IBSTREAM_TOKEN")
    with Client(location) as client, pytest.raises(UnauthenticatedError, match="this server needs a token"):
        client.ticks(CID, "bid_ask", START, END)


def test_a_plaintext_client_against_a_tls_server_gets_a_clear_message(secured):
    _, location = secured
    plain = location.replace("grpc+tls://", "grpc://")
    with Client(plain, token=READER) as client, pytest.raises(ServerUnavailableError) as caught:
        client.ticks(CID, "bid_ask", START, END)
    assert "connect with grpc+tls://" in str(caught.value) or "a TLS problem" in str(caught.value), str(caught.value)


def test_an_unknown_certificate_authority_is_a_tls_problem(secured):
    _, location = secured
    with Client(location, token=READER) as client, pytest.raises(ServerUnavailableError) as caught:
        client.ticks(CID, "bid_ask", START, END)
    assert "a TLS problem" in str(caught.value) and "tls_root_certs" in str(caught.value), str(caught.value)


def test_mutual_tls_needs_a_client_certificate(tmp_path, pki, token_file):
    server, location = start(tmp_path, tls_cert_file=pki["server"], tls_key_file=pki["server_key"],
                             tls_client_ca_file=pki["ca"], token_file=token_file)
    try:
        with Client(location, token=READER, tls_root_certs=pki["ca"], tls_client_cert=pki["client"],
                    tls_client_key=pki["client_key"]) as client:
            assert client.ticks(CID, "bid_ask", START, END).height == 1_000
        with Client(location, token=READER, tls_root_certs=pki["ca"]) as client, \
                pytest.raises(ServerUnavailableError):
            client.ticks(CID, "bid_ask", START, END)
    finally:
        server.shutdown()
        server.store.close()


def test_one_token_cannot_take_every_stream_slot(secured, pki):
    _, location = secured
    descriptor = flight.FlightDescriptor.for_command(command(CID, "bid_ask", START, live=True))
    with Client(location, token=READER, tls_root_certs=pki["ca"]) as reader, \
            Client(location, token=ADMIN, tls_root_certs=pki["ca"]) as admin:
        ticket = reader._flight.get_flight_info(descriptor).endpoints[0].ticket
        held = [reader._flight.do_get(ticket) for _ in range(2)]
        for stream in held:
            assert stream.read_chunk().data.num_rows > 0  # started, holding a slot
        with pytest.raises(flight.FlightUnavailableError) as caught:
            reader._flight.do_get(ticket).read_chunk()
        assert ("server busy for token 'reader': it holds 2 streams (IBSTREAM_MAX_STREAMS_PER_TOKEN)"
                in str(caught.value))
        assert admin.ticks(CID, "bid_ask", START, END).height == 1_000  # another token is served
        for stream in held:
            stream.cancel()
    assert ServerBusyError.code == "server_busy"


def test_another_address_than_loopback_needs_tls_and_tokens(tmp_path, pki, token_file, caplog):
    with pytest.raises(ValidationError, match="flight_host 0.0.0.0 is not a loopback address: serving it needs TLS "
                                              r"\(IBSTREAM_TLS_CERT_FILE, IBSTREAM_TLS_KEY_FILE\) and tokens"):
        Settings(flight_host="0.0.0.0")
    with pytest.raises(ValidationError, match="serving it needs tokens"):
        Settings(flight_host="0.0.0.0", tls_cert_file=pki["server"], tls_key_file=pki["server_key"])
    Settings(flight_host="0.0.0.0", tls_cert_file=pki["server"], tls_key_file=pki["server_key"], token_file=token_file)
    assert Settings(flight_host="::1").loopback and Settings(flight_host="localhost").loopback
    with caplog.at_level(logging.WARNING):
        server, _ = start(tmp_path, flight_host="0.0.0.0", allow_insecure=True)
    try:
        assert "serving grpc://0.0.0.0:" in caplog.text and "without TLS and tokens (IBSTREAM_ALLOW_INSECURE)" \
            in caplog.text
    finally:
        server.shutdown()
        server.store.close()


@pytest.mark.parametrize("line, message", [
    ("alice read", "line 1: expected '<name> <role> sha256:<hex>', got 2 fields"),
    ("alice write sha256:" + "0" * 64, "line 1: role was 'write'; use read or admin"),
    ("alice read my-secret-token", "line 1: the digest was 'my-secret-token'; use sha256:<64 hex digits>"),
])
def test_a_bad_token_file_is_refused_by_line(tmp_path, line, message):
    path = tmp_path / "tokens"
    path.write_text(line + "\n")
    with pytest.raises(InvalidConfigError, match=message):
        read_token_file(path)


def test_a_token_made_by_the_cli_opens_the_server(tmp_path):
    import subprocess
    import sys

    from tests.helpers import ROOT

    tokens = tmp_path / "tokens"
    made = subprocess.run([sys.executable, "-m", "ibstream.cli", "token", "--name", "alice", "--token-file",
                           str(tokens)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert made.returncode == 0, made.stderr
    secret = made.stdout.strip()
    assert f"added 'alice' (read) to {tokens}" in made.stderr and secret not in tokens.read_text()
    assert oct(tokens.stat().st_mode & 0o777) == "0o600"
    server, location = start(tmp_path, token_file=tokens)
    try:
        with Client(location, token=secret) as client:
            assert client.ticks(CID, "bid_ask", START, END).height == 1_000
        with Client(location, token=secret[:-1] + "x") as client, pytest.raises(UnauthenticatedError):
            client.ticks(CID, "bid_ask", START, END)
    finally:
        server.shutdown()
        server.store.close()


def test_hostile_authorization_headers_are_unauthenticated(tmp_path, token_file):
    """1,000 seeded headers: wrong schemes, garbage, huge values, many values, near-miss tokens; each
    UNAUTHENTICATED with our message, the real token still served afterwards."""
    import random

    server, location = start(tmp_path, token_file=token_file)
    rng = random.Random(14)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=+/ ."
    client = flight.connect(location)
    try:
        sent = 0
        for i in range(1_000):
            kind = i % 5
            if kind == 0:
                values = ["Bearer " + "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 64)))]
            elif kind == 1:
                values = [rng.choice(["Basic dXNlcjpwYXNz", "bearer " + READER + "x", "Bearer", "Bearer  ", "", "Token x"])]
            elif kind == 2:
                values = ["Bearer " + "x" * rng.choice([1_000, 6_000])]
            elif kind == 3:
                values = ["Bearer " + READER[:-1] + rng.choice("abc"), "Bearer " + ADMIN + "x"]
            else:
                values = ["Bearer " + "".join(rng.choice(alphabet) for _ in range(8))] * rng.randint(2, 20)
            options = flight.FlightCallOptions(headers=[(b"authorization", v.encode()) for v in values])
            with pytest.raises((flight.FlightUnauthenticatedError, OSError)) as caught:
                list(client.list_flights(options=options))
            assert "[ibstream.unauthenticated]" in str(caught.value), str(caught.value)[:300]
            sent += 1
        assert sent == 1_000
        good = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {READER}".encode())])
        assert [f.total_records for f in client.list_flights(options=good)] == [1_000]
        lower = flight.FlightCallOptions(headers=[(b"authorization", f"bearer {READER}".encode())])
        assert [f.total_records for f in client.list_flights(options=lower)] == [1_000]  # the scheme's case is free
    finally:
        client.close()
        server.shutdown()
        server.store.close()


def test_an_empty_token_file_does_not_open_another_address(tmp_path, pki):
    empty = tmp_path / "tokens"
    empty.write_text("# nobody yet\n")
    with pytest.raises(InvalidConfigError, match="no usable token is configured"):
        start(tmp_path, flight_host="0.0.0.0", tls_cert_file=pki["server"], tls_key_file=pki["server_key"],
              token_file=empty)
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidConfigError, match="it is not UTF-8 text"):
        read_token_file(binary)


def test_a_token_over_plaintext_to_another_host_is_warned_about():
    import warnings

    from ibstream.clients import Client

    with pytest.warns(UserWarning, match=r"sending a token to grpc://192\.0\.2\.1:8815 without TLS"):
        Client("grpc://192.0.2.1:8815", token="secret").close()  # gRPC connects lazily: nothing is sent here
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for location in ("grpc://127.0.0.1:8815", "grpc://localhost:8815", "grpc://[::1]:8815",
                         "grpc+tls://192.0.2.1:8815"):
            Client(location, token="secret").close()
        Client("grpc://192.0.2.1:8815").close()  # no token, nothing to leak
