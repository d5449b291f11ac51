"""Which class each `SAEConfig.architecture` names, and a freshly initialised SAE of it."""

from __future__ import annotations

import torch

from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.gba import GBASAE
from saelab.sae.gsae import GradientTopKSAE
from saelab.sae.topk import BatchTopKSAE, TopKSAE

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "gsae": GradientTopKSAE,
    "gba": GBASAE,
}


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SparseAutoencoder:
    """A freshly initialised SAE of `cfg.architecture`."""
    return SAE_CLASSES[cfg.architecture](cfg, generator)
