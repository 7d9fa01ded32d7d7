"""A site CA and the certificates the DICOM TLS tests need, made with the openssl CLI (as README "DICOM TLS" does).

`make_pki(folder)`: a CA; a server certificate for localhost/127.0.0.1; a client certificate; an expired
client certificate of the same CA; a client certificate of another CA. Keys are RSA 2048 (every DICOM
TLS peer takes them) and chmod 600, as the node requires.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Pair:
    certificate: Path
    key: Path

    def dcmtk(self, ca: Path) -> list[str]:
        """storescu/storescp options presenting this certificate and trusting `ca`."""
        return ["+tls", str(self.key), str(self.certificate), "+cf", str(ca)]

    def client_context(self, ca: Path) -> ssl.SSLContext:
        """A Python TLS client presenting this certificate, trusting `ca`."""
        context = ssl.create_default_context(cafile=ca)
        context.load_cert_chain(self.certificate, self.key)
        return context


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Pair
    client: Pair
    expired: Pair
    stranger: Pair  # signed by another CA
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", cert.name,
             "-subj", f"/CN={name}", "-days", "30", cwd=folder)
    return cert, key


def _signed(folder: Path, name: str, ca: tuple[Path, Path], days: int = 30, dns: str = "") -> Pair:
    """A certificate for CN=name signed by `ca`; days=0 makes one that has expired a second later."""
    cert, key, request = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key.name, "-out", request.name, "-subj", f"/CN={name}",
             cwd=folder)
    extensions = folder / f"{name}.ext"
    extensions.write_text(f"subjectAltName={dns}\n" if dns else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", request.name, "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-CAcreateserial",
             "-out", cert.name, "-days", str(days), "-extfile", extensions.name, cwd=folder)
    os.chmod(key, 0o600)
    return Pair(cert, key)


def renewed_server(pki: Pki, folder: Path, name: str) -> Pair:
    """Another server certificate from the site CA, for localhost/127.0.0.1 (a renewal)."""
    folder.mkdir(parents=True, exist_ok=True)
    return _signed(folder, name, (pki.ca, pki.ca.with_suffix(".key")), dns="DNS:localhost,IP:127.0.0.1")


def make_pki(folder: Path) -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    site, other = _ca(folder, "site-ca"), _ca(folder, "other-ca")
    return Pki(
        ca=site[0],
        server=_signed(folder, "node", site, dns="DNS:localhost,IP:127.0.0.1"),
        client=_signed(folder, "modality", site),
        expired=_signed(folder, "expired", site, days=0),
        stranger=_signed(folder, "stranger", other),
        other_ca=other[0],
    )
