"""TLS and mTLS end to end, with certificates made here."""

import datetime
import ipaddress
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from client import ImageSimilarityClient, UnavailableError
from tests import helpers

pytestmark = pytest.mark.e2e


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _issue(subject: str, issuer_key, issuer_name, is_ca: bool, server: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(directory, name, key, cert):
    (directory / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                              serialization.PrivateFormat.PKCS8,
                                                              serialization.NoEncryption()))
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return directory / f"{name}.pem", directory / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _issue("lookalike test CA", None, None, is_ca=True)
    ca_pem, _ = _write(directory, "ca", ca_key, ca_cert)
    server = _write(directory, "server", *_issue("127.0.0.1", ca_key, ca_cert.subject, False, server=True))
    client = _write(directory, "client", *_issue("a-microservice", ca_key, ca_cert.subject, False))
    other_ca_key, other_ca = _issue("another CA", None, None, is_ca=True)
    stranger = _write(directory, "stranger", *_issue("stranger", other_ca_key, other_ca.subject, False))
    return {"ca": ca_pem, "server": server, "client": client, "stranger": stranger}


def _https_info(port: int, ca: Path, client: tuple[Path, Path] | None = None) -> dict:
    context = ssl.create_default_context(cafile=ca)
    if client:
        context.load_cert_chain(*client)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/v1/info", timeout=10, context=context) as response:
        return json.loads(response.read())


def test_tls_and_mtls(built, pki):
    cert, key = pki["server"]
    http_port = helpers.free_port()
    with helpers.serving(built, "--tls-cert", cert, "--tls-key", key, "--http-port", str(http_port),
                         tls_ca=pki["ca"]) as (_, address, _m):
        with ImageSimilarityClient(address, root_ca=pki["ca"]) as client:
            assert client.health() == "SERVING" and client.info()["dimension"] == 128
        with ImageSimilarityClient(address, timeout_s=3) as plaintext, pytest.raises(UnavailableError):
            plaintext.info()
        # HTTP is HTTPS with the same certificate; plain HTTP gets no answer.
        assert _https_info(http_port, pki["ca"])["dimension"] == 128
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v1/info", timeout=5)
    http_port = helpers.free_port()
    with helpers.serving(built, "--tls-cert", cert, "--tls-key", key, "--tls-client-ca", pki["ca"],
                         "--http-port", str(http_port), tls_ca=pki["ca"], tls_client=pki["client"]) as (_, address,
                                                                                                       _m):
        # mTLS over HTTPS too: a client certificate the CA signed, or no answer.
        assert _https_info(http_port, pki["ca"], pki["client"])["dimension"] == 128
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _https_info(http_port, pki["ca"])
        with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
            _https_info(http_port, pki["ca"], pki["stranger"])
        client_cert, client_key = pki["client"]
        with ImageSimilarityClient(address, root_ca=pki["ca"], client_cert=client_cert,
                                   client_key=client_key) as client:
            assert client.info()["dimension"] == 128
        with ImageSimilarityClient(address, root_ca=pki["ca"], timeout_s=3) as anonymous:
            with pytest.raises(UnavailableError):
                anonymous.info()
        stranger_cert, stranger_key = pki["stranger"]
        with ImageSimilarityClient(address, root_ca=pki["ca"], client_cert=stranger_cert, client_key=stranger_key,
                                   timeout_s=3) as stranger, pytest.raises(UnavailableError):
            stranger.info()
