"""How the CLI and the benchmarks reach a running service: the SDK client's credentials (API
token, TLS) and the cluster's Redis URL, as flags with their fallbacks, and SERVE_FILE, the
~/.elasticmoe/serve.json that `moectl serve` writes while it runs and the Redis-only commands
read when given no --redis-url.

Here rather than in cluster/cli because `moectl serve` (this package) and `moectl bench`
(cluster/bench) need these too, and neither may import the CLI.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

SERVE_FILE = Path(os.environ.get("ELASTICMOE_HOME", Path.home() / ".elasticmoe")) / "serve.json"


def add_client_arguments(p) -> None:
    """Credentials of the SDK's client: a bearer token and TLS (router_service/client)."""
    p.add_argument("--token-file", default=None, metavar="PATH",
                   help="file holding the API token (one line, '#' comments); default: $ELASTICMOE_API_TOKEN if set")
    p.add_argument("--tls", action="store_true", help="TLS, the server checked against the system's roots")
    p.add_argument("--tls-ca", default=None, metavar="PEM", help="TLS, the server checked against this CA bundle")
    p.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", default=None, metavar="PEM", help="client private key for mutual TLS")
    p.add_argument("--tls-server-name", default=None, metavar="NAME",
                   help="the name the server's certificate must carry, when the address is another (an IP)")


def client_options(args, environ=None) -> dict:
    """MoEClient keyword arguments (token, tls, tls_server_name) from add_client_arguments' flags."""
    from router_service.serving.auth import CLIENT_TOKEN_ENV, read_client_token

    environ = os.environ if environ is None else environ
    token = read_client_token(args.token_file) if args.token_file else environ.get(CLIENT_TOKEN_ENV) or None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key go together (mutual TLS)")
    if args.tls_cert:
        tls = (args.tls_ca, args.tls_cert, args.tls_key)
    else:
        tls = args.tls_ca or args.tls
    return {"token": token, "tls": tls, "tls_server_name": args.tls_server_name}


def add_redis_arguments(p) -> None:
    p.add_argument("--redis-url", default=None,
                   help=f"cluster state; default $ELASTICMOE_REDIS_URL, else what `moectl serve` wrote to {SERVE_FILE}")
    p.add_argument("--namespace", default="elasticmoe", help="Redis key prefix of the cluster (default elasticmoe)")


def redis_url(args) -> str:
    if args.redis_url:
        return args.redis_url
    if os.environ.get("ELASTICMOE_REDIS_URL"):
        return os.environ["ELASTICMOE_REDIS_URL"]
    try:
        return json.loads(SERVE_FILE.read_text())["redis_url"]
    except (OSError, ValueError, KeyError):
        raise ValueError(f"no Redis to read: pass --redis-url, set ELASTICMOE_REDIS_URL, or start `moectl serve` "
                         f"(it writes {SERVE_FILE})") from None


def write_serve_file(url: str, port: int) -> None:
    """Write SERVE_FILE, mode 0600 (the URL carries the Redis password) on every write: into a new file
    that mkstemp creates 0600 with O_EXCL, then renamed over SERVE_FILE. A file already there keeps no
    mode of its own, and a symlink planted there is replaced, never followed (rename does not follow)."""
    SERVE_FILE.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=SERVE_FILE.parent, prefix=".serve-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"redis_url": url, "port": port, "pid": os.getpid()}, f)
        os.replace(tmp, SERVE_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_serve_file() -> None:
    try:
        if json.loads(SERVE_FILE.read_text()).get("pid") == os.getpid():  # only ours
            SERVE_FILE.unlink()
    except (OSError, ValueError):
        pass
