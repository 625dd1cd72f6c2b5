"""The client's channel: `tls=` and `tls_server_name=` as grpc channel credentials and options
(plaintext, TLS against the system roots or a CA bundle, mutual TLS), PEM files read with an
error that names the file."""
from __future__ import annotations

import os
from pathlib import Path

import grpc


def _read(path: str | os.PathLike, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"tls: cannot read the {what} {str(path)!r}: {err.strerror or err}") from None


def _credentials(tls) -> grpc.ChannelCredentials | None:
    """`tls=` as channel credentials; None means plaintext.

    False / None: plaintext.  True: TLS, server verified against the system's roots.
    a path: TLS, server verified against this CA bundle (PEM; e.g. a private CA's).
    (ca, cert, key): mutual TLS: ca as above (None: system roots), plus this client's
    certificate chain and private key (PEM paths).  grpc.ChannelCredentials: used as given.
    """
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, (str, os.PathLike)):
        return grpc.ssl_channel_credentials(root_certificates=_read(tls, "CA bundle"))
    if isinstance(tls, tuple) and len(tls) == 3 and tls[1] and tls[2]:
        ca, cert, key = tls
        return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA bundle") if ca else None,
                                            private_key=_read(key, "client key"),
                                            certificate_chain=_read(cert, "client certificate"))
    raise ValueError(f"tls must be True, False, a CA bundle path, a (ca, cert, key) tuple of paths "
                     f"or grpc.ChannelCredentials, got {type(tls).__name__}")


def _channel_args(tls, tls_server_name: str | None) -> tuple[grpc.ChannelCredentials | None, list]:
    credentials = _credentials(tls)
    if tls_server_name is None:
        return credentials, []
    if credentials is None:
        raise ValueError("tls_server_name needs tls: it names the host the server's certificate is checked for")
    # The name checked against the certificate, when it differs from the dialled address
    # (an IP, a port-forward, an ingress reached by another name).
    return credentials, [("grpc.ssl_target_name_override", tls_server_name)]
