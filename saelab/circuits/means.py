"""What "ablated" means for a circuit's evaluation: each node set to its mean over the run's activation store.

Marks et al. mean-ablate what lies outside a circuit: every latent to its mean activation over a
dataset (zero where it did not fire counted in), every error to its mean vector. Here the dataset is the
run's own activation store (the tokens the SAEs were trained on, at the positions the store keeps):
`n_rows` rows drawn with a fixed seed, so every evaluation of a run ablates to the same means.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from saelab.circuits.dictionaries import Dictionary, split_activation
from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore

MEAN_ROWS = 8192
CHUNK_ROWS = 2048


@dataclass
class NodeMeans:
    """One dictionary's mean latents [d_sae] and mean error [d_out], over store rows."""

    latents: torch.Tensor
    error: torch.Tensor


@torch.no_grad()
def dictionary_means(
    store: ActivationStore, dictionary: Dictionary, n_rows: int = MEAN_ROWS, seed: int = 0
) -> NodeMeans:
    """The means of `dictionary`'s nodes over `n_rows` random rows of `store` (at the hooks it reads and writes)."""
    missing = [hook for hook in {dictionary.reads, dictionary.writes} if hook not in store.hooks]
    if missing:
        raise SaelabError(
            f"{store.path} holds no activations at {', '.join(missing)}, which {dictionary.label} needs for its mean "
            f"ablation; evaluate with a store harvested at its hooks ({store.hooks} here)"
        )
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(store.n_rows, generator=generator)[: min(n_rows, store.n_rows)].sort().values
    latents = torch.zeros(dictionary.sae.cfg.d_sae)
    error = torch.zeros(dictionary.sae.cfg.output_width)
    for chunk in rows.split(CHUNK_ROWS):
        x = store.rows(chunk, dictionary.reads).float()
        y = x if dictionary.writes == dictionary.reads else store.rows(chunk, dictionary.writes).float()
        state = split_activation(dictionary, x, y, first=0)
        latents += state.latents.sum(0)
        error += state.error.sum(0)
    return NodeMeans(latents / len(rows), error / len(rows))
