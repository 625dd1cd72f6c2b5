"""Credentials of the internal expert API: a cluster secret on every call, optional mutual TLS.

    controller: ExpertCredentials.generate() (or from its config) --Ray--> groups (ExpertGroupConfig)
                                                                  --Ray--> routers (RouterDeployment args)
    caller  --metadata `x-elasticmoe-cluster-secret: <secret>`--> group's grpc.aio server
            SecretCheck (a server interceptor): no or wrong secret -> UNAUTHENTICATED before any
            handler runs, so nothing is decoded or computed
    TLS (optional): one CA, and one certificate + key that every party presents (groups as
            servers, routers and the controller as clients); the servers require a client
            certificate signed by that CA (mutual TLS)

Why a shared secret and not only NetworkPolicies: an expert port answers anything that reaches
it, and Forward runs the model's weights on whatever it is sent. The secret is made per cluster
(32 random bytes) unless the operator gives one, travels only inside Ray (actor and deployment
arguments, never logs), and is compared in constant time: both sides are hashed to 32 bytes and
compared with hmac.compare_digest, so neither the time nor an error tells how much of a guess
was right. `repr()` never shows it, nor a digest of it (a digest of a weak, human-chosen
secret could be brute-forced from logs).

TLS files are read by each process that uses them (a group, a router replica, the controller),
so on Kubernetes the same Secret is mounted on every Ray pod. Group addresses are IPs, so the
certificate is checked against `server_name` (a DNS name the certificate must carry), not the IP.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from cluster.config import config_from_dict

log = logging.getLogger(__name__)

SECRET_METADATA = "x-elasticmoe-cluster-secret"
MIN_SECRET_CHARS = 16
DEFAULT_SERVER_NAME = "elasticmoe-expert"
MISSING = f"missing cluster secret: the expert API needs metadata '{SECRET_METADATA}'"
WRONG = "wrong cluster secret"


class CredentialsError(ValueError):
    """Unusable credentials settings or files; the message names the field or file, never the secret."""


@dataclass(frozen=True)
class ExpertTLS:
    ca_file: str  # PEM: the CA that signed every party's certificate
    cert_file: str  # PEM: this cluster's certificate (SAN must include server_name)
    key_file: str  # PEM: its private key
    server_name: str = DEFAULT_SERVER_NAME  # the name clients check on the groups' certificate

    def __post_init__(self) -> None:
        for name in ("ca_file", "cert_file", "key_file", "server_name"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise CredentialsError(f"expert_tls.{name} must be a non-empty string, got {getattr(self, name)!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "ExpertTLS":
        try:
            return config_from_dict(cls, d)
        except TypeError as e:  # a required key missing
            raise CredentialsError(f"expert_tls: {e}") from None

    def _read(self, name: str) -> bytes:
        path = getattr(self, name)
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise CredentialsError(f"expert_tls.{name} {path} cannot be read: {e.strerror or e}") from None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self._read("key_file"), self._read("cert_file"))],
                                           root_certificates=self._read("ca_file"), require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self._read("ca_file"),
                                            private_key=self._read("key_file"),
                                            certificate_chain=self._read("cert_file"))


@dataclass(frozen=True)
class ExpertCredentials:
    secret: str = field(repr=False)
    tls: ExpertTLS | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or len(self.secret) < MIN_SECRET_CHARS or not self.secret.isprintable() \
                or not self.secret.isascii() or " " in self.secret:
            raise CredentialsError(f"the cluster secret must be printable ASCII without spaces, at least "
                                   f"{MIN_SECRET_CHARS} characters (leave it unset and one is generated)")
        if isinstance(self.tls, dict):
            object.__setattr__(self, "tls", ExpertTLS.from_dict(self.tls))
        if self.tls is not None and not isinstance(self.tls, ExpertTLS):
            raise CredentialsError(f"tls must be None or expert TLS settings, got {type(self.tls).__name__}")

    @classmethod
    def generate(cls, tls: ExpertTLS | dict | None = None) -> "ExpertCredentials":
        return cls(secrets.token_urlsafe(32), tls)

    def __repr__(self) -> str:
        return f"ExpertCredentials(secret=<hidden>, tls={'on' if self.tls else 'off'})"


# ---- the two sides of a connection; credentials None = plaintext, no secret (tests, one machine) ----

def add_port(server: grpc.aio.Server, address: str, credentials: ExpertCredentials | None) -> int:
    if credentials is None or credentials.tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials.tls.server_credentials())


def channel(address: str, credentials: ExpertCredentials | None, options: list | None = None) -> grpc.aio.Channel:
    """A channel to a group."""
    options = list(options or [])
    if credentials is None or credentials.tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    # Groups are dialled by IP: check their certificate against the cluster's name instead.
    options.append(("grpc.ssl_target_name_override", credentials.tls.server_name))
    return grpc.aio.secure_channel(address, credentials.tls.channel_credentials(), options=options)


def call_metadata(credentials: ExpertCredentials | None) -> tuple[tuple[str, str], ...] | None:
    """What every call to a group carries."""
    return None if credentials is None else ((SECRET_METADATA, credentials.secret),)


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks the cluster secret, before its handler runs, and
    without reading its request: the refusal is a client-streaming handler that never asks for a
    message, so a caller without the secret cannot make the group buffer a large one. Counts
    refusals (`refused`) and logs the first from each host (a misconfigured router shows up once in
    the log, not once a call), then one line per 1000 refusals."""

    def __init__(self, secret: str):
        self._digest = hashlib.sha256(secret.encode()).digest()
        self.refused = 0
        self._logged_peers: set[str] = set()

    def check(self, metadata) -> str | None:
        """None when the metadata carries the secret; else the reason (never what was sent)."""
        values = [v for k, v in (metadata or ()) if k == SECRET_METADATA]
        if not values:
            return MISSING
        value = values[0] if isinstance(values[0], bytes) else str(values[0]).encode()
        ok = hmac.compare_digest(hashlib.sha256(value).digest(), self._digest)
        return None if ok and len(values) == 1 else WRONG

    async def intercept_service(self, continuation, handler_call_details):
        problem = self.check(handler_call_details.invocation_metadata)
        if problem is None:
            return await continuation(handler_call_details)
        self.refused += 1
        return grpc.stream_unary_rpc_method_handler(self._refuse(problem, handler_call_details.method))

    def _refuse(self, problem: str, method: str):
        async def refuse(request_iterator, context):  # the iterator is never read
            host = context.peer().rsplit(":", 1)[0]  # "ipv4:10.0.0.5:43210" -> without the port
            if (host not in self._logged_peers and len(self._logged_peers) < 1000) or self.refused % 1000 == 0:
                self._logged_peers.add(host)
                log.warning("expert API: refused %s from %s: %s (%d refused so far)", method, host, problem,
                            self.refused)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        return refuse
