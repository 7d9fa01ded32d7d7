"""Stand-in for connected-components-3d on the GPU machine (scripts/gpu-kit): the real wheel (4.7 MiB) does not fit.

acvl-utils imports it for morphology that nnU-Net's inference does not call; a call fails loudly.
"""


def __getattr__(name: str):
    raise AttributeError(f"cc3d.{name} was called, but cc3d is a stand-in on the GPU machine "
                         "(scripts/gpu-stubs): add connected-components-3d to SHIP in scripts/gpu-kit")
