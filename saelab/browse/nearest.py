"""A latent's nearest latents in the other SAEs of its run, by decoder cosine: did they learn it too?

Only SAEs of the same space count (the same hooks read and written, the same widths there); their
decoder rows are compared as unit vectors, as `saelab compare` compares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from saelab.eval.matching import unit_rows
from saelab.sae.saelens_format import load_sae


@dataclass
class UnitDecoder:
    """An SAE's unit decoder rows and the space they live in."""

    rows: torch.Tensor  # [d_sae, d_out]
    space: tuple[str, str, int, int]  # hook read, hook written (transcoders), d_in, d_out


@dataclass
class NearbyLatent:
    sae: str  # the other SAE's label in the run
    latent: int
    cosine: float


def unit_decoder(folder: str | Path) -> UnitDecoder:
    """The SAE in `folder` reduced to what `nearest_latents` reads."""
    sae = load_sae(folder)
    cfg = sae.cfg
    return UnitDecoder(unit_rows(sae.W_dec), (cfg.hook_name, cfg.hook_name_out, cfg.d_in, cfg.output_width))


def nearest_latents(
    own: UnitDecoder, latent: int, others: dict[str, UnitDecoder], count: int = 3
) -> list[NearbyLatent]:
    """The `count` latents of each SAE in `others` (by label) nearest to `own`'s `latent`, most similar first;
    SAEs of another space are skipped."""
    row = own.rows[latent]
    nearby = []
    for label, other in others.items():
        if other.space != own.space:
            continue
        top = (other.rows @ row).topk(min(count, len(other.rows)))
        nearby += [NearbyLatent(label, int(i), float(c)) for c, i in zip(top.values, top.indices, strict=True)]
    return nearby
