"""Exit codes shared by every subcommand, so scripts and systemd can tell the cases apart."""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the command ran and the outcome is negative (weights missing, a peer refused)
    USAGE = 2  # bad config, arguments or input: the message says what to fix
