"""TLS certificates and SuperNode authentication keys for a Flower deployment.

Both are made with the ``cryptography`` package (a dependency of flwr), no openssl needed.

* TLS (``make_certs``): a self-signed CA and a server certificate signed by it, for the
  SuperLink's one HTTPS port (Fleet, Control and Runtime APIs in Flower 1.42). The SuperNodes
  and the ``flwr`` CLI trust the CA (``--root-certificates``). For tests and trials; a
  consortium brings certificates from its own CA.
* SuperNode authentication (``make_node_key``): Flower 1.42's ``--enable-supernode-auth``
  accepts only SuperNodes whose public key was registered with ``flwr supernode register``
  (Control API). Each SuperNode signs its requests with its private key
  (``flower-supernode --auth-supernode-private-key``). Flower reads the private key as an
  OpenSSH EC key and the public key as an OpenSSH line on a NIST curve (P-384, as Flower's
  docs make with ``ssh-keygen -t ecdsa -b 384``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if private:  # owner-only from the first byte
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str] | tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certs(out: Path, hosts: list[str] | tuple[str, ...] = DEFAULT_HOSTS, *,
               days: int = 365, overwrite: bool = False) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (ECDSA P-384) to ``out``.

    Args:
        out: folder for the four files (created).
        hosts: names and IP addresses the SuperNodes and ``flwr`` use to reach the
            SuperLink; they go into the server certificate's subjectAltName, and TLS fails
            for any other.
        days: validity.
        overwrite: replace existing files (default: refuse, so a running deployment's CA is
            not replaced by accident).

    Returns:
        {"ca": ca.crt, "ca_key": ca.key, "cert": server.pem, "key": server.key}

    Raises:
        FileExistsError: a file exists and ``overwrite`` is False.
        ValueError: no hosts.
    """
    if not hosts:
        raise ValueError("give at least one host name or IP address for the certificate")
    out = Path(out)
    paths = {"ca": out / CA_CERT, "ca_key": out / "ca.key", "cert": out / SERVER_CERT,
             "key": out / SERVER_KEY}
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; use another folder or "
                              "--overwrite (every SuperNode must then get the new ca.crt)")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "histofed deployment CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(paths["ca"], ca.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    _write(paths["cert"], cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(paths["key"], _pem_key(key), private=True)
    return paths


def make_node_key(out: Path, site: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<site>.key`` (OpenSSH EC P-384 private key, mode 600) and ``<site>.pub``.

    The private key stays on the site's machine (``--auth-supernode-private-key``); the
    ``.pub`` line is what the SuperLink's operator registers (``flwr supernode register``).

    Raises:
        FileExistsError: the key exists and ``overwrite`` is False.
    """
    out = Path(out)
    priv, pub = out / f"{site}.key", out / f"{site}.pub"
    if (priv.exists() or pub.exists()) and not overwrite:
        raise FileExistsError(f"{priv} already exists; a SuperNode keeps its key (its "
                              "registration is bound to it). Use --overwrite to replace it")
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv, key.private_bytes(serialization.Encoding.PEM,
                                   serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH)
           + f" histofed-{site}\n".encode(), private=False)
    return priv, pub
