"""The DICOMweb listener for remote workers: its own uvicorn thread, port and TLS, apart from the status page.

Like the status page's server (node/web/server.py), the socket is bound in the caller's thread so
a taken port is known at once; unlike it, a listener that cannot start refuses serve's start:
remote workers would otherwise wait on a node that never answers them.
"""

from __future__ import annotations

import logging
import ssl

import uvicorn

from node.config import Config, DicomwebConfig
from node.service.dicomweb_client import read_token
from node.state.store import State
from node.web.auth import is_loopback
from node.web.dicomweb import DicomwebSite
from node.web.server import AppThread, bind

log = logging.getLogger(__name__)


class ListenerError(Exception):
    """The listener cannot start; the message names the setting to change."""


def exposure_warning(dicomweb: DicomwebConfig) -> str | None:
    """A line for the log when CT images and the worker token would cross the network unencrypted."""
    if dicomweb.tls_certificate is not None or is_loopback(dicomweb.bind):
        return None
    return (f"the DICOMweb listener on {dicomweb.bind}:{dicomweb.port} speaks plain HTTP: images and the worker "
            "token cross the network unencrypted; set dicomweb.tls_certificate and dicomweb.tls_private_key, or "
            "bind it to an interface on a network you trust")


class DicomwebServer:
    """Serves WADO-RS and STOW-RS to remote workers until `stop()`."""

    def __init__(self, config: Config, state: State) -> None:
        self._config = config
        token = read_token(config.dicomweb.token_file, "dicomweb.token_file")  # TokenError refuses the start
        self._app = DicomwebSite(config, state, token).app()
        self._running: AppThread | None = None
        self.port: int | None = None

    def start(self) -> None:
        """Listen and serve in a background thread; ListenerError when the address or TLS files cannot be used."""
        web = self._config.dicomweb
        try:
            sock = bind(web.bind, web.port)
        except OSError as exc:
            raise ListenerError(f"cannot serve DICOMweb on {web.bind}:{web.port} ({exc.strerror or exc}): stop what "
                                "uses the port or change dicomweb.port / dicomweb.bind") from None
        self.port = sock.getsockname()[1]
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        tls = {}
        if web.tls_certificate is not None:
            tls = {"ssl_certfile": str(web.tls_certificate), "ssl_keyfile": str(web.tls_private_key)}
            if web.ca_certificates is not None:
                tls.update(ssl_ca_certs=str(web.ca_certificates), ssl_cert_reqs=ssl.CERT_REQUIRED)
        settings = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                  timeout_graceful_shutdown=5, **tls)
        try:
            settings.load()  # reads the certificate and key now, so a bad file refuses the start in one line
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            raise ListenerError(f"cannot use dicomweb.tls_certificate, tls_private_key or ca_certificates ({exc}): "
                                "give readable PEM files, the key matching the certificate") from None
        self._running = AppThread(settings, sock, "dicomweb")
        if (warning := exposure_warning(web)) is not None:
            log.warning("event=dicomweb_unencrypted reason=\"%s\"", warning)
        log.info("event=dicomweb_started address=%s:%d tls=%s client_certificates=%s url=%s", web.bind, self.port,
                 web.tls_certificate is not None, web.ca_certificates is not None, web.url)

    def stop(self) -> None:
        if self._running is not None:
            self._running.stop()
            self._running = None
