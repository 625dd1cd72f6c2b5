"""How the CLI and the benchmarks reach a running service: the SDK client's credentials (API
token, TLS) and the cluster's Redis URL, as flags with their fallbacks, and SERVE_FILE, the
~/.elasticmoe/serve.json that `moectl serve` writes while it runs and the Redis-only commands
read when given no --redis-url.

Here rather than in cluster/cli because `moectl serve` (this package) and `moectl bench`
(cluster/bench) need these too, and neither may import the CLI.
"""
from __future__ import annotations

import json
import os
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
    SERVE_FILE.parent.mkdir(parents=True, exist_ok=True)
    # 0600: the URL may carry the Redis password
    fd = os.open(SERVE_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"redis_url": url, "port": port, "pid": os.getpid()}, f)


def remove_serve_file() -> None:
    try:
        if json.loads(SERVE_FILE.read_text()).get("pid") == os.getpid():  # only ours
            SERVE_FILE.unlink()
    except (OSError, ValueError):
        pass
