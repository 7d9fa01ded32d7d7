"""DICOM TLS contexts (PS3.15 B.9 with the BCP 195 profile): one place for the receiver's and every client's.

Both sides: TLS 1.2 or later, forward-secret AEAD cipher suites only, no compression or renegotiation.
The receiver's context is reloaded when its files change (checked at most once a second) or on
SIGHUP; open associations keep the context they were accepted with. A private key that others
may read refuses the start: a readable key lets anyone on the host impersonate the node.
"""

from __future__ import annotations

import logging
import os
import ssl
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from node.config import DestinationConfig, ReceiverTlsConfig, TlsClientConfig

log = logging.getLogger(__name__)

# BCP 195 (RFC 9325 4.2) for TLS 1.2: ECDHE/DHE key exchange with AES-GCM or ChaCha20-Poly1305; TLS 1.3 suites as OpenSSL has them.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"
RELOAD_CHECK_S = 1.0


class TlsError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file and the fix."""


def check_private_key(path: Path, key: str) -> None:
    """Refuse a missing key or one that others may read."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TlsError(f"{key} {path}: {exc.strerror or exc}: point it at the PEM private key") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise TlsError(f"{key} {path} can be read by every user: run `chmod 600 {path}` (and chown it to the "
                       "node's user)")


def _bcp195(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(config: ReceiverTlsConfig) -> ssl.SSLContext:
    """The receiver's context: its certificate, and client certificates from the CA bundle (required by default)."""
    check_private_key(config.private_key, "receiver.tls.private_key")
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load(context, config.certificate, config.private_key, "receiver.tls")
    if config.ca_certificates is not None:
        _trust(context, config.ca_certificates, "receiver.tls.ca_certificates")
    context.verify_mode = ssl.CERT_REQUIRED if config.require_client_certificate else (
        ssl.CERT_OPTIONAL if config.ca_certificates is not None else ssl.CERT_NONE)
    return context


def client_context(config: TlsClientConfig, key: str = "tls") -> ssl.SSLContext:
    """A client's context: the peer's certificate checked against the CA bundle (or the system's), and its host name."""
    context = _bcp195(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    if config.ca_certificates is not None:
        _trust(context, config.ca_certificates, f"{key}.ca_certificates")
    else:
        context.load_default_certs()
    context.check_hostname = config.verify_hostname
    if config.certificate is not None and config.private_key is not None:
        check_private_key(config.private_key, f"{key}.private_key")
        _load(context, config.certificate, config.private_key, key)
    return context


def server_name(config: TlsClientConfig, host: str) -> str:
    """The name the peer's certificate must carry."""
    return config.server_name or host


def tls_args(peer: DestinationConfig, key: str = "tls") -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's `tls_args` for a peer with `tls` set; None for plain DICOM. `key` names its settings in errors."""
    if peer.tls is None:
        return None
    return client_context(peer.tls, key), server_name(peer.tls, peer.host)


def _load(context: ssl.SSLContext, certificate: Path, private_key: Path, key: str) -> None:
    try:
        context.load_cert_chain(certificate, private_key)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{key}.certificate {certificate} with {key}.private_key {private_key} cannot be used "
                       f"({getattr(exc, 'strerror', None) or exc}): both must be PEM, the key unencrypted and "
                       "matching the certificate") from None


def _trust(context: ssl.SSLContext, bundle: Path, key: str) -> None:
    try:
        context.load_verify_locations(cafile=bundle)
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"{key} {bundle} cannot be read as PEM CA certificates "
                       f"({getattr(exc, 'strerror', None) or exc}): point it at the CA bundle") from None


@dataclass(frozen=True)
class _Files:
    """What the files were when the context was made: a change to any of them reloads it."""

    stamps: tuple[tuple[int, int, int], ...]

    @classmethod
    def of(cls, paths: list[Path]) -> _Files:
        stamps = []
        for path in paths:
            try:
                info = os.stat(path)
                stamps.append((info.st_ino, info.st_size, info.st_mtime_ns))
            except OSError:
                stamps.append((0, 0, 0))
        return cls(tuple(stamps))


class ServerTls:
    """The receiver's current context; a new one when the files change or on `reload()` (SIGHUP)."""

    def __init__(self, config: ReceiverTlsConfig) -> None:
        self.config = config
        self._paths = [p for p in (config.certificate, config.private_key, config.ca_certificates) if p is not None]
        self._lock = threading.Lock()
        self._files = _Files.of(self._paths)
        self._context = server_context(config)  # TlsError refuses the start
        self._next_check = time.monotonic() + RELOAD_CHECK_S

    def context(self) -> ssl.SSLContext:
        """The context for a new connection; reloaded first if a file changed since the last check."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + RELOAD_CHECK_S
            if _Files.of(self._paths) != self._files:
                self.reload()
        return self._context

    def reload(self) -> bool:
        """Make a new context from the files; on failure keep serving with the old one and say why."""
        with self._lock:
            files = _Files.of(self._paths)
            try:
                context = server_context(self.config)
            except TlsError as exc:
                self._files = files  # do not retry a broken file every second; its next change is tried
                log.error("event=tls_reload_failed reason=%s", exc)
                return False
            self._context, self._files = context, files
        log.info("event=tls_reloaded certificate=%s", self.config.certificate)
        return True


def peer_names(sock: object) -> set[str]:
    """The subject common names and DNS names of a verified peer certificate; empty without one."""
    if not isinstance(sock, ssl.SSLSocket):
        return set()
    try:
        certificate = sock.getpeercert() or {}
    except (ValueError, OSError):
        return set()
    names = {value for rdn in certificate.get("subject", ()) for name, value in rdn if name == "commonName"}
    return names | {value for kind, value in certificate.get("subjectAltName", ()) if kind == "DNS"}
