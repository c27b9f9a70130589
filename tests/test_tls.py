"""TLS and mutual TLS of `streamer serve` (gateway side) and of its Puller
connection, with a throwaway PKI, against the real process."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_helpers import serve_command, serving

from streamer.node.auth import CredentialsError, channel_credentials, server_credentials
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    SubscribeRequest,
    Value,
)


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path  # SAN IP:127.0.0.1, DNS:localhost
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path  # signed by other_ca
    other_client_key: Path


Issued = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _issue(
    name: str,
    issuer: Issued | None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    san: list[x509.GeneralName] | None = None,
) -> Issued:
    """A certificate for ``name`` signed by ``issuer`` (None: a self-signed CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer[0].subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    cert = builder.sign(key if issuer is None else issuer[1], hashes.SHA256())
    return cert, key


def _write(directory: Path, stem: str, issued: Issued) -> tuple[Path, Path]:
    """``stem.pem`` (certificate) and ``stem.key`` (unencrypted PKCS#8 key)."""
    cert, key = issued
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue("streamer test CA", None)
    other_ca = _issue("some other CA", None)
    server = _issue("localhost", ca, usage=ExtendedKeyUsageOID.SERVER_AUTH, san=[
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    client = _issue("gateway-1", ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    stranger = _issue("gateway-1", other_ca, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    ca_path, _ = _write(directory, "ca", ca)
    other_ca_path, _ = _write(directory, "other-ca", other_ca)
    return Pki(
        ca_path, *_write(directory, "server", server), *_write(directory, "client", client),
        other_ca_path, *_write(directory, "stranger", stranger),
    )


def _client(
    root: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes() if root else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


SUBSCRIBE = GatewayMessage(subscribe=SubscribeRequest(
    subscription_id="s", database="app", collection="messages",
    filters=[Filter(field="chat", op="==", value=Value(string_value="c"))]))


async def _check_and_subscribe(channel: grpc.aio.Channel) -> None:
    """Health SERVING, and a subscribe on StreamerService.Stream succeeds."""
    await asyncio.wait_for(channel.channel_ready(), 30)
    status = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="syntrix.streamer.v1.StreamerService"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    call = sgrpc.StreamerServiceStub(channel).Stream(timeout=10)
    await call.write(SUBSCRIBE)
    assert (await call.read()).subscribe_response.success
    call.cancel()


async def _refused(channel: grpc.aio.Channel) -> None:
    """A health check and a subscribe over ``channel`` both fail to connect."""
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as check:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10)
        call = sgrpc.StreamerServiceStub(channel).Stream(timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            await call.write(SUBSCRIBE)
            await call.read()
    # The handshake fails (the server closes the connection): not a timeout.
    assert check.value.code() == stream.value.code() == grpc.StatusCode.UNAVAILABLE


def test_help_documents_the_tls_options() -> None:
    out = subprocess.run(serve_command("--help"), capture_output=True, text=True, check=True,
                         timeout=60).stdout
    for option in ("--tls-cert", "--tls-key", "--tls-client-ca", "--puller-tls-ca"):
        assert option in out


def test_tls_admits_clients_that_trust_the_ca_only(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--tls-cert", str(pki.server_cert),
                           "--tls-key", str(pki.server_key)) as served:
            async with grpc.aio.secure_channel(served.address, _client(pki.ca)) as channel:
                await _check_and_subscribe(channel)
            # The name in the certificate, too (DNS:localhost).
            async with grpc.aio.secure_channel(
                served.address, _client(pki.ca),
                options=[("grpc.ssl_target_name_override", "localhost")],
            ) as channel:
                await _check_and_subscribe(channel)
            await _refused(grpc.aio.insecure_channel(served.address))
            await _refused(grpc.aio.secure_channel(served.address, _client(pki.other_ca)))
            assert "gateways connect with TLS" in served.log()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_mutual_tls_admits_clients_with_a_certificate_of_the_ca_only(
    tmp_path: Path, pki: Pki
) -> None:
    async def main() -> None:
        async with serving(tmp_path, "--tls-cert", str(pki.server_cert),
                           "--tls-key", str(pki.server_key),
                           "--tls-client-ca", str(pki.ca)) as served:
            credentials = _client(pki.ca, pki.client_cert, pki.client_key)
            async with grpc.aio.secure_channel(served.address, credentials) as channel:
                await _check_and_subscribe(channel)
            # No client certificate, or one from another CA: refused, health included.
            await _refused(grpc.aio.secure_channel(served.address, _client(pki.ca)))
            await _refused(grpc.aio.secure_channel(
                served.address, _client(pki.ca, pki.other_client_cert, pki.other_client_key)))
            await _refused(grpc.aio.insecure_channel(served.address))
            assert "gateways connect with mutual TLS" in served.log()

    asyncio.run(asyncio.wait_for(main(), 120))


def test_puller_reached_with_tls(tmp_path: Path, pki: Pki) -> None:
    async def main() -> None:
        puller_tls = server_credentials(pki.server_cert, pki.server_key)
        async with serving(tmp_path, "--puller-tls-ca", str(pki.ca),
                           puller_credentials=puller_tls) as served:
            async with grpc.aio.insecure_channel(served.address) as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(SUBSCRIBE)
                assert (await call.read()).subscribe_response.success
                for _ in range(3000):
                    if served.puller.subscriptions:
                        break
                    await asyncio.sleep(0.01)
                await served.puller.append(pb.ChangeEvent(
                    event_id="e0", database="app", mgo_coll="messages", mgo_doc_id="m0",
                    op_type="insert", full_doc=orjson.dumps({"chat": "c"})))
                delivery = (await asyncio.wait_for(call.read(), 30)).delivery
                assert list(delivery.subscription_ids) == ["s"]
                call.cancel()
            assert "the Puller is reached with TLS" in served.log()

    asyncio.run(asyncio.wait_for(main(), 120))


GARBAGE = b"-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--tls-cert", "{server_cert}"], {}, "--tls-cert needs --tls-key"),
        (["--tls-key", "{server_key}"], {}, "--tls-key needs --tls-cert"),
        ([], {"STREAMER_TLS_CERT": "{server_cert}"}, "--tls-cert needs --tls-key"),
        (["--tls-client-ca", "{ca}"], {}, "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "{garbage}", "--tls-key", "{server_key}"], {},
         "TLS certificate file {garbage} holds no valid certificate"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{missing}"], {},
         "argument --tls-key: {missing}: no such file"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{client_key}"], {},
         "TLS key file {client_key} does not match certificate file {server_cert}"),
        (["--tls-cert", "{server_cert}", "--tls-key", "{server_key}",
          "--tls-client-ca", "{garbage}"], {}, "TLS client CA file {garbage} holds no valid"),
        (["--puller-tls-ca", "{server_key}"], {},
         "TLS CA file {server_key} is not PEM (no BEGIN CERTIFICATE block)"),
    ],
)
def test_bad_tls_options_are_clear_errors(
    tmp_path: Path, pki: Pki, args: list[str], env: dict[str, str], message: str
) -> None:
    (tmp_path / "garbage.pem").write_bytes(GARBAGE)
    paths = {key: str(value) for key, value in vars(pki).items()} | {
        "garbage": str(tmp_path / "garbage.pem"), "missing": str(tmp_path / "missing.key")}
    result = subprocess.run(
        serve_command("--puller", "127.0.0.1:1", "--state-dir", str(tmp_path / "state"),
                      *(arg.format(**paths) for arg in args)),
        capture_output=True, text=True, timeout=60,
        env={**os.environ, **{key: value.format(**paths) for key, value in env.items()}},
    )
    assert result.returncode == 2, result.stderr
    assert message.format(**paths) in result.stderr
    assert "Traceback" not in result.stderr


def test_credential_errors_name_the_file(tmp_path: Path, pki: Pki) -> None:
    (tmp_path / "garbage.pem").write_bytes(GARBAGE)
    (tmp_path / "text").write_text("hello\n")
    (tmp_path / "encrypted.key").write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw")))
    missing, text, garbage = tmp_path / "missing", tmp_path / "text", tmp_path / "garbage.pem"
    encrypted = tmp_path / "encrypted.key"
    with pytest.raises(CredentialsError, match=re.escape(f"cannot read TLS CA file {missing}")):
        channel_credentials(missing)
    with pytest.raises(CredentialsError, match=re.escape(f"TLS CA file {text} is not PEM")):
        channel_credentials(text)
    with pytest.raises(
        CredentialsError, match=re.escape(f"TLS certificate file {garbage} holds no valid")
    ):
        server_credentials(garbage, pki.server_key)
    with pytest.raises(CredentialsError, match=re.escape(f"TLS key file {text} is not PEM")):
        server_credentials(pki.server_cert, text)
    with pytest.raises(
        CredentialsError, match=re.escape(f"TLS key file {encrypted} is not a valid unencrypted")
    ):
        server_credentials(pki.server_cert, encrypted)
    with pytest.raises(CredentialsError, match=re.escape(
        f"TLS key file {pki.client_key} does not match certificate file {pki.server_cert}"
    )):
        server_credentials(pki.server_cert, pki.client_key)
    assert isinstance(CredentialsError("x"), ValueError)
    server_credentials(pki.server_cert, pki.server_key, client_ca=pki.ca)
    channel_credentials(pki.ca)
