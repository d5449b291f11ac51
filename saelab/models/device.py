"""Which torch device a job runs on: `auto` is the GPU when there is one, else the CPU."""

from __future__ import annotations

import torch

from saelab.errors import SaelabError


def resolve_device(device: str) -> str:
    """`auto` means the GPU when there is one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise SaelabError(f"device: {device!r} is not a device (auto, cpu, cuda, cuda:1, mps, …)") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SaelabError(f"device: {device!r}, but no CUDA GPU is available here; use cpu or auto")
    return device
