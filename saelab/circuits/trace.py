"""The clean pass every attribution starts from: one forward and one backward of the prompt.

It records, with the dictionaries spliced in (errors kept, so the model computes exactly what it
computes without them):

    states[k]        dictionary k's nodes on the prompt (`HookState`: z, ε, base, scale, y)
    gradients[k]     ∂m/∂y_k [T, d_out], the metric's gradient at the hook dictionary k writes
    embeddings       the token embeddings [T, d_model] (the token nodes) and their gradient

The gradient at a hook is the bare model's: downstream dictionaries, spliced with their errors, pass
gradients straight through (their output equals their input). This is Marks et al.'s attribution
patching (AtP) with the downstream errors as separate nodes: one backward pass gives every node's
linear estimate (`saelab.circuits.attribution`).

It also records what enters each dictionary's block, so that later passes which change a node at
dictionary k rerun only the blocks from k's on (`saelab.models.upper_layers`), many copies at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch

from saelab.circuits.dictionaries import Dictionary, HookState
from saelab.circuits.metric import Metric
from saelab.circuits.splice import dictionary_hooks, rebuild
from saelab.models.upper_layers import UpperLayers

EMBED_HOOK = "hook_embed"  # the token embeddings: TransformerLens's name, on every model


@dataclass
class Trace:
    """The clean pass of one prompt (`tokens`: [1, T]); nodes are at positions `first` … `metric.position`."""

    tokens: torch.Tensor
    first: int
    metric: Metric
    value: float
    next_logits: torch.Tensor  # [vocab] at the metric's position
    dictionaries: list[Dictionary]
    states: list[HookState]
    gradients: list[torch.Tensor]
    embeddings: torch.Tensor
    embedding_gradient: torch.Tensor
    uppers: dict[int, UpperLayers] = field(default_factory=dict)

    @property
    def n_tokens(self) -> int:
        return self.tokens.shape[1]


def trace_prompt(
    model: Any,
    tokens: torch.Tensor,
    dictionaries: list[Dictionary],
    first: int,
    metric_for: Callable[[torch.Tensor], Metric],
) -> Trace:
    """Forward `tokens` [1, T] with every dictionary spliced in, pick the metric from the logits
    (`metric_for`), and backward it to every written hook and the embeddings."""
    states: dict[int, HookState] = {}
    written: dict[int, torch.Tensor] = {}
    splice = rebuild(dictionaries, first, states)
    embedded: list[torch.Tensor] = []

    def on_write(k: int, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        written[k] = splice(k, x, y)
        return written[k]

    def embed(x: torch.Tensor, hook: Any) -> torch.Tensor:
        embedded.append(x.detach().requires_grad_(True))
        return embedded[0]

    uppers = {d.layer: UpperLayers(model, d.layer) for d in dictionaries}
    with torch.enable_grad(), ExitStack() as stack:
        for upper in uppers.values():
            stack.enter_context(upper.recording())
        stack.enter_context(model.hooks(fwd_hooks=[(EMBED_HOOK, embed), *dictionary_hooks(dictionaries, on_write)]))
        logits = model(tokens)
        metric = metric_for(logits)
        value = metric(logits)[0]
        outputs = [embedded[0], *(written[k] for k in range(len(dictionaries)))]
        grads = torch.autograd.grad(value, outputs, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, outputs, strict=True)]
    return Trace(
        tokens=tokens,
        first=first,
        metric=metric,
        value=float(value.detach()),
        next_logits=logits[0, metric.position].detach().float(),
        dictionaries=dictionaries,
        states=[_detached(states[k]) for k in range(len(dictionaries))],
        gradients=[g[0].float() for g in grads[1:]],
        embeddings=embedded[0][0].detach(),
        embedding_gradient=grads[0][0].float(),
        uppers=uppers,
    )


def _detached(state: HookState) -> HookState:
    """The clean state of a single sequence: [T, ·] tensors, out of autograd's graph."""
    return HookState(*(tensor[0].detach() for tensor in vars(state).values()))
