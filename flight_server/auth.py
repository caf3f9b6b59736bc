"""Who may call the Flight server: bearer tokens, each with a name and a role, checked in server
middleware before any handler runs.

A client sends ``authorization: Bearer <token>`` on every call (``proto_docs/flight-protocol.md``
§12). The server keeps only each token's SHA-256 (tokens are 256-bit random strings, so a fast
hash is as good as a slow one) and compares the presented token's digest with every known one in
constant time. Roles: ``read`` (queries, live streams, statistics, sessions, coverage) and
``admin`` (that, and maintenance actions). With no token configured the server is open, which is
only allowed on a loopback address (see :class:`~ibstream.settings.Settings`).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

import pyarrow.flight as flight

from ibstream.core.errors import InvalidConfigError, PermissionDeniedError, UnauthenticatedError, shown, tagged

ROLES = ("read", "admin")
HEADER = "authorization"
SCHEME = "Bearer "


@dataclass(frozen=True)
class Caller:
    """Who a call comes from: a token's name and role (``anonymous``/``admin`` when auth is off)."""

    name: str
    role: str

    def require(self, role: str, what: str) -> None:
        if role == "admin" and self.role != "admin":
            raise PermissionDeniedError(
                f"{what} needs a token with role 'admin'; the token {self.name!r} has role {self.role!r}")


ANONYMOUS = Caller("anonymous", "admin")


@dataclass(frozen=True)
class TokenEntry:
    """A known token: its name, role and ``sha256:<hex>`` digest (never the token itself)."""

    name: str
    role: str
    sha256: str

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.sha256.removeprefix("sha256:"))


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe text)."""
    return secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    """``sha256:<hex>``: how a token is stored in settings and token files."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def token_line(name: str, role: str, token: str) -> str:
    """A token file line: ``<name> <role> sha256:<hex>``."""
    return f"{name} {role} {token_digest(token)}"


def check_entry(name: str, role: str, sha256: str, where: str) -> TokenEntry:
    if not name or any(c.isspace() for c in name):
        raise InvalidConfigError(f"{where}: token name was {shown(name)}; use a name without spaces, e.g. alice")
    if role not in ROLES:
        raise InvalidConfigError(f"{where}: role was {shown(role)}; use read or admin")
    hexdigest = sha256.removeprefix("sha256:")
    if not sha256.startswith("sha256:") or len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
        raise InvalidConfigError(f"{where}: the digest was {shown(sha256)}; use sha256:<64 hex digits> as "
                                 "`ibstream token` prints it (never the token itself)")
    return TokenEntry(name, role, sha256)


def read_token_file(path: Path) -> list[TokenEntry]:
    """Token entries of a file: one ``<name> <role> sha256:<hex>`` per line; ``#`` starts a comment."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "it is not UTF-8 text"
        raise InvalidConfigError(f"the token file {path} cannot be read ({reason}); "
                                 "check IBSTREAM_TOKEN_FILE") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3:
            raise InvalidConfigError(f"{path} line {number}: expected '<name> <role> sha256:<hex>', got "
                                     f"{len(parts)} fields")
        name, role, digest = parts
        entries.append(check_entry(name, role, digest, where=f"{path} line {number}"))
    return entries


def token_entries(settings) -> list[TokenEntry]:
    """The tokens a server started with ``settings`` knows: ``tokens`` and the ``token_file``'s."""
    entries = [check_entry(t.name, t.role, t.sha256, "IBSTREAM_TOKENS") for t in settings.tokens]
    return entries + (read_token_file(settings.token_file) if settings.token_file is not None else [])


class Authenticator:
    """Turns an ``authorization`` header into a :class:`Caller`, or refuses it."""

    def __init__(self, entries: list[TokenEntry]):
        names = [e.name for e in entries]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise InvalidConfigError(f"token names must be distinct; {', '.join(twice)} appear more than once")
        self.entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def caller(self, values: list[str | bytes]) -> Caller:
        if not self.enabled:
            return ANONYMOUS
        if not values:
            raise UnauthenticatedError(
                f"this server needs a token: send the header '{HEADER}: Bearer <token>' "
                "(ibstream.Client(token=...) or IBSTREAM_TOKEN)")
        value = values[0].decode(errors="replace") if isinstance(values[0], bytes) else values[0]
        if value[:len(SCHEME)].lower() != SCHEME.lower():  # the auth scheme is case-insensitive (RFC 9110 §11.1)
            raise UnauthenticatedError(f"the {HEADER} header must be 'Bearer <token>'; got a value not starting "
                                       "with 'Bearer '")
        digest = hashlib.sha256(value[len(SCHEME):].strip().encode()).digest()
        found = None
        for entry in self.entries:  # every entry, so the time taken says nothing about which one matched
            if hmac.compare_digest(entry.digest, digest):
                found = entry
        if found is None:
            raise UnauthenticatedError("the token is not one this server knows; ask its operator for one "
                                       "(`ibstream token`)")
        return Caller(found.name, found.role)


class _CallerMiddleware(flight.ServerMiddleware):
    def __init__(self, caller: Caller):
        self.caller = caller


class AuthMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call; handlers read ``context.get_middleware("auth").caller``."""

    def __init__(self, authenticator: Authenticator):
        super().__init__()
        self.authenticator = authenticator

    def start_call(self, info, headers):
        try:
            return _CallerMiddleware(self.authenticator.caller(headers.get(HEADER, [])))
        except UnauthenticatedError as exc:
            raise flight.FlightUnauthenticatedError(tagged(exc)) from None


def caller_of(context) -> Caller:
    """The caller of a handler's call (anonymous when the server runs without middleware)."""
    middleware = context.get_middleware("auth") if context is not None else None
    return middleware.caller if middleware is not None else ANONYMOUS
