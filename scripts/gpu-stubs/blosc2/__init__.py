"""Stand-in for blosc2 on the GPU machine (scripts/gpu-kit): the real wheel (7.6 MiB) does not fit its 64 MiB.

nnU-Net and acvl-utils import blosc2 for their training datasets; on the inference path they only
ask whether an array is a blosc2 NDArray, which it never is there, and read one default argument
when nnU-Net's dataset module is imported. Anything else fails loudly.
"""

import enum

from . import ndarray

__all__ = ["Codec", "ndarray"]


class Codec(enum.IntEnum):
    """nnUNetDatasetBlosc2.save_case's default codec, read at import; never used to compress."""

    LZ4HC = 2


def __getattr__(name: str):
    raise AttributeError(f"blosc2.{name} was called, but blosc2 is a stand-in on the GPU machine "
                         "(scripts/gpu-stubs): add blosc2 to SHIP in scripts/gpu-kit")
