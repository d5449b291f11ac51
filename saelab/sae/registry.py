"""Which class each `SAEConfig.architecture` names, and a freshly initialised SAE of it."""

from __future__ import annotations

import torch

from saelab.sae.base import SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.gated import GatedSAE
from saelab.sae.gba import GBASAE
from saelab.sae.gsae import GradientTopKSAE
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.matryoshka import MatryoshkaBatchTopKSAE
from saelab.sae.standard import StandardSAE
from saelab.sae.topk import BatchTopKSAE, TopKSAE
from saelab.sae.transcoder import SkipTranscoder, Transcoder

SAE_CLASSES: dict[str, type[SparseAutoencoder]] = {
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "gsae": GradientTopKSAE,
    "gba": GBASAE,
    "standard": StandardSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
    "transcoder": Transcoder,
    "skip_transcoder": SkipTranscoder,
}


def build_sae(cfg: SAEConfig, generator: torch.Generator | None = None) -> SparseAutoencoder:
    """A freshly initialised SAE of `cfg.architecture`."""
    return SAE_CLASSES[cfg.architecture](cfg, generator)
