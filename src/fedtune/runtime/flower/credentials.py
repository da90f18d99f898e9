"""Credentials for a Flower federation: a TLS certificate authority with a server certificate, and SuperNode keys.

Command line (``python -m fedtune.runtime.flower.credentials --help``)::

    # CA + server certificate for the SuperLink (SANs: localhost, 127.0.0.1, ::1 and any --host)
    python -m fedtune.runtime.flower.credentials tls certs/ --host superlink.example.org
    # -> certs/ca.crt (give it to every SuperNode and to `fedtune run`), certs/ca.key (keep offline),
    #    certs/server.pem + certs/server.key (the SuperLink's --ssl-certfile / --ssl-keyfile)

    # one authentication key pair per SuperNode (Flower's format: EC P-384, OpenSSH encoding)
    python -m fedtune.runtime.flower.credentials node-keys keys/ hospital_a hospital_b
    # -> keys/hospital_a (the node's --auth-supernode-private-key), keys/hospital_a.pub
    #    (registered on the SuperLink with `flwr supernode register keys/hospital_a.pub <connection>`)

Everything is made with ``cryptography`` (no openssl binary needed). Private keys are written
with mode 0600; an existing file is never overwritten (:class:`CredentialsError`).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.errors import CredentialsError

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
"""Names every server certificate is valid for (a SuperLink reached on this machine)."""


@dataclass(frozen=True)
class TlsFiles:
    """The files of :func:`make_tls_certificates`."""

    ca_cert: Path
    """The CA certificate: SuperNodes' ``--root-certificates``, ``runtime.root_certificates``, ``--ssl-ca-certfile``."""
    ca_key: Path
    """The CA's private key (only needed to sign more certificates; keep it off the servers)."""
    server_cert: Path
    """The SuperLink's certificate (``--ssl-certfile``), signed by the CA."""
    server_key: Path
    """The SuperLink's private key (``--ssl-keyfile``)."""

    def superlink_flags(self) -> list[str]:
        """The ``flower-superlink`` TLS flags for these files."""
        return ["--ssl-ca-certfile", str(self.ca_cert), "--ssl-certfile", str(self.server_cert),
                "--ssl-keyfile", str(self.server_key)]

    def supernode_flags(self) -> list[str]:
        """The ``flower-supernode`` TLS flags for these files."""
        return ["--root-certificates", str(self.ca_cert)]


@dataclass(frozen=True)
class NodeKey:
    """One SuperNode's authentication key pair (:func:`make_node_keys`)."""

    private_key: Path
    """OpenSSH EC private key: ``flower-supernode --auth-supernode-private-key``."""
    public_key: Path
    """OpenSSH EC public key: ``flwr supernode register <this file> <connection>``."""


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise CredentialsError(f"{path} exists already; remove it or choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    with os.fdopen(os.open(path, flags, 0o600 if private else 0o644), "wb") as f:
        f.write(data)


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(c.isspace() for c in host) or ":" in host or "/" in host:
        raise CredentialsError(f"--host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_tls_certificates(directory: str | Path, hosts: Sequence[str] = (), days: int = 365) -> TlsFiles:
    """Write a fresh CA and a server certificate it signs, valid for ``hosts`` plus :data:`LOCAL_HOSTS`.

    Files: ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` in ``directory`` (EC P-384,
    SHA-384; the server certificate is valid ``days`` days and names every host as a SAN, which
    is what TLS clients check).
    """
    if days <= 0:
        raise CredentialsError(f"days must be > 0, got {days}")
    directory = Path(directory)
    names = list(dict.fromkeys([*LOCAL_HOSTS, *hosts]))
    sans = [_san(h) for h in names]
    files = TlsFiles(directory / "ca.crt", directory / "ca.key", directory / "server.pem", directory / "server.key")
    existing = [str(p) for p in (files.ca_cert, files.ca_key, files.server_cert, files.server_key) if p.exists()]
    if existing:
        raise CredentialsError(f"{', '.join(existing)} exist(s) already; remove or choose another folder")

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_name).public_key(server_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(files.ca_key, _pem_key(ca_key), private=True)
    _write(files.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(files.server_key, _pem_key(server_key), private=True)
    _write(files.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return files


def make_node_keys(directory: str | Path, names: Sequence[str]) -> dict[str, NodeKey]:
    """Write one EC P-384 key pair per SuperNode name (``<name>`` and ``<name>.pub``, OpenSSH format)."""
    if not names:
        raise CredentialsError("name at least one SuperNode")
    bad = [n for n in names if not n or "/" in n or n.startswith(".") or any(c.isspace() for c in n)]
    if bad:
        raise CredentialsError(f"SuperNode name(s) {bad} cannot be file names")
    if len(set(names)) != len(names):
        raise CredentialsError(f"SuperNode names repeat: {list(names)}")
    directory = Path(directory)
    keys = {}
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        pair = NodeKey(directory / name, directory / f"{name}.pub")
        _write(pair.private_key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                                   serialization.NoEncryption()), private=True)
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(pair.public_key, public + f" {name}\n".encode(), private=False)
        keys[name] = pair
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedtune.runtime.flower.credentials {tls,node-keys} ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(prog="python -m fedtune.runtime.flower.credentials",
                                     description="Make TLS certificates and SuperNode keys for a Flower federation.")
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a CA and a SuperLink server certificate")
    tls.add_argument("directory")
    tls.add_argument("--host", action="append", default=[],
                     help="another DNS name or IP the SuperLink is reached at (repeatable)")
    tls.add_argument("--days", type=int, default=365)
    nodes = sub.add_parser("node-keys", help="SuperNode authentication key pairs")
    nodes.add_argument("directory")
    nodes.add_argument("names", nargs="+", help="one name per SuperNode (file names of its keys)")
    args = parser.parse_args(argv)
    try:
        if args.command == "tls":
            files = make_tls_certificates(args.directory, args.host, args.days)
            print(f"CA certificate  {files.ca_cert}\nCA key          {files.ca_key} (keep private)\n"
                  f"server cert     {files.server_cert}\nserver key      {files.server_key}\n"
                  f"flower-superlink {' '.join(files.superlink_flags())}\n"
                  f"flower-supernode {' '.join(files.supernode_flags())}")
        else:
            for name, pair in make_node_keys(args.directory, args.names).items():
                print(f"{name}: --auth-supernode-private-key {pair.private_key}; "
                      f"register with: flwr supernode register {pair.public_key} <connection>")
    except CredentialsError as exc:
        parser.exit(2, f"error: {exc}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
