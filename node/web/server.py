"""The web server's thread inside `serve`: uvicorn on a socket bound before `serve` reports started.

The socket is bound here, in the caller's thread, so a taken port is known at once. It does not
stop the node: the DICOM node keeps receiving and processing and the error names the fix.
uvicorn runs in its own thread with its own event loop and leaves signal handling to `serve`.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from node.config import Config
from node.state.store import State
from node.web.app import make_app
from node.web.auth import load_guard
from node.web.status import Live

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class WebServer:
    """Serves the status page, /metrics and the health checks until `stop()`."""

    def __init__(self, config: Config, state: State, live: Live) -> None:
        self._config = config
        self._guard = load_guard(config.web)  # SecretError: the node refuses to start with a bad secret file
        self._app = make_app(config, state, live, self._guard)
        self._running: AppThread | None = None
        self.port: int | None = None

    def start(self) -> bool:
        """Listen and serve in a background thread; False (and an error logged) when the address cannot be bound."""
        web = self._config.web
        try:
            sock = bind(web.bind, web.port)
        except OSError as exc:
            log.error("event=web_not_started address=%s:%d reason=\"%s: stop what uses the port or change web.port / "
                      "web.bind; the DICOM node runs on without its status page\"", web.bind, web.port,
                      exc.strerror or exc)
            return False
        self.port = sock.getsockname()[1]
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start-up chatter is not in the node's format
        settings = uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                  timeout_graceful_shutdown=5)
        self._running = AppThread(settings, sock, "web")
        log.info("event=web_started address=%s:%d auth=%s patient_names=%s", web.bind, self.port, web.auth,
                 "shown" if web.show_patient_names else "hidden")
        return True

    def stop(self) -> None:
        if self._running is not None:
            self._running.stop()
            self._running = None


class AppThread:
    """uvicorn serving one app on a bound socket from a daemon thread, started before this returns (bounded)."""

    def __init__(self, settings: uvicorn.Config, sock: socket.socket, name: str) -> None:
        self._server = uvicorn.Server(settings)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name=name, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10.0)


def bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.create_server((address, port), family=family, backlog=64, reuse_port=False)
    return sock
