"""Redis URLs: what this project accepts, how it prints them, and what a failed dial means.

    redis://[[user]:password@]host:port/db                     plaintext
    rediss://[[user]:password@]host:port/db?ssl_ca_certs=/ca.pem[&ssl_certfile=/c.pem&ssl_keyfile=/c.key]
                                                                TLS (mutual with a client certificate)
    unix://[[user]:password@]/path/redis.sock?db=0              a local socket

    check_url(url)        -> ValueError naming the part that is wrong (before anything dials)
    check_tls_files(url)  -> ValueError naming a certificate file that is not there (where we dial)
    redact_url(url)       -> the URL with every secret as *** (the only form that may be logged)
    explain_error(e, url) -> one sentence saying what failed and what to change, without a secret

The URL goes to redis-py's `Redis.from_url` as it is. What redis-py 8 does with the query
(redis/connection.py: parse_url, SSLConnection): db, socket_timeout, socket_connect_timeout
and health_check_interval are converted to numbers and ssl_check_hostname to a bool; every
other key is handed on as a string, and a key the connection class does not take fails
only at the first command, with a TypeError. So check_url accepts the keys below and no
other, and ssl_* keys only with rediss://. ssl_cert_reqs is one of none, optional,
required (the default). Certificate and key paths are not secrets and are shown; the
password (userinfo or ?password=) and ssl_password (a key passphrase) are secrets.
"""
from __future__ import annotations

import os
from urllib.parse import parse_qsl, unquote, unquote_plus, urlsplit, urlunsplit

import redis

URL_SCHEMES = ("redis", "rediss", "unix")
SECRET_KEYS = ("password", "ssl_password")
TLS_FILE_KEYS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")  # files; ssl_ca_path is a directory
CERT_REQS = ("none", "optional", "required")
BOOL_WORDS = ("0", "1", "true", "false", "yes", "no", "y", "n", "t", "f")
ENCODE_HINT = ("percent-encode '@ : / ? # %' and spaces in the password and in query values (e.g. %23 for '#', "
               "%2F for '/', %40 for '@')")


def _non_negative_int(value: str) -> bool:
    return value.isdigit()


def _positive_number(value: str) -> bool:
    try:
        return float(value) > 0
    except ValueError:
        return False


def _non_empty(value: str) -> bool:
    return value != ""


# key -> (check of the decoded value, what a good value looks like)
QUERY_KEYS = {
    "db": (_non_negative_int, "an int >= 0"),
    "username": (_non_empty, "a non-empty string"),
    "password": (_non_empty, "a non-empty string"),
    "client_name": (_non_empty, "a non-empty string"),
    "socket_timeout": (_positive_number, "a positive number of seconds"),
    "socket_connect_timeout": (_positive_number, "a positive number of seconds"),
    "health_check_interval": (_non_negative_int, "an int >= 0 (seconds)"),
}
TLS_QUERY_KEYS = {
    "ssl_ca_certs": (_non_empty, "the path of a PEM file of CA certificates"),
    "ssl_ca_path": (_non_empty, "the path of a directory of CA certificates"),
    "ssl_certfile": (_non_empty, "the path of the client certificate (PEM)"),
    "ssl_keyfile": (_non_empty, "the path of the client key (PEM)"),
    "ssl_password": (_non_empty, "the passphrase of ssl_keyfile"),
    "ssl_cert_reqs": (lambda v: v in CERT_REQS, f"one of {', '.join(CERT_REQS)}"),
    "ssl_check_hostname": (lambda v: v.lower() in BOOL_WORDS, "true or false"),
}


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """(scheme, userinfo or None, the rest after it). The userinfo runs to the *last* '@': a password with
    an unencoded '#', '?' or '/' would end urlsplit's netloc early and leave part of itself in the
    fragment, query or path, where nothing would hide it. An '@' further right is over-redacted: safe."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, after = rest.rpartition("@")
    return scheme, (userinfo if at else None), (after if at else rest)


def _shown_userinfo(userinfo: str) -> str:
    # redis://secret@host: redis-py reads a lone userinfo as the password, so hide it too; a user name is
    # shown only when nothing of the password can be in it
    user, has_password, _ = userinfo.partition(":")
    return f"{user}:***" if has_password and not any(c in user for c in "/?#") else "***"


def redact_url(url: str) -> str:
    """The URL with its password (userinfo, ?password=) and ?ssl_password= replaced by ***, safe for logs.
    Everything else (host, port, db, certificate paths) is kept as written."""
    scheme, userinfo, after = _split_userinfo(url)
    head = f"{scheme}://" if scheme else ""
    netloc_user = "" if userinfo is None else _shown_userinfo(userinfo) + "@"
    try:
        parts = urlsplit(f"{head}{netloc_user}{after}")
        # rewrite the raw query pair by pair: paths stay readable (no re-encoding of '/')
        query = "&".join(f"{pair.partition('=')[0]}=***" if _query_key(pair) in SECRET_KEYS else pair
                         for pair in parts.query.split("&")) if parts.query else ""
        return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    except ValueError:  # unparsable (bad brackets, say): show only the scheme, never the rest
        return f"{scheme or 'redis'}://<unparsable>"


def _query_key(pair: str) -> str:
    return unquote_plus(pair.partition("=")[0]).lower()


def url_secrets(url: str) -> list[str]:
    """The secret strings in url, raw and decoded, longest first: what must never be printed."""
    scheme, userinfo, after = _split_userinfo(url)
    found = set()
    if userinfo is not None:
        user, has_password, password = userinfo.partition(":")
        found |= {password, unquote(password)} if has_password else {user, unquote(user)}
        found |= {userinfo} if any(c in user for c in "/?#") else set()  # no telling where the password starts
    try:
        for pair in urlsplit(f"{scheme}://{after}").query.split("&"):
            if _query_key(pair) in SECRET_KEYS:
                raw = pair.partition("=")[2]
                found |= {raw, unquote_plus(raw)}
    except ValueError:
        pass
    return sorted((s for s in found if s), key=len, reverse=True)


def scrub(text: str, secrets: list[str]) -> str:
    """text with every one of secrets replaced by ***."""
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def check_url(url: str) -> None:
    """Raise ValueError unless url is a Redis URL of the forms above; the message names the
    part that is wrong and never holds a secret. Files are not looked at (see check_tls_files)."""
    if not isinstance(url, str):
        raise ValueError(f"redis_url must be a string, got {type(url).__name__}")
    shown = redact_url(url)
    # A URL that does not parse is never echoed, not even redacted: where its password ends is unknown.
    userinfo = _split_userinfo(url)[1]
    if userinfo is not None and any(c in userinfo for c in "/?#"):
        raise ValueError(f"redis_url cannot be parsed (an unencoded '/', '?' or '#' before the last '@', or an '@' "
                         f"after the host): {ENCODE_HINT}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises ValueError on a port that is not a number in range)
    except ValueError as e:
        reason = ("brackets of an IPv6 host do not match" if "IPv6" in str(e)
                  else "the port is not a number in [0, 65535]")
        raise ValueError(f"redis_url cannot be parsed ({reason}): {ENCODE_HINT}") from None
    if parts.scheme not in URL_SCHEMES:
        raise ValueError(f"redis_url must start with one of {', '.join(s + '://' for s in URL_SCHEMES)}, got {shown}")
    allowed = {**QUERY_KEYS, **TLS_QUERY_KEYS}
    seen = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in seen:
            raise ValueError(f"redis_url {shown} gives {key} twice")
        seen[key] = value
        if key not in allowed:
            raise ValueError(f"redis_url {shown}: unknown query key {key!r} (known: {', '.join(sorted(allowed))})")
        if key in TLS_QUERY_KEYS and parts.scheme != "rediss":
            raise ValueError(f"redis_url {shown}: {key} is a TLS setting and needs rediss://, not {parts.scheme}://")
        ok, wanted = allowed[key]
        if not ok(value):
            shown_value = "***" if key in SECRET_KEYS else repr(value)
            raise ValueError(f"redis_url {shown}: {key} must be {wanted}, got {shown_value}")
    if "ssl_keyfile" in seen and "ssl_certfile" not in seen:
        raise ValueError(f"redis_url {shown}: ssl_keyfile needs ssl_certfile (the client certificate it belongs to)")


def tls_files(url: str) -> dict[str, str]:
    """{query key: path} for the certificate files and CA directory a rediss:// URL names."""
    return {k: v for k, v in parse_qsl(urlsplit(url).query) if k in TLS_FILE_KEYS + ("ssl_ca_path",)}


def check_tls_files(url: str) -> None:
    """Raise ValueError naming the first certificate file (or CA directory) in url that this
    process cannot read. Run where the connection is made: paths are those of that machine."""
    for key, path in tls_files(url).items():
        want_dir = key == "ssl_ca_path"
        if not (os.path.isdir(path) if want_dir else os.path.isfile(path)) or not os.access(path, os.R_OK):
            raise ValueError(f"redis_url {redact_url(url)}: {key}={path} is not a readable "
                             f"{'directory' if want_dir else 'file'} here")


def tls_unverified(url: str) -> bool:
    """True for a rediss:// URL that turns certificate checking off (ssl_cert_reqs=none)."""
    return dict(parse_qsl(urlsplit(url).query)).get("ssl_cert_reqs") == "none"


def explain_error(error: BaseException, url: str) -> str:
    """One line for an error from a command sent to url: what failed, and what to change.
    Holds url only in redacted form, and no secret even if redis-py's message had one."""
    shown, tls = redact_url(url), url.startswith("rediss://")
    text = scrub(str(error), url_secrets(url))
    low = text.lower()
    if isinstance(error, redis.AuthenticationError) or "wrongpass" in low or "noauth" in low:
        if "invalid username-password" in low or "wrongpass" in low or "invalid password" in low:
            return (f"Redis at {shown} refused the credentials in the URL (wrong password or user): "
                    f"check the password in redis_url")
        if "without any password configured" in low:
            return f"Redis at {shown} has no password set but the URL gives one: remove it from redis_url"
        return (f"Redis at {shown} requires a password and the URL gives none: "
                f"use redis{'s' if tls else ''}://:PASSWORD@host:port/db ({text})")
    if isinstance(error, (redis.ConnectionError, redis.TimeoutError)):
        if "certificate verify failed" in low:
            return (f"TLS to {shown}: the server's certificate did not verify ({_ssl_reason(text)}): set "
                    f"ssl_ca_certs in redis_url to the CA that signed it, and dial a name or address it carries")
        if "wrong version number" in low:
            return f"TLS to {shown} failed ({text}): that port speaks plaintext; use redis:// or the TLS port"
        if tls and isinstance(error, redis.TimeoutError) and "connecting" in low:
            # measured: a TLS hello sent to a plaintext redis-server port gets no answer at all
            return (f"no TLS handshake with {shown} in time ({text}): the port may be plaintext (use "
                    f"redis://), or Redis is unreachable")
        if tls and ("eof occurred" in low or "alert" in low or "certificate required" in low):
            return (f"TLS to {shown}: the server ended the session ({text}): it may require a client "
                    f"certificate; add ssl_certfile and ssl_keyfile to redis_url")
        if "refused" in low:
            return f"nothing listens at {shown} ({text}): is Redis running, and is the port right?"
        if not tls and ("reset by peer" in low or "closed by server" in low):
            return (f"Redis at {shown} closed the connection before answering ({text}): if that port "
                    f"speaks TLS, use rediss:// with ssl_ca_certs=/path/to/ca.pem")
        if "no such file" in low:
            return f"cannot dial {shown}: a file it names is missing ({text})"
        return f"cannot reach Redis at {shown}: {text}"
    return f"Redis at {shown}: {type(error).__name__}: {text}"


def _ssl_reason(text: str) -> str:
    """'certificate verify failed: self-signed certificate in certificate chain' out of redis-py's message."""
    start = text.lower().find("certificate verify failed")
    return text[start:].split(" (_ssl.c")[0].rstrip(".") if start >= 0 else text
