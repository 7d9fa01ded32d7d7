"""Names the supervisor and its workers agree on, kept apart from the worker so `serve` never imports the pipeline."""

from __future__ import annotations

import os
import socket

from node.config import Config


def worker_id(index: int = 0, pid: int | None = None) -> str:
    """The lease owner name: unique per process, and known to the supervisor that started it."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}:{index}"


def serve_name(config: Config) -> str:
    """This serve's name in the state: state.serve_name, else <host name>-<AE title> (unique per host and receiver)."""
    return config.state.serve_name or f"{socket.gethostname()}-{config.receiver.ae_title}"
