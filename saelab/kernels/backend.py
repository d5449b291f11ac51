"""Which implementation a kernel runs: Triton on CUDA when Triton is installed, numba-compiled loops on the
CPU when numba is installed (`use_compiled`), plain torch otherwise.

`SAELAB_TRITON=1` forces the Triton kernels (on CPU only under `TRITON_INTERPRET=1`, which is how
the tests check them without a GPU) and skips their self-checks; `SAELAB_TRITON=0` forces torch.
In the automatic setting a Triton kernel first checks itself against its torch reference, once per
process (`self_check.py`), and a kernel that fails runs as torch from then on.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

ENV_VAR = "SAELAB_TRITON"
NUMBA_ENV_VAR = "SAELAB_NUMBA"  # 0: the CPU kernels run as torch; 1: compiled whatever the size (tests)
COMPILED_DTYPES = (torch.float32, torch.float64)
# Smaller operands run as torch: there numba's import (~0.5 s a process) and per-call overhead outweigh the
# gain. 2^20 entries: a [4096, 256] batch of pre-activations, or a [2048, 512] decoder.
COMPILED_MIN_ENTRIES = 2**20
TRITON_DEVICE_TYPES = ("cuda",)  # where the automatic setting runs Triton (ROCm's torch also says "cuda")


@dataclass(frozen=True)
class BackendChoice:
    """Whether kernels on a device run as Triton, why, and whether each Triton kernel self-checks first."""

    triton: bool
    reason: str
    self_check: bool = False


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_setting() -> str:
    """`SAELAB_TRITON` as given: "0", "1", or "auto" (unset or anything else)."""
    setting = os.environ.get(ENV_VAR, "auto")
    return setting if setting in ("0", "1") else "auto"


def backend_choice(device: torch.device | str) -> BackendChoice:
    """The backend of every kernel on `device`, and why: what `use_triton` and `saelab doctor` both read."""
    device = torch.device(device)
    setting = triton_setting()
    if setting == "0":
        return BackendChoice(False, f"{ENV_VAR}=0 forces torch")
    if setting == "1":
        if triton_available():
            return BackendChoice(True, f"{ENV_VAR}=1 forces Triton (no self-check)")
        return BackendChoice(False, f"{ENV_VAR}=1, but Triton is not installed")
    if device.type not in TRITON_DEVICE_TYPES:
        return BackendChoice(False, f"the {device.type} device runs torch (Triton kernels run on CUDA)")
    if not triton_available():
        return BackendChoice(False, "Triton is not installed (`pip install triton`)")
    return BackendChoice(True, "CUDA with Triton installed", self_check=True)


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether kernels on `tensor`'s device should run as Triton kernels."""
    return backend_choice(tensor.device).triton


def use_triton_kernel(kernel: str, tensor: torch.Tensor) -> bool:
    """Whether Triton kernel `kernel` runs on `tensor`: `use_triton`, and in the automatic setting its
    self-check on this device and dtype passed (run on the first call; `self_check.py`)."""
    choice = backend_choice(tensor.device)
    if not choice.triton:
        return False
    if not choice.self_check:
        return True
    from saelab.kernels.self_check import passes

    return passes(kernel, tensor.device, tensor.dtype)


def use_compiled(tensor: torch.Tensor) -> bool:
    """Whether a CPU kernel whose largest operand is `tensor` runs compiled (`compiled_*.py`): a float32 or
    float64 CPU tensor (numba reads no bf16) of at least COMPILED_MIN_ENTRIES entries, with numba installed;
    `SAELAB_NUMBA` 0 or 1 decides instead of the size."""
    setting = os.environ.get(NUMBA_ENV_VAR)
    if setting == "0" or tensor.device.type != "cpu" or tensor.dtype not in COMPILED_DTYPES:
        return False
    return (setting == "1" or tensor.numel() >= COMPILED_MIN_ENTRIES) and numba_available()


@functools.cache
def numba_available() -> bool:
    return importlib.util.find_spec("numba") is not None
