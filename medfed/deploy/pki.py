"""Keys and certificates of a deployment, made with the ``cryptography`` package (no openssl subprocess).

* The coordinator's **certificate authority** (ECDSA P-384) signs the SuperLink's **server certificate**, whose
  subject alternative names must cover every name or IP address sites use to reach the SuperLink. Sites trust
  the CA certificate only, so a server certificate can be renewed without touching the sites.
* Each site's **authentication key** is an ECDSA P-384 key pair in OpenSSH format, the format Flower's SuperNode
  (``--auth-supernode-private-key``) and ``flwr supernode register`` read. Only the public key leaves the site.

Private keys are written with mode 0600 and never overwritten by accident.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from medfed.errors import ConfigError, MedfedError

CURVE = ec.SECP384R1()
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
DEFAULT_SANS = ("localhost", "127.0.0.1")


class KeyFileError(MedfedError):
    """A key or certificate file is missing, unreadable or of the wrong kind."""


@dataclass(frozen=True)
class CertificateAuthority:
    """The coordinator's CA: ``cert`` is sent to every site; ``key`` stays with the coordinator (0600)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class SiteKeyPair:
    """A site's authentication key pair (OpenSSH format); ``public`` is what the coordinator registers."""

    private: Path
    public: Path


def write_private(path: Path, data: bytes, *, overwrite: bool = False) -> Path:
    """Write ``data`` to ``path`` readable by its owner only (0600), creating parent folders (0700)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: exists; refusing to overwrite a private key")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)
    return path


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVE)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def create_ca(folder: Path, common_name: str = "medfed coordinator CA", days: int = 3650) -> CertificateAuthority:
    """A self-signed CA certificate (``ca.crt``) and its key (``ca.key``, 0600) in ``folder``."""
    key = new_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "medfed")])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA384()))
    ca = CertificateAuthority(cert=folder / "ca.crt", key=folder / "ca.key")
    write_private(ca.key, _pem_key(key))
    write_public(ca.cert, cert.public_bytes(serialization.Encoding.PEM))
    return ca


def subject_alt_names(names: Sequence[str]) -> list[x509.GeneralName]:
    """DNS names and IP addresses (v4 or v6) as SAN entries; duplicates dropped, order kept."""
    out: list[x509.GeneralName] = []
    for raw in dict.fromkeys(n.strip() for n in names if n.strip()):
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(raw)))
        except ValueError:
            if any(c in raw for c in "/: ") or raw.startswith("."):
                raise ConfigError(f"server name '{raw}' is neither a host name nor an IP address") from None
            out.append(x509.DNSName(raw))
    return out


def issue_server_cert(ca: CertificateAuthority, cert_path: Path, key_path: Path, names: Sequence[str], *,
                      days: int = 825, overwrite: bool = False) -> Path:
    """Sign a TLS server certificate for the SuperLink valid for ``names`` (host names / IPs) and
    ``localhost``/``127.0.0.1``; writes ``cert_path`` and ``key_path`` (0600)."""
    ca_key = load_private_key(ca.key)
    ca_cert = load_certificate(ca.cert)
    sans = subject_alt_names([*names, *DEFAULT_SANS])
    key = new_private_key()
    first = next((n for n in names if n.strip()), "localhost").strip()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - dt.timedelta(minutes=5)).not_valid_after(_now() + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    write_private(key_path, _pem_key(key), overwrite=overwrite)
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: certificate not found") from None
    except ValueError as err:
        raise KeyFileError(f"{path}: not a PEM certificate ({err})") from None


def load_private_key(path: Path, openssh: bool = False) -> ec.EllipticCurvePrivateKey:
    """An unencrypted EC private key: PEM (the CA's and the SuperLink's), or with ``openssh`` the OpenSSH format
    of a site's key (``site-key``, a ledger's signing key)."""
    fmt = "OpenSSH" if openssh else "PEM"
    loader = serialization.load_ssh_private_key if openssh else serialization.load_pem_private_key
    try:
        key = loader(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key not found") from None
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path}: not an unencrypted {fmt} private key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: not an EC private key")
    return key


def certificate_fingerprint(path: Path) -> str:
    """SHA-256 of the certificate (DER), as colon-separated hex: what people compare out of band."""
    digest = load_certificate(path).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def certificate_names(path: Path) -> list[str]:
    """The DNS names and IP addresses a certificate is valid for."""
    try:
        san = load_certificate(path).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))]


def certificate_expiry(path: Path) -> dt.datetime:
    return load_certificate(path).not_valid_after_utc


def create_site_key(private_path: Path, comment: str, *, overwrite: bool = False) -> SiteKeyPair:
    """A new ECDSA P-384 key pair in OpenSSH format: ``private_path`` (0600) and ``private_path.pub``."""
    key = new_private_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pair = SiteKeyPair(private=private_path, public=private_path.with_name(private_path.name + ".pub"))
    write_private(pair.private, private, overwrite=overwrite)
    write_public(pair.public, public + f" {comment}\n".encode())
    return pair


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Read an OpenSSH public key and check it is EC on a NIST curve (what Flower accepts)."""
    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes().strip())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: public key not found") from None
    except (ValueError, UnsupportedAlgorithm) as err:
        raise KeyFileError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name not in NIST_CURVES:
        raise KeyFileError(f"{path}: Flower needs an ECDSA key on a NIST curve (P-256/384/521); make one with "
                           "`medfed site init`")
    return key


def public_key_fingerprint(path: Path) -> str:
    """OpenSSH-style ``SHA256:<base64>`` fingerprint, the same as ``ssh-keygen -lf``, to read out by phone."""
    return key_fingerprint(openssh_public(load_site_public_key(path)))


def openssh_public(key: ec.EllipticCurvePublicKey) -> str:
    """``ecdsa-sha2-nistp384 AAAA...``: a public key as one OpenSSH line without comment."""
    return key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def key_fingerprint(openssh_line: str) -> str:
    """The ``SHA256:<base64>`` fingerprint of an OpenSSH public key line (see :func:`public_key_fingerprint`)."""
    digest = hashlib.sha256(base64.b64decode(openssh_line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def load_site_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read a site's OpenSSH-format ECDSA private key (``site-key``, or a ledger's signing key)."""
    return load_private_key(path, openssh=True)


@contextmanager
def private_umask() -> Iterator[None]:
    """Files and folders created inside (by this process and processes it starts) are 0600 / 0700.

    Used around everything that writes a site's or the coordinator's folder, so that files written by Flower's
    own processes (``superlink.db``, logs, ``runs/``, ClientApp outputs) are private too.
    """
    previous = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(previous)


P = ParamSpec("P")
R = TypeVar("R")


def private_files(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` under :func:`private_umask`."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with private_umask():
            return fn(*args, **kwargs)

    return wrapper


def make_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) and make it 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.chmod(0o700)
    return path


def check_private_mode(path: Path) -> None:
    """Refuse a private key that others can read (the same rule as ssh)."""
    if not path.exists():
        raise KeyFileError(f"{path}: key not found")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{path}: permissions {mode:o} let others read this private key; run chmod 600 {path}")
