"""How delivery rows name where a file goes: `AE@host:port`, or the results folder."""

from __future__ import annotations

RESULTS_FOLDER = "folder"  # the delivery destination that stands for delivery.results_dir


def destination_key(ae_title: str, host: str, port: int) -> str:
    return f"{ae_title}@{host}:{port}"
