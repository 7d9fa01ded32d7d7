"""The one name nnU-Net's inference path reads from blosc2 (an isinstance check)."""


class NDArray:
    """Never made: the benches hand nnU-Net numpy arrays and torch tensors."""
