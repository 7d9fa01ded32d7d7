"""Who may see the pages and retry: nobody is asked with auth "none"; basic or bearer check one secret.

The secret is read from `web.secret_file` at start, never from the TOML. Basic accepts any user
name with the secret as password (browsers ask once and remember); bearer wants
`Authorization: Bearer <secret>` (Prometheus' `authorization` setting, curl -H). Comparison is
constant-time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import logging
import stat
from dataclasses import dataclass
from pathlib import Path

from node.config import WebConfig

log = logging.getLogger(__name__)


class SecretError(Exception):
    """The secret file cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Guard:
    scheme: str  # none, basic or bearer
    secret: bytes = b""

    @property
    def enabled(self) -> bool:
        return self.scheme != "none"

    def allows(self, authorization: str | None) -> bool:
        """Whether an Authorization header value carries the secret in the configured scheme."""
        if not self.enabled:
            return True
        kind, _, value = (authorization or "").partition(" ")
        if self.scheme == "bearer" and kind.lower() == "bearer":
            return hmac.compare_digest(value.strip().encode(), self.secret)
        if self.scheme == "basic" and kind.lower() == "basic":
            try:
                _user, _, password = base64.b64decode(value.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                return False
            return hmac.compare_digest(password, self.secret)
        return False

    def challenge(self) -> str:
        """The WWW-Authenticate header of a 401."""
        return 'Basic realm="paraspinal-node", charset="UTF-8"' if self.scheme == "basic" else 'Bearer realm="paraspinal-node"'


def load_guard(web: WebConfig) -> Guard:
    """The guard for `web`, reading the secret file; warns about an exposed bind or a readable secret."""
    if not web.enabled:
        return Guard("none")
    if (unprotected := unprotected_warning(web)) is not None:
        log.warning("event=web_unprotected bind=%s port=%d reason=%s", web.bind, web.port, unprotected)
    if web.auth == "none":
        return Guard("none")
    path = Path(web.secret_file)
    try:
        secret = path.read_bytes().strip()
        mode = path.stat().st_mode
    except OSError as exc:
        raise SecretError(f"web.secret_file {path} cannot be read ({exc.strerror or exc}): create it with the password "
                          "or token on one line, readable by the service user") from None
    if not secret:
        raise SecretError(f"web.secret_file {path} is empty: write the password or token on one line")
    if (readable := readable_secret_warning(path, mode)) is not None:
        log.warning("event=web_secret_readable file=%s reason=%s", path, readable)
    return Guard(web.auth, secret)


def unprotected_warning(web: WebConfig) -> str | None:
    """Why the pages are open to the network, for the log and `config check`; None when they are not."""
    if not web.enabled or web.auth != "none" or is_loopback(web.bind):
        return None
    return ("the status page and metrics are open to the network without authentication: set web.auth and "
            "web.secret_file, or web.bind = 127.0.0.1")


def readable_secret_warning(path: Path, mode: int) -> str | None:
    """Why the secret file is exposed (group or others may read it), for the log and `config check`."""
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"other users can read the secret: chmod 600 {path}"
    return None


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
