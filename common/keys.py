"""Keys and certificates for a consortium, made with `cryptography`.

- a consortium CA and a TLS server certificate for the SuperLink (SAN for the given hosts);
- EC P-384 SuperNode authentication keys in OpenSSH format (what Flower expects);
- Ed25519 signing keys for the coordinator (plans, releases) and each site (summaries, receipts).

Private keys are written with mode 0600 in 0700 directories (never over an existing file or
through a symlink) and never logged or printed; a signing key that other users can read is
refused when loaded. `ppsehr keys` is the command line over this module.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import PpsehrError


class KeyFileError(PpsehrError):
    """A key file is missing, unreadable or of the wrong kind."""


def _write_private(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path.parent, 0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; refusing to overwrite a private key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(path, 0o600)
    return path


def _check_private_mode(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"{path}: private key is accessible by other users (mode {mode:04o}); run: chmod 600 {path}")


def _write_public(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, 0o644)
    return path


# ---------------------------------------------------------------- Ed25519 signing keys
def fingerprint(public_key: ed25519.Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:32]


def new_signing_key(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key (PKCS8 PEM, 0600) and NAME.pub (PEM) into directory."""
    key = ed25519.Ed25519PrivateKey.generate()
    priv = _write_private(directory / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub = _write_public(directory / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    try:
        _check_private_mode(Path(path))
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise KeyFileError(f"{path}: signing key not found") from None
    except (ValueError, TypeError):  # TypeError: an encrypted key (ppsehr keys are unencrypted, mode 0600)
        raise KeyFileError(f"{path}: not an unencrypted PEM private key") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: str | Path) -> ed25519.Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except FileNotFoundError:
        raise KeyFileError(f"{path}: public key not found") from None
    except ValueError:
        raise KeyFileError(f"{path}: not a PEM public key") from None
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError(f"{path}: not an Ed25519 public key")
    return key


def public_pem(key: ed25519.Ed25519PublicKey) -> str:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def public_from_pem(text: str) -> ed25519.Ed25519PublicKey:
    key = serialization.load_pem_public_key(text.encode())
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise KeyFileError("not an Ed25519 public key")
    return key


def verify(public_key: ed25519.Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    try:
        public_key.verify(signature, data)
        return True
    except InvalidSignature:
        return False


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


# ---------------------------------------------------------------- TLS and SuperNode auth
@dataclass(frozen=True)
class TLSFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path


def new_tls(directory: Path, hosts: list[str], days: int = 825) -> TLSFiles:
    """A consortium CA and a server certificate for the SuperLink with SANs for `hosts`."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ppsehr consortium CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    _write_private(directory / "ca.key", ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    files = TLSFiles(_write_public(directory / "ca.crt", ca.public_bytes(pem)),
                     _write_public(directory / "server.pem", cert.public_bytes(pem)),
                     _write_private(directory / "server.key", key.private_bytes(
                         pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())))
    return files


def new_supernode_key(directory: Path, name: str) -> tuple[Path, Path]:
    """EC P-384 key pair in OpenSSH format for Flower SuperNode authentication."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = _write_private(directory / f"{name}.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    pub = _write_public(directory / f"{name}.pub", key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n")
    return priv, pub


@dataclass(frozen=True)
class ConsortiumKeys:
    root: Path
    tls: TLSFiles
    coordinator_key: Path
    coordinator_pub: Path
    site_keys: dict[str, tuple[Path, Path]]
    supernode_keys: dict[str, tuple[Path, Path]]


def init_consortium(root: Path, sites: list[str], hosts: list[str]) -> ConsortiumKeys:
    """All key material of a consortium under root/ (what `ppsehr keys init` writes)."""
    root = Path(root)
    if (root / "coordinator" / "signing.key").exists():
        raise KeyFileError(f"{root} already holds consortium keys; refusing to overwrite them")
    tls = new_tls(root / "tls", hosts)
    ck, cp = new_signing_key(root / "coordinator", "signing")
    return ConsortiumKeys(root, tls, ck, cp,
                          {s: new_signing_key(root / "sites" / s, "signing") for s in sites},
                          {s: new_supernode_key(root / "supernodes", s) for s in sites})


def load_consortium(root: Path, sites: list[str] | tuple[str, ...]) -> ConsortiumKeys:
    """The paths `init_consortium` wrote under root (checked to exist)."""
    root = Path(root)
    k = ConsortiumKeys(root, TLSFiles(root / "tls" / "ca.crt", root / "tls" / "server.pem", root / "tls" / "server.key"),
                       root / "coordinator" / "signing.key", root / "coordinator" / "signing.pub",
                       {s: (root / "sites" / s / "signing.key", root / "sites" / s / "signing.pub") for s in sites},
                       {s: (root / "supernodes" / f"{s}.key", root / "supernodes" / f"{s}.pub") for s in sites})
    for p in [k.coordinator_key, k.coordinator_pub, *(x for pair in k.site_keys.values() for x in pair)]:
        if not p.exists():
            raise KeyFileError(f"{p}: missing from the consortium keys in {root}")
    return k


# ---------------------------------------------------------------- inspecting key files
def describe_key_file(path: str | Path) -> dict[str, str]:
    """Kind and public fingerprint of a key or certificate file. Never returns private material:
    for a private key, the fingerprint is that of its public half."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{path}: not found") from None
    except IsADirectoryError:
        raise KeyFileError(f"{path}: is a directory") from None
    if b"BEGIN CERTIFICATE" in data:
        cert = x509.load_pem_x509_certificate(data)
        try:
            sans = [str(n.value) for n in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]
        except x509.ExtensionNotFound:
            sans = []
        return {"file": str(path), "kind": "X.509 certificate", "fingerprint": "sha256:" + cert.fingerprint(hashes.SHA256()).hex(),
                "subject": cert.subject.rfc4514_string(), "issuer": cert.issuer.rfc4514_string(),
                "not_after": cert.not_valid_after_utc.isoformat(), "hosts": ",".join(sans)}
    public = None
    kind = ""
    try:
        if data.startswith(b"ecdsa-") or data.startswith(b"ssh-"):
            public, kind = serialization.load_ssh_public_key(data.strip()), "SSH public key"
        elif b"OPENSSH PRIVATE KEY" in data:
            public, kind = serialization.load_ssh_private_key(data, password=None).public_key(), "SSH private key"
        elif b"PRIVATE KEY" in data:
            public, kind = serialization.load_pem_private_key(data, password=None).public_key(), "PEM private key"
        elif b"PUBLIC KEY" in data:
            public, kind = serialization.load_pem_public_key(data), "PEM public key"
    except (ValueError, TypeError, UnsupportedAlgorithm):
        public = None
    if public is None:
        raise KeyFileError(f"{path}: not a key or certificate ppsehr knows (PEM, OpenSSH, X.509)")
    if isinstance(public, ed25519.Ed25519PublicKey):
        return {"file": str(path), "kind": f"Ed25519 signing key ({kind})", "fingerprint": fingerprint(public)}
    if isinstance(public, ec.EllipticCurvePublicKey):
        blob = base64.b64decode(public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1])
        fp = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")  # as ssh-keygen -l prints it
        return {"file": str(path), "kind": f"EC {public.curve.name} SuperNode/TLS key ({kind})", "fingerprint": fp}
    raise KeyFileError(f"{path}: a {type(public).__name__}, which ppsehr does not use")
