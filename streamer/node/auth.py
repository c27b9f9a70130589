"""Authentication of gateways and TLS credentials.

Shared token (``--auth-token-file``): gateways send ``authorization: Bearer
<token>`` metadata; any other call to the Streamer service is refused with
``UNAUTHENTICATED``. The comparison is constant-time. The health service
stays open, as load balancers probe it without credentials.

TLS (``--tls-cert``/``--tls-key``, ``--tls-client-ca`` for mutual TLS,
``--puller-tls-ca``): PEM files are read and checked here, with the stdlib
``ssl`` module, before gRPC sees them, so that a bad file is a
:class:`CredentialsError` naming it rather than a failed handshake later.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from streamer.errors import StreamerError

_OPEN_PREFIX = "/grpc.health.v1.Health/"


class TokenFileError(StreamerError, ValueError):
    """The token file is missing or empty."""


def read_token(path: Path) -> bytes:
    try:
        token = path.read_bytes().strip()
    except OSError as exc:
        raise TokenFileError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise TokenFileError(f"token file {path} is empty")
    return token


class CredentialsError(StreamerError, ValueError):
    """A TLS certificate, key or CA file is unreadable or not usable PEM."""


def _read_pem(path: Path, what: str, label: bytes) -> bytes:
    """The file's bytes, if it has a PEM block whose label ends with ``label``."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} file {path}: {exc.strerror}") from None
    if label + b"-----" not in data:
        raise CredentialsError(f"{what} file {path} is not PEM (no {label.decode()} block)")
    return data


def _read_certificates(path: Path, what: str) -> bytes:
    data = _read_pem(path, what, b"BEGIN CERTIFICATE")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode())
    except (ssl.SSLError, ValueError) as exc:
        raise CredentialsError(f"{what} file {path} holds no valid certificate: {exc}") from None
    return data


def _no_password() -> bytes:
    # Never let OpenSSL prompt on the terminal; gRPC cannot use encrypted keys.
    return b""


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """Server TLS from a certificate chain and its key; with ``client_ca``,
    mutual TLS: clients must present a certificate signed by that CA."""
    chain = _read_certificates(cert, "TLS certificate")
    private_key = _read_pem(key, "TLS key", b"PRIVATE KEY")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise CredentialsError(
                f"TLS key file {key} does not match certificate file {cert}"
            ) from None
        raise CredentialsError(
            f"TLS key file {key} is not a valid unencrypted private key: {exc}"
        ) from None
    if client_ca is None:
        return grpc.ssl_server_credentials([(private_key, chain)])
    return grpc.ssl_server_credentials(
        [(private_key, chain)],
        root_certificates=_read_certificates(client_ca, "TLS client CA"),
        require_client_auth=True,
    )


def channel_credentials(ca: Path) -> grpc.ChannelCredentials:
    """Client TLS trusting the CA certificates in ``ca`` (PEM)."""
    return grpc.ssl_channel_credentials(root_certificates=_read_certificates(ca, "TLS CA"))


async def _refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")


class TokenAuth(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, token: bytes) -> None:
        self._expected = b"Bearer " + token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if details.method.startswith(_OPEN_PREFIX):
            return await continuation(details)
        presented = b""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                presented = value.encode() if isinstance(value, str) else value
        if hmac.compare_digest(presented, self._expected):
            return await continuation(details)
        handler = await continuation(details)
        if handler is None:
            return None
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(_refuse)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(_refuse)
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(_refuse)
        return grpc.unary_unary_rpc_method_handler(_refuse)
