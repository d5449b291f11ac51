"""Training checkpoints: one `torch.save` file per checkpoint, written atomically, with a sha256 beside it.

A checkpoint counts only once its `.sha256` file exists (written after the checkpoint itself), so
a kill mid-write never leaves a checkpoint that looks complete; a damaged one is an error naming
the file, never silently skipped.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from saelab.atomic import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from saelab.errors import SaelabError
from saelab.run_layout import CHECKPOINT_DIR


def checkpoint_path(run: Path, step: int) -> Path:
    return run / CHECKPOINT_DIR / f"step-{step:09d}.pt"


def save_checkpoint(run: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write the checkpoint of `step` and delete all but the newest `keep`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(run, step)
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_suffix(".sha256"), hashlib.sha256(data).hexdigest() + "\n")
    for old in complete_checkpoints(run)[:-keep]:
        old.with_suffix(".sha256").unlink()
        old.unlink()
    return path


def complete_checkpoints(run: Path) -> list[Path]:
    """Checkpoints with their checksum written, oldest first."""
    folder = run / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    remove_stale_temporaries(folder)
    return sorted(path.with_suffix(".pt") for path in folder.glob("step-*.sha256"))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read and verify a checkpoint; damage is a SaelabError naming the file and the problem."""
    try:
        data = path.read_bytes()
        expected = path.with_suffix(".sha256").read_text().strip()
    except OSError as error:
        raise SaelabError(f"checkpoint {path} cannot be read: {error}") from error
    if hashlib.sha256(data).hexdigest() != expected:
        raise SaelabError(
            f"checkpoint {path} fails its sha256 check ({len(data)} bytes): it is truncated or corrupted; "
            "delete it (and its .sha256) to resume from the previous checkpoint"
        )
    return torch.load(io.BytesIO(data), weights_only=True)


def load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """`optimizer.load_state_dict(saved)`, with every saved per-parameter tensor (Adam's moments) copied
    into its parameter's memory layout where it differs.

    torch.save keeps a tensor's strides and `load_state_dict` casts only dtype and device, while fused
    Adam on CUDA refuses moments laid out unlike their parameter ("params, grads, exp_avgs, and
    exp_avg_sqs must have same dtype, device, and layout"): a checkpoint from a saelab that stored
    W_enc column-major (until November 2026) would otherwise not resume on a GPU."""
    optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            for name, value in state.items():
                if torch.is_tensor(value) and value.shape == parameter.shape and value.stride() != parameter.stride():
                    state[name] = torch.empty_like(parameter).copy_(value)
