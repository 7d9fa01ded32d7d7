"""Process helpers shared by the worker supervisor and the model child."""

from __future__ import annotations

import ctypes
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(signum: signal.Signals) -> None:
    """Ask Linux to send `signum` to this process when its parent dies, even by kill -9.

    Call it in the child (a Popen preexec_fn, or first thing in a child's main). The worker gets
    SIGTERM so it hands its job back; the model child gets SIGKILL so it never keeps the GPU.
    Elsewhere than Linux it does nothing.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
