"""Sparse autoencoders: one base (encode / decode / forward / save / load) and its variants."""

from saelab.sae.base import SAEOutput, SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.gba import GBASAE
from saelab.sae.gsae import GradientTopKSAE
from saelab.sae.registry import build_sae
from saelab.sae.saelens_format import load_sae, save_sae
from saelab.sae.topk import BatchTopKSAE, TopKSAE

__all__ = [
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "BatchTopKSAE",
    "GradientTopKSAE",
    "GBASAE",
    "build_sae",
    "save_sae",
    "load_sae",
]
