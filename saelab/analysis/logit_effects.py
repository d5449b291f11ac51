"""Logit effects: which output tokens each latent's decoder direction pushes up and down.

For latent f with model-space decoder direction d_f = W_dec[f] / s (saelab's W_dec rows are unit
norm in the SAE's normalised space; s is the input scale), the direct effect on the logits is

    effect_f = (d_f ⊙ w) · W_U                           [d_vocab]

with w the final norm's elementwise weight, i.e. the direction as the model's last norm applies
it before the unembedding. The norm's division by the residual's RMS (its `scale`) depends on the
whole residual, not on the latent; it is one positive number per token, so it rescales every
entry of `effect_f` alike and is ignored (as in the usual "logit lens" of a feature). A LayerNorm
also subtracts the mean, which is linear, so d_f is centred first there; RMSNorm (Llama,
SmolLM2) does not centre. The unembedding bias adds the same to every latent and is left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from saelab.sae import SparseAutoencoder

_CHUNK_ELEMENTS = 2**25  # latents × vocab per matmul: 128 MiB of float32


@dataclass
class LogitEffects:
    """Per latent, the `k` largest and the `k` smallest entries of its logit effect."""

    top_values: torch.Tensor  # [d_sae, k], largest first
    top_ids: torch.Tensor  # [d_sae, k] token ids
    bottom_values: torch.Tensor  # [d_sae, k], most negative first
    bottom_ids: torch.Tensor  # [d_sae, k]


def decoder_directions(sae: SparseAutoencoder) -> torch.Tensor:
    """Each latent's decoder direction in model units, `W_dec / s`: `[d_sae, d_out]` float32 (a transcoder's
    are in its output hook's units; they add to the residual stream all the same)."""
    return sae.decoder_directions().float()


def final_norm_weight(model: Any) -> tuple[torch.Tensor, bool]:
    """The model's final norm weight `[d_model]` and whether that norm centres (a LayerNorm).

    Reads `model.ln_final.w` (TransformerLens's name; the bridge's RMSNorm exposes it too) or
    `.weight`; a model whose final norm has no weight (folded, `LNPre` / `RMSPre`) gets ones.
    """
    norm = getattr(model, "ln_final", None)
    weight = getattr(norm, "w", None)
    if weight is None:
        weight = getattr(norm, "weight", None)
    d_model = model.W_U.shape[0]
    if weight is None:
        weight = torch.ones(d_model, device=model.W_U.device)
    center = getattr(getattr(model, "cfg", None), "normalization_type", None) in ("LN", "LNPre")
    return weight.detach().float().reshape(d_model), center


def logit_effects(
    directions: torch.Tensor, norm_weight: torch.Tensor, W_U: torch.Tensor, k: int = 10, center: bool = False
) -> LogitEffects:
    """Top and bottom `k` of `(d ⊙ w) · W_U` per row d of `directions: [d_sae, d_model]`
    (`norm_weight: [d_model]`, `W_U: [d_model, d_vocab]`), in chunks of latents so memory stays bounded."""
    W_U = W_U.detach().float()
    k = min(k, W_U.shape[1])
    chunk = max(1, _CHUNK_ELEMENTS // W_U.shape[1])
    parts = []
    for block in directions.float().split(chunk):
        if center:
            block = block - block.mean(dim=1, keepdim=True)
        effect = (block * norm_weight) @ W_U
        top, bottom = effect.topk(k, dim=1), effect.topk(k, dim=1, largest=False)
        parts.append((top.values, top.indices, bottom.values, bottom.indices))
    return LogitEffects(*(torch.cat(column) for column in zip(*parts, strict=True)))
