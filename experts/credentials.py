"""Credentials of the internal expert API: a secret on every call, optional mutual TLS, and the
key that signs the placement.

    controller: ExpertCredentials (the cluster secret; ExpertCredentials.generate() or its config)
        derives   data secret       Forward, Stats                    -> routers, the controller
                  control secret    LoadExperts, UnloadExperts        -> the controller only
                  placement key     HMAC of the table in Redis        -> routers verify, the controller signs
        hands out for_router() = RouterCredentials (data secret, placement key)        --Ray--> routers
                  for_group()  = GroupCredentials (SHA-256 of the data and control secrets) --Ray--> groups
    caller  --metadata `x-elasticmoe-cluster-secret: <data or control secret>`--> group's grpc.aio server
            SecretCheck (a server interceptor): no or wrong secret -> UNAUTHENTICATED, the data secret on a
            control method -> PERMISSION_DENIED; before any handler runs, so nothing is decoded or computed
    TLS (optional): one CA, and one certificate + key that every party presents (groups as
            servers, routers and the controller as clients); the servers require a client
            certificate signed by that CA (mutual TLS)

Why a shared secret and not only NetworkPolicies: an expert port answers anything that reaches
it, and Forward runs the model's weights on whatever it is sent. Why two: routers face the
internet, and a compromised router holding the control secret could empty or OOM every group with
LoadExperts/UnloadExperts. Each derived secret is HMAC-SHA256(cluster secret, purpose): knowing one
tells nothing of the cluster secret or of another. Groups keep only digests, so a compromised
group cannot call its peers. The cluster secret is made per cluster (32 random bytes) unless the
operator gives one, travels only inside Ray, and every check hashes both sides to 32 bytes and
compares with hmac.compare_digest, so neither the time nor an error tells how much of a guess was
right. `repr()` never shows a secret, a key or a digest (a digest of a weak, human-chosen secret
could be brute-forced from logs).

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
CONTROL_METHODS = frozenset({"LoadExperts", "UnloadExperts"})  # change what a group holds: the controller's only
MISSING = f"missing cluster secret: the expert API needs metadata '{SECRET_METADATA}'"
WRONG = "wrong cluster secret"
NOT_CONTROL = "this credential may call Forward and Stats only: LoadExperts/UnloadExperts need the controller's"


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


def _derive(secret: str, purpose: str) -> bytes:
    return hmac.new(secret.encode(), f"elasticmoe/{purpose}/v1".encode(), hashlib.sha256).digest()


def _tls(tls) -> "ExpertTLS | None":
    tls = ExpertTLS.from_dict(tls) if isinstance(tls, dict) else tls
    if tls is not None and not isinstance(tls, ExpertTLS):
        raise CredentialsError(f"tls must be None or expert TLS settings, got {type(tls).__name__}")
    return tls


class _HiddenRepr:
    def __repr__(self) -> str:  # never a secret, a key or a digest
        return f"{type(self).__name__}(secret=<hidden>, tls={'on' if self.tls else 'off'})"


@dataclass(frozen=True, repr=False)
class ExpertCredentials(_HiddenRepr):
    """The cluster's credentials, held by the controller: every secret below is derived from `secret`."""

    secret: str = field(repr=False)
    tls: ExpertTLS | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.secret, str) or len(self.secret) < MIN_SECRET_CHARS or not self.secret.isprintable() \
                or not self.secret.isascii() or " " in self.secret:
            raise CredentialsError(f"the cluster secret must be printable ASCII without spaces, at least "
                                   f"{MIN_SECRET_CHARS} characters (leave it unset and one is generated)")
        object.__setattr__(self, "tls", _tls(self.tls))

    @classmethod
    def generate(cls, tls: ExpertTLS | dict | None = None) -> "ExpertCredentials":
        return cls(secrets.token_urlsafe(32), tls)

    @property
    def data_secret(self) -> str:
        return _derive(self.secret, "data-plane").hex()

    @property
    def control_secret(self) -> str:
        return _derive(self.secret, "control-plane").hex()

    @property
    def placement_signing_key(self) -> bytes:
        return _derive(self.secret, "placement")

    def for_router(self) -> "RouterCredentials":
        return RouterCredentials(self.data_secret, self.placement_signing_key, self.tls)

    def for_group(self) -> "GroupCredentials":
        return GroupCredentials(_sha256(self.data_secret), _sha256(self.control_secret), self.tls)


@dataclass(frozen=True, repr=False)
class RouterCredentials(_HiddenRepr):
    """A router's share: it may call Forward and Stats and verify the placement, never load or unload."""

    data_secret: str = field(repr=False)
    placement_signing_key: bytes = field(repr=False)
    tls: ExpertTLS | None = None
    control_secret = None  # a router never holds it


@dataclass(frozen=True, repr=False)
class GroupCredentials(_HiddenRepr):
    """A group's share: what it checks callers against (digests only) and its TLS."""

    data_sha256: bytes = field(repr=False)
    control_sha256: bytes = field(repr=False)
    tls: ExpertTLS | None = None


def _sha256(value: str | bytes) -> bytes:
    return hashlib.sha256(value if isinstance(value, bytes) else value.encode()).digest()


# ---- the two sides of a connection; credentials None = plaintext, no secret (tests, one machine) ----

def add_port(server: grpc.aio.Server, address: str, credentials: GroupCredentials | None) -> int:
    if credentials is None or credentials.tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials.tls.server_credentials())


def channel(address: str, credentials: ExpertCredentials | RouterCredentials | None,
            options: list | None = None) -> grpc.aio.Channel:
    """A channel to a group."""
    options = list(options or [])
    if credentials is None or credentials.tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    # Groups are dialled by IP: check their certificate against the cluster's name instead.
    options.append(("grpc.ssl_target_name_override", credentials.tls.server_name))
    return grpc.aio.secure_channel(address, credentials.tls.channel_credentials(), options=options)


def call_metadata(credentials: ExpertCredentials | RouterCredentials | None,
                  method: str = "Forward") -> tuple[tuple[str, str], ...] | None:
    """What a call of `method` carries: the control secret for LoadExperts/UnloadExperts, else the data one."""
    if credentials is None:
        return None
    secret = credentials.control_secret if method in CONTROL_METHODS else credentials.data_secret
    if secret is None:
        raise CredentialsError(f"{method} needs the controller's control-plane credential; a router holds only "
                               f"the data-plane one")
    return ((SECRET_METADATA, secret),)


class SecretCheck(grpc.aio.ServerInterceptor):
    """Refuses every call whose metadata lacks the secret its method needs, before its handler runs, and
    without reading its request: the refusal is a client-streaming handler that never asks for a
    message, so a caller without the secret cannot make the group buffer a large one. Counts
    refusals (`refused`) and logs the first from each host (a misconfigured router shows up once in
    the log, not once a call), then one line per 1000 refusals."""

    def __init__(self, credentials: GroupCredentials):
        self._data, self._control = credentials.data_sha256, credentials.control_sha256
        self.refused = 0
        self._logged_peers: set[str] = set()

    def check(self, metadata, method: str = "Forward") -> tuple[grpc.StatusCode, str] | None:
        """None when the metadata carries the secret `method` needs; else (code, reason), never what was sent."""
        values = [v for k, v in (metadata or ()) if k == SECRET_METADATA]
        if not values:
            return grpc.StatusCode.UNAUTHENTICATED, MISSING
        presented = _sha256(values[0] if isinstance(values[0], bytes) else str(values[0]))
        is_data, is_control = hmac.compare_digest(presented, self._data), hmac.compare_digest(presented, self._control)
        if len(values) != 1 or not (is_data or is_control):
            return grpc.StatusCode.UNAUTHENTICATED, WRONG
        if is_control if method in CONTROL_METHODS else is_data:
            return None
        # The controller's secret on Forward is refused too: each credential opens only its own methods.
        return grpc.StatusCode.PERMISSION_DENIED, NOT_CONTROL if is_data else f"the control secret cannot call {method}"

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method.rsplit("/", 1)[-1]  # "/elasticmoe.v1.ExpertService/Forward"
        problem = self.check(handler_call_details.invocation_metadata, method)
        if problem is None:
            return await continuation(handler_call_details)
        self.refused += 1
        return grpc.stream_unary_rpc_method_handler(self._refuse(*problem, handler_call_details.method))

    def _refuse(self, code: grpc.StatusCode, problem: str, method: str):
        async def refuse(request_iterator, context):  # the iterator is never read
            host = context.peer().rsplit(":", 1)[0]  # "ipv4:10.0.0.5:43210" -> without the port
            if (host not in self._logged_peers and len(self._logged_peers) < 1000) or self.refused % 1000 == 0:
                self._logged_peers.add(host)
                log.warning("expert API: refused %s from %s: %s (%d refused so far)", method, host, problem,
                            self.refused)
            await context.abort(code, problem)

        return refuse
