"""paraspinal-node: opportunistic paraspinal muscle screening on chest CT."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("paraspinal-node")
except PackageNotFoundError:
    __version__ = "0.0.0+local"
