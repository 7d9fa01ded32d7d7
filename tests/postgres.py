"""A real PostgreSQL for the tests: Debian's server, started with initdb + pg_ctl in a temporary folder.

It listens on a free loopback port and a private socket folder. initdb refuses to run as root,
so as root (CI) the server runs as the `postgres` user that Debian's package creates. Each test
gets its own database (`fresh_database`), so tests never see each other's rows.
"""

from __future__ import annotations

import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

TEST_NETWORK = "10.77.0.0/24"
BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _program(name: str) -> str:
    found = shutil.which(name) or next((str(d / name) for d in BIN_DIRS if (d / name).exists()), None)
    if found is None:
        raise RuntimeError(f"{name} not found: install Debian's postgresql package (scripts/peers does)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Postgres:
    folder: Path
    port: int
    user: str = "paraspinal"
    listen: tuple[str, ...] = ("127.0.0.1",)
    _names = itertools.count(1)

    @property
    def data(self) -> Path:
        return self.folder / "data"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], check=check, capture_output=True, text=True, timeout=120)

    @property
    def _options(self) -> str:
        return f"-p {self.port} -k {self.folder} -c listen_addresses={','.join(self.listen)} -c fsync=off"

    def start(self) -> None:
        options = self._options
        self._run(_program("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-w", "-t", "60",
                  "-o", options, "start")

    def stop(self) -> None:
        self._run(_program("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop", check=False)

    def restart_immediate(self) -> None:
        """`pg_ctl restart -m immediate`: every connection is cut, the server recovers from its WAL."""
        options = self._options
        self._run(_program("pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "log"), "-m", "immediate",
                  "-w", "-t", "60", "-o", options, "restart")

    def listen_also(self, address: str) -> None:
        """Listen on `address` too (a test network's bridge), restarting the server."""
        if address not in self.listen:
            self.listen = (*self.listen, address)
            self.stop()
            self.start()

    def url_at(self, address: str, database: str) -> str:
        return f"postgresql://{self.user}@{address}:{self.port}/{database}"

    def fresh_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"node_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def start_postgres() -> Postgres:
    folder = Path(tempfile.mkdtemp(prefix="paraspinal-pg-"))
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
    server = Postgres(folder, _free_port())
    server._run(_program("initdb"), "-D", str(server.data), "-U", server.user, "--auth=trust", "-E", "UTF8",
                "--no-sync")
    with (server.data / "pg_hba.conf").open("a") as hba:  # the test network of tests/netns.py
        hba.write(f"host all all {TEST_NETWORK} trust\n")
    server.start()
    return server


def remove(server: Postgres) -> None:
    server.stop()
    shutil.rmtree(server.folder, ignore_errors=True)
