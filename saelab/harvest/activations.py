"""Run the model on a batch of contexts and take its activations (and gradients) at hooks, as a shard holds them.

The harvest job (`harvester.py`) decides which contexts go into which shard; this module only turns
contexts into the shard's tensors: `{hook: [rows, d_model]}`, with `gradients` also
`{<hook>.grad: ∂L/∂x}` where L is `saelab.models.gradients.GRADIENT_LOSS`, and the token ids.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from saelab.harvest.config import HarvestConfig
from saelab.harvest.manifest import StoreManifest, gradient_name
from saelab.models import HookPoint, stop_at_layer
from saelab.models.gradients import forward_with_gradients

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shard_tensors(
    model: TransformerBridge,
    contexts: torch.Tensor,
    hooks: list[HookPoint],
    cfg: HarvestConfig,
    manifest: StoreManifest,
    bar: tqdm,
) -> dict[str, torch.Tensor]:
    """Activations for `contexts: [n, context_size]`, batch by batch, as `{hook: [n·rows, d_model]}`.

    With `cfg.gradients` also `{<hook>.grad: [n·rows, d_model]}`, row for row.
    """
    first, rows = manifest.first_position, manifest.rows_per_context
    device = next(model.parameters()).device
    hook_names = [hook.name for hook in hooks]
    names = hook_names + [gradient_name(name) for name in hook_names] if cfg.gradients else hook_names
    stored = {
        name: torch.empty(len(contexts) * rows, manifest.d_model, dtype=STORE_DTYPES[cfg.dtype]) for name in names
    }
    for start in range(0, len(contexts), cfg.batch_size):
        batch = contexts[start : start + cfg.batch_size].to(device)
        if cfg.gradients:
            found = activations_and_gradients(model, batch, hook_names)
        else:
            found = activations(model, batch, hooks)
        for name in names:
            kept = found[name][:, first:, :].reshape(-1, manifest.d_model)
            stored[name][start * rows : (start + len(batch)) * rows] = kept.to("cpu", STORE_DTYPES[cfg.dtype])
        bar.update(len(batch) * rows)
    token_ids = contexts[:, first:].reshape(-1).to(torch.int32)
    return {**stored, "token_ids": token_ids, "contexts": contexts.to(torch.int32)}


def activations(model: TransformerBridge, batch: torch.Tensor, hooks: list[HookPoint]) -> dict[str, torch.Tensor]:
    """`{hook: [batch, context_size, d_model]}` from a forward pass that stops after the deepest hook."""
    with torch.inference_mode():
        _, cache = model.run_with_cache(
            batch,
            names_filter=[hook.name for hook in hooks],
            stop_at_layer=stop_at_layer(hooks),
            return_cache_object=False,
        )
    return cache


def activations_and_gradients(
    model: TransformerBridge, batch: torch.Tensor, names: list[str]
) -> dict[str, torch.Tensor]:
    """`{hook: x, <hook>.grad: ∂L/∂x}`, each `[batch, context_size, d_model]` (`saelab.models.gradients`)."""
    found = forward_with_gradients(model, batch, names)
    return {**found.activations, **{gradient_name(name): found.gradients[name] for name in names}}
