"""CE loss recovered: how much of the language model's next-token loss survives splicing an SAE in.

On token contexts `[batch, T]` the model's mean next-token loss

    L = mean_{b, t = 0..T−2} −log softmax(logits[b, t])[tokens[b, t + 1]]          (nats)

is measured three ways:

    L_clean   the model as it is
    L_sae     the activation x at `hook` replaced by the SAE's reconstruction x̂, at positions t ≥ 1
    L_zero    the activation at `hook` set to 0 at the same positions (zero ablation)

    CE loss recovered = (L_zero − L_sae) / (L_zero − L_clean)     1: as good as the model; 0: as bad as ablating
    Δ LM loss         = L_sae − L_clean                           nats per predicted token

Position 0 is left as the model computed it in all three passes: it is the BOS token, an attention
sink whose residual norm is ~100× the others', and the activation store never holds it, so the SAE
never saw one. Every position's prediction is averaged, as in SAELens; the prediction made at
position 0 is then the same in all three losses (nothing before it changed) and cancels from the
fraction recovered.

The clean and zero-ablated passes run once per batch, however many SAEs are compared on it. Hooks
are added with the bridge's `hooks` context manager, so they are gone when a pass ends, however it ends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformer_lens.model_bridge import TransformerBridge

from saelab.sae.base import SparseAutoencoder

Reconstruct = Callable[[torch.Tensor], torch.Tensor]  # x: [n, d_model] → x̂: [n, d_model]
FIRST_POSITION = 1  # positions before this (the BOS / attention sink) are never replaced


def next_token_loss_sum(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Σ_{b, t ≤ T−2} −log softmax(logits[b, t])[tokens[b, t + 1]]; logits: [batch, T, vocab], tokens: [batch, T]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    """The "reconstruction" that gives L_zero: x: [n, d] → zeros."""
    return torch.zeros_like(x)


def as_reconstruct(sae: SparseAutoencoder | Reconstruct) -> Reconstruct:
    """An SAE as a function x → x̂ (its `forward(x).reconstruction`); any other callable as it is."""
    if isinstance(sae, SparseAutoencoder):
        return lambda x: sae(x).reconstruction
    return sae


def spliced_loss_sum(
    model: TransformerBridge,
    tokens: torch.Tensor,
    hook: str,
    reconstruct: SparseAutoencoder | Reconstruct | None,
    first_position: int = FIRST_POSITION,
) -> torch.Tensor:
    """The summed next-token loss of `tokens: [batch, T]` with x[:, first_position:] at `hook` replaced by
    reconstruct(x) (row by row: [n, d_model] → [n, d_model]; an SAE: its reconstruction); `reconstruct=None`
    runs the model unchanged."""
    if reconstruct is None:
        return next_token_loss_sum(model(tokens), tokens)
    reconstruct = as_reconstruct(reconstruct)

    def replace(x: torch.Tensor, hook: Any) -> torch.Tensor:
        tail = x[:, first_position:]
        patched = x.clone()
        patched[:, first_position:] = reconstruct(tail.reshape(-1, x.shape[-1])).reshape(tail.shape).to(x.dtype)
        return patched

    with model.hooks(fwd_hooks=[(hook, replace)]):
        return next_token_loss_sum(model(tokens), tokens)


@dataclass
class CELossResult:
    """Mean next-token losses (nats) over `n_predictions` predicted tokens, clean, zero-ablated and per SAE."""

    clean: float
    zero: float
    sae: dict[str, float]
    n_predictions: int

    def recovered(self, label: str) -> float | None:
        """(L_zero − L_sae) / (L_zero − L_clean); None when ablating the hook does not change the loss."""
        gap = self.zero - self.clean
        return (self.zero - self.sae[label]) / gap if gap != 0 else None

    def delta(self, label: str) -> float:
        """L_sae − L_clean, nats per predicted token."""
        return self.sae[label] - self.clean

    def summary(self, label: str) -> dict[str, float | None]:
        return {
            "ce_loss_clean": self.clean,
            "ce_loss_sae": self.sae[label],
            "ce_loss_zero": self.zero,
            "ce_loss_recovered": self.recovered(label),
            "delta_lm_loss": self.delta(label),
        }


class CELossAccumulator:
    """L_clean, L_zero and each SAE's L_sae at one hook, accumulated batch by batch on the same contexts."""

    def __init__(
        self,
        model: TransformerBridge,
        hook: str,
        reconstructions: Mapping[str, SparseAutoencoder | Reconstruct],
        first_position: int = FIRST_POSITION,
    ) -> None:
        self.model, self.hook, self.first_position = model, hook, first_position
        self.reconstructions = {label: as_reconstruct(r) for label, r in reconstructions.items()}
        self.clean_sum, self.zero_sum = 0.0, 0.0
        self.sae_sums = {label: 0.0 for label in self.reconstructions}
        self.n_predictions = 0

    @torch.inference_mode()
    def update(self, tokens: torch.Tensor) -> None:
        """Run `tokens: [batch, T]` (on the model's device) clean, zero-ablated, and through every SAE."""
        self.clean_sum += float(spliced_loss_sum(self.model, tokens, self.hook, None))
        self.zero_sum += float(spliced_loss_sum(self.model, tokens, self.hook, zero_ablation, self.first_position))
        for label, reconstruct in self.reconstructions.items():
            self.sae_sums[label] += float(
                spliced_loss_sum(self.model, tokens, self.hook, reconstruct, self.first_position)
            )
        self.n_predictions += tokens.shape[0] * (tokens.shape[1] - 1)

    def result(self) -> CELossResult:
        if self.n_predictions == 0:
            raise ValueError("no contexts were added to the CELossAccumulator")
        n = self.n_predictions
        sae = {label: total / n for label, total in self.sae_sums.items()}
        return CELossResult(self.clean_sum / n, self.zero_sum / n, sae, n)


def ce_loss_recovered(
    model: TransformerBridge,
    contexts: torch.Tensor | Iterable[torch.Tensor],
    hook: str,
    reconstructions: Mapping[str, SparseAutoencoder | Reconstruct],
    batch_size: int = 8,
    first_position: int = FIRST_POSITION,
) -> CELossResult:
    """The three losses for every SAE of `reconstructions` on `contexts: [n, T]` token ids, `batch_size` at a time."""
    accumulator = CELossAccumulator(model, hook, reconstructions, first_position)
    device = next(model.parameters()).device
    batches = contexts.split(batch_size) if isinstance(contexts, torch.Tensor) else contexts
    for batch in batches:
        accumulator.update(batch.to(device))
    return accumulator.result()
