"""Network namespaces for scale-out tests: each worker process on a "host" of its own.

A bridge in the test's namespace holds 10.77.0.1 (where PostgreSQL and serve's DICOMweb listen);
each worker namespace is joined to it by a veth pair and gets 10.77.0.(10 + n). A worker in such a
namespace reaches only that address: not serve's loopback, not its spool. Needs root and `ip netns`
(CI runs as root); `available()` says whether this machine allows it, else tests run on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

BRIDGE_ADDRESS = "10.77.0.1"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=30)


def available() -> bool:
    """Root with a working `ip netns` (a namespace can be made and removed)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"psprobe{os.getpid()}"
    if _ip("netns", "add", name, check=False).returncode != 0:
        return False
    _ip("netns", "del", name, check=False)
    return True


@dataclass
class TestNetwork:
    tag: str = field(default_factory=lambda: str(os.getpid() % 100000))
    namespaces: list[str] = field(default_factory=list)

    @property
    def bridge(self) -> str:
        return f"psbr{self.tag}"

    def create(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def host(self, index: int) -> str:
        """A namespace joined to the bridge as 10.77.0.(10 + index); its name."""
        name, outside, inside = f"psw{self.tag}x{index}", f"psv{self.tag}x{index}", f"psi{self.tag}x{index}"
        _ip("netns", "add", name)
        self.namespaces.append(name)
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge, "up")
        _ip("link", "set", inside, "netns", name)
        _ip("-n", name, "addr", "add", f"10.77.0.{10 + index}/24", "dev", inside)
        _ip("-n", name, "link", "set", inside, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def remove(self) -> None:
        for name in self.namespaces:
            _ip("netns", "del", name, check=False)  # takes its veth end, and so the pair, with it
        _ip("link", "del", self.bridge, check=False)
        self.namespaces.clear()
