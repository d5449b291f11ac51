"""∂L/∂x at hooks of a language model, L its next-token loss: what gradient-aware SAEs select latents with.

The harvest stores it beside each activation (`gradients: true`) and evaluation recomputes it on
held-out text, with one definition:

    L = Σ_contexts Σ_{t=0}^{T-2} −log softmax(logits[t])[token[t+1]]          (nats, float32 logits)

A sum, not a mean: a row's gradient is that of its own context's loss terms, with no
1/(batch · positions) factor, so it does not depend on the batch size or the context length.
Position t influences only the losses at t and later, so the last position (it predicts nothing
inside the context) gets a gradient of exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge

from saelab.errors import SaelabError

# What a stored `<hook>.grad` is the gradient of (recorded in the manifest of a store harvested with gradients).
GRADIENT_LOSS = (
    "sum over positions t = 0..context_size-2 of the next-token cross-entropy "
    "-log softmax(logits[t])[token[t+1]] (nats, float32 logits of the full model), summed over "
    "the contexts of a batch: each row's gradient is that of its own context's summed loss"
)


@dataclass
class ForwardWithGradients:
    logits: torch.Tensor  # [batch, T, vocab], detached
    activations: dict[str, torch.Tensor]  # hook → [batch, T, d_model]
    gradients: dict[str, torch.Tensor]  # hook → ∂L/∂x, same shape


def forward_with_gradients(model: TransformerBridge, tokens: torch.Tensor, hooks: list[str]) -> ForwardWithGradients:
    """One full forward and backward of `tokens: [batch, T]`: the logits, and x and ∂L/∂x at each hook.

    The hooks only keep references: the graph stays whole, so the gradient at an early hook
    includes every path through the later ones, and the activations are the forward's own. The
    parameters are frozen meanwhile, the embedding output is made the one root that requires grad,
    and `autograd.grad` differentiates with respect to the hooked tensors only: no weight gradient
    is computed.
    """
    kept: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Callable[[torch.Tensor, Any], None]:
        def hook(x: torch.Tensor, hook: Any) -> None:
            kept[name] = x

        return hook

    def track(x: torch.Tensor, hook: Any) -> torch.Tensor:
        return x.detach().requires_grad_()

    with parameters_frozen(model), torch.enable_grad():
        with model.hooks(fwd_hooks=[("hook_embed", track), *((name, keep(name)) for name in hooks)]):
            logits = model(tokens)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        grads = torch.autograd.grad(loss, [kept[name] for name in hooks], allow_unused=True)
    for name, grad in zip(hooks, grads, strict=True):
        if grad is None:
            raise SaelabError(f"hook {name!r} does not feed the model's logits here; it cannot be given a gradient")
    return ForwardWithGradients(
        logits.detach(),
        {name: kept[name].detach() for name in hooks},
        dict(zip(hooks, grads, strict=True)),
    )


@contextmanager
def parameters_frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter requires grad inside (no weight gradient is computed or kept); restored on exit."""
    parameters = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, requires_grad in parameters:
            parameter.requires_grad_(requires_grad)
