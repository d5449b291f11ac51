"""How hard to steer: the largest strength whose KL stays under a budget, read off a `saelab steer` sweep.

Adding a latent's decoder direction changes nothing visible at small strengths and collapses the model
(`* ** ** …`) at large ones. The sweep (`experiment.sweep_rows`, the one `saelab steer` runs) adds the
latent at each coefficient × its max activation (from the feature store) and measures

    kl = D_KL(p_steered ‖ p_unsteered) of the next token at the prompt's last position, nats

and the greedy continuation. The strength chosen is the largest coefficient c such that every swept
coefficient up to c keeps kl ≤ KL_BUDGET: the steering is as strong as it gets while the next-token
distribution stays within KL_BUDGET nats of the model's own. Why 1 nat: on a small demo run (TopK, 4608
latents, k 32, layer 15), latent 18 (`fires on: " isinstance"`) added to "The os module provides
functions for" gave KL 0.12 at 1× (the text barely changed), 0.45 at 2× ("… a new object that is a
subclass of the `object` class": changed, fluent), 1.7 at 4× ("building a world game with a universe
…": broken) and 3.3 at 8× (" in e e e e …": collapsed); docs/explanations.md shows the sweep.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saelab.sae import SparseAutoencoder
from saelab.steer.config import SteerConfig
from saelab.steer.experiment import feature_scales, sweep_rows
from saelab.steer.interventions import Positions

KL_BUDGET = 1.0  # nats, at the prompt's last position
COEFFICIENTS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # × the latent's max activation
NEW_TOKENS = 8  # generated per swept strength: enough to see the text break, half the playground's 16


@dataclass
class StrengthSweep:
    latent: int
    scale: float  # the latent's max activation: strength = coefficient × scale
    rows: list[dict[str, Any]]  # `sweep_rows`' rows, coefficient ascending
    budget: float
    chosen: dict[str, Any] | None  # the row of the strength chosen; None when even the smallest exceeds it

    @property
    def coefficient(self) -> float | None:
        return None if self.chosen is None else float(self.chosen["coefficient"])


def largest_within_budget(rows: list[dict[str, Any]], budget: float = KL_BUDGET) -> dict[str, Any] | None:
    """The row of the largest positive coefficient up to which every row keeps `kl` ≤ `budget` (NaN breaks it)."""
    chosen = None
    for row in sorted(rows, key=lambda row: row["coefficient"]):
        if row["coefficient"] <= 0:
            continue
        if not row["kl"] <= budget:
            break
        chosen = row
    return chosen


def strength_sweep(
    model: Any,
    sae: SparseAutoencoder,
    sae_folder: str | Path,
    latent: int,
    prompt: str,
    tokens: torch.Tensor,
    coefficients: tuple[float, ...] = COEFFICIENTS,
    budget: float = KL_BUDGET,
    hook: str = "",
    positions: Positions = "all",
    max_new_tokens: int | None = None,
) -> StrengthSweep:
    """Sweep `add` of `latent` over `coefficients` × its max activation (the SAE folder's feature store) on
    `prompt` (`tokens`: its ids as run, [1, P]) and choose the largest strength within `budget` (module
    docstring), generating `max_new_tokens` (default NEW_TOKENS) at each. The caller holds whatever lock
    guards `model`."""
    own_hook = sae.cfg.hook_name
    where = hook or sae.cfg.hook_name_out or own_hook
    cfg = SteerConfig(
        sae=sae.cfg.label,
        features=[latent],
        mode="add",
        coefficients=list(coefficients),
        scale="max_activation",
        hook=where,
        positions=positions,
        prompts=[prompt],
        max_new_tokens=NEW_TOKENS if max_new_tokens is None else max_new_tokens,
    )
    cfg.validate()
    scales = feature_scales(Path(sae_folder), [latent], "max_activation", sae)
    rows = sweep_rows(cfg, sae.cfg.label, model, sae, own_hook, where, [tokens], scales)
    rows.sort(key=lambda row: row["coefficient"])
    return StrengthSweep(latent, scales[latent], rows, budget, largest_within_budget(rows, budget))
