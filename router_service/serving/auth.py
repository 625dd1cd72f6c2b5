"""Bearer-token authentication of the client API (elasticmoe.v1.MoEService).

    sources: token file (one a line, # comments) | $VAR (comma-separated) | SHA-256 digests
        -> TokenAuth(digests)                      (raw tokens are hashed and dropped at once)
    call metadata `authorization: Bearer <t>` -> TokenAuth.check() -> ok | AuthError (UNAUTHENTICATED)

Only SHA-256 digests of the tokens are kept, and every check hashes the presented token
and compares it with hmac.compare_digest against *every* digest, without stopping at a
match: the time taken depends on the number of tokens, not on which one matched, nor on
how many leading characters of a guess were right, nor on the guess's length (digests are
all 32 bytes). A digest can be shipped to a router replica (RouterConfig.api_token_sha256)
and logged without giving the token away, provided tokens are long and random: hence
MIN_TOKEN_CHARS. Nothing here logs or echoes a token; logs carry the count and
`fingerprint`, a digest of the whole set, which tells two processes hold the same tokens.

Imports only the standard library and grpc: `moectl serve` validates the token sources
with it before starting anything.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import grpc

log = logging.getLogger(__name__)

TOKENS_ENV = "ELASTICMOE_API_TOKENS"  # server side: comma-separated accepted tokens
CLIENT_TOKEN_ENV = "ELASTICMOE_API_TOKEN"  # client side (moectl): the one token to send
MIN_TOKEN_CHARS = 16  # a short token can be guessed, and its digest reversed by brute force
# Printable ASCII without space (gRPC metadata values are printable ASCII; a Bearer token has no
# blanks) and without ',' (the separator of the environment variable).
_TOKEN = re.compile(r"[\x21-\x2b\x2d-\x7e]+")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_BEARER = re.compile(r"bearer[ ]+(\S+)[ ]*", re.IGNORECASE)  # RFC 6750: the scheme is case-insensitive

MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
MALFORMED = "malformed authorization metadata: expected one 'authorization: Bearer <token>'"
WRONG = "invalid bearer token"


class AuthError(Exception):
    """The call carries no valid token; the servicer answers UNAUTHENTICATED with `message`,
    which never contains what the caller sent."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class TokenSourceError(ValueError):
    """A token file or variable that cannot be used; the message says where (line number, never the token)."""


def digest(token: str) -> str:
    """SHA-256 hex of a token: what a router replica is given instead of the token itself."""
    return hashlib.sha256(token.encode()).hexdigest()


def _checked(token: str, where: str) -> str:
    if not _TOKEN.fullmatch(token):
        raise TokenSourceError(f"{where}: a token must be printable ASCII without spaces or commas")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenSourceError(f"{where}: a token must have at least {MIN_TOKEN_CHARS} characters, got "
                               f"{len(token)} (make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def parse_token_file(text: str, source: str = "token file") -> list[str]:
    """One token a line; blank lines and lines starting with '#' are skipped."""
    tokens = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(_checked(line, f"{source}, line {n}"))
    return tokens


def parse_token_list(value: str, source: str = f"${TOKENS_ENV}") -> list[str]:
    """Comma-separated tokens; blanks around commas are ignored."""
    return [_checked(t.strip(), f"{source}, token {i}") for i, t in enumerate(value.split(","), 1) if t.strip()]


def read_token_file(path: str | os.PathLike) -> list[str]:
    path = Path(path)
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TokenSourceError(f"token file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenSourceError(f"token file {path} cannot be read: {e.__class__.__name__}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("token file %s is readable by group or others (mode %o); chmod 600 it", path, mode & 0o777)
    return parse_token_file(text, f"token file {path}")


def read_tokens(file: str | os.PathLike | None = None, env_var: str | None = None,
                environ: Mapping[str, str] = os.environ) -> list[str]:
    """Tokens from a file and/or an environment variable (an unset variable gives none)."""
    tokens = read_token_file(file) if file else []
    if env_var and environ.get(env_var):
        tokens += parse_token_list(environ[env_var], f"${env_var}")
    return tokens


def read_client_token(file: str | os.PathLike) -> str:
    """The one token a client sends, from a file in the same format."""
    tokens = read_token_file(file)
    if len(tokens) != 1:
        raise TokenSourceError(f"token file {file} holds {len(tokens)} tokens; a client sends exactly one")
    return tokens[0]


class TokenAuth:
    """Accepts calls whose `authorization` metadata is `Bearer <t>` with t among the tokens."""

    def __init__(self, sha256_hex: Iterable[str]):
        digests = sorted(set(sha256_hex))
        if not digests:
            raise TokenSourceError("authentication is on but no token was given: it would refuse every call")
        for i, d in enumerate(digests):
            if not isinstance(d, str) or not _SHA256_HEX.fullmatch(d):
                raise TokenSourceError(f"token digest {i} is not 64 lowercase hex characters (SHA-256)")
        self._digests = [bytes.fromhex(d) for d in digests]
        self.fingerprint = hashlib.sha256(b"".join(self._digests)).hexdigest()[:12]

    @classmethod
    def from_tokens(cls, tokens: Iterable[str]) -> "TokenAuth":
        return cls(digest(t) for t in tokens)

    @classmethod
    def from_sources(cls, sha256_hex: Sequence[str] = (), file: str | None = None, env_var: str | None = None,
                     environ: Mapping[str, str] = os.environ) -> "TokenAuth | None":
        """None when no source is configured (authentication off: the caller decides whether that is
        allowed, RouterConfig.allow_unauthenticated). With a source configured, the sources must yield at
        least one token: a missing file, an unset variable, or an empty path fails closed."""
        if file is not None and (not isinstance(file, str) or not file.strip()):
            # "" once read as "no file", which turned authentication off without a word
            raise TokenSourceError("api_tokens_file is empty: give the path of a token file, or leave the key out")
        if env_var is not None and not env_var:
            raise TokenSourceError("api_tokens_env is empty: name the variable holding the tokens, or leave it out")
        if not (sha256_hex or file or env_var):
            return None
        if env_var and not environ.get(env_var):
            raise TokenSourceError(f"authentication reads ${env_var}, which is unset or empty here")
        return cls([*sha256_hex, *(digest(t) for t in read_tokens(file, env_var, environ))])

    def __len__(self) -> int:
        return len(self._digests)

    def check(self, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Raise AuthError unless the metadata carries exactly one valid bearer token."""
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            raise AuthError(MISSING)
        value = values[0]
        if isinstance(value, bytes):
            value = value.decode("ascii", "replace")
        match = _BEARER.fullmatch(value) if len(values) == 1 else None
        if match is None:
            raise AuthError(MALFORMED)
        presented = hashlib.sha256(match.group(1).encode()).digest()
        ok = False
        for d in self._digests:  # every digest, no early exit: time does not tell which one matched
            ok |= hmac.compare_digest(presented, d)
        if not ok:
            raise AuthError(WRONG)
