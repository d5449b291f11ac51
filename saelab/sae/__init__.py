"""Sparse autoencoders: one base (encode / decode / forward / save / load) and its variants."""

from saelab.sae.base import SAEOutput, SparseAutoencoder
from saelab.sae.config import SAEConfig
from saelab.sae.gated import GatedSAE
from saelab.sae.gba import GBASAE
from saelab.sae.gsae import GradientTopKSAE
from saelab.sae.jumprelu import JumpReLUSAE
from saelab.sae.matryoshka import MatryoshkaBatchTopKSAE
from saelab.sae.registry import build_sae
from saelab.sae.saelens_format import load_sae, save_sae
from saelab.sae.standard import StandardSAE
from saelab.sae.topk import BatchTopKSAE, TopKSAE
from saelab.sae.transcoder import SkipTranscoder, Transcoder

__all__ = [
    "SAEConfig",
    "SAEOutput",
    "SparseAutoencoder",
    "TopKSAE",
    "BatchTopKSAE",
    "GradientTopKSAE",
    "GBASAE",
    "StandardSAE",
    "JumpReLUSAE",
    "GatedSAE",
    "MatryoshkaBatchTopKSAE",
    "Transcoder",
    "SkipTranscoder",
    "build_sae",
    "save_sae",
    "load_sae",
]
