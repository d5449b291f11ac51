"""Batched passes over copies of one prompt, each copy edited at a hook: exact effects, integrated gradients,
edges and ablations are made of these.

A pass runs `copies` copies of the prompt as one batch, from the tokens or, to skip the blocks below
the first edit, from what entered block L on the clean pass (`Trace.uppers`). Only the metric's
position reaches the final norm and the unembedding: a [copies, T, vocab] logits tensor would cost
more memory than everything else (64 copies × 64 tokens × 49,152 words = 0.8 GB).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from saelab.circuits.splice import Hooks
from saelab.circuits.trace import Trace

FINAL_NORM_HOOK = "ln_final.hook_in"  # what enters the final norm: cut to the metric's position here


class Stop(Exception):
    """Raised by an edit once it has what it needs: the rest of the pass is not run."""


def metric_of_copies(model: Any, trace: Trace, start: int | None, copies: int, hooks: Hooks) -> torch.Tensor:
    """The metric of `copies` copies of the prompt run with `hooks` from block `start` (None: from the tokens),
    [copies]; autograd records it when the caller enables gradients."""
    position = trace.metric.position
    keep = (FINAL_NORM_HOOK, lambda x, hook: x[:, position : position + 1])
    with model.hooks(fwd_hooks=[*hooks, keep]):
        logits = model(trace.tokens.expand(copies, -1)) if start is None else trace.uppers[start](copies)
    return trace.metric.of_row(logits[:, 0])


def run_until_stopped(model: Any, trace: Trace, start: int | None, copies: int, hooks: Hooks) -> None:
    """Run like `metric_of_copies`, for hooks that end the pass by raising `Stop` (what they need they keep)."""
    try:
        metric_of_copies(model, trace, start, copies, hooks)
    except Stop:
        return
    raise RuntimeError("the pass ended without reaching the hook that stops it")


def replaced_at(name: str, values: torch.Tensor) -> tuple[str, Callable[..., torch.Tensor]]:
    """A hook that makes `name` carry `values` ([copies, T, d]) whatever came in."""
    return name, lambda x, hook: values.to(x.dtype)
