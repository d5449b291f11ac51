"""Typed configuration of an evaluation: which training run, which of its SAEs, on how much held-out text."""

from __future__ import annotations

from dataclasses import dataclass, field

from saelab.errors import ConfigError


@dataclass
class EvalConfig:
    """Evaluate the SAEs of the training run `run` on `n_tokens` held-out tokens.

    `saes: []` means every SAE under `run/saes/`. The held-out text is the continuation of the corpus
    stream the run's activation store was harvested from, after the contexts the store holds
    (see `saelab.eval.evaluate`). `batch_size` counts contexts per forward pass.
    """

    run: str = "runs/smollm2-135m/train"
    saes: list[str] = field(default_factory=list)
    n_tokens: int = 16_384
    batch_size: int = 8
    device: str = "auto"

    def validate(self) -> None:
        for key in ("n_tokens", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if len(set(self.saes)) != len(self.saes):
            raise ConfigError(f"saes: a label is given twice ({', '.join(self.saes)})")
