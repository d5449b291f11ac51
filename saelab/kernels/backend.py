"""Which implementation a kernel runs: Triton on CUDA when Triton is installed, plain torch otherwise.

`SAELAB_TRITON=1` forces the Triton kernels (on CPU only under `TRITON_INTERPRET=1`, which is how
the tests check them without a GPU); `SAELAB_TRITON=0` forces torch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

ENV_VAR = "SAELAB_TRITON"


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor`'s device should run as Triton kernels."""
    setting = os.environ.get(ENV_VAR, "auto")
    if setting == "0":
        return False
    if setting == "1":
        return triton_available()
    return tensor.is_cuda and triton_available()
