"""Typed configuration of a steering experiment: a sweep over features × coefficients × prompts."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from saelab.errors import ConfigError
from saelab.steer.interventions import Positions

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class SteerConfig:
    """Steer the model of training run `run` with latents `features` of its SAE `sae`.

    Each cell (feature, coefficient, prompt) runs the prompt once with the intervention and generates
    `max_new_tokens` tokens (greedy, or sampled with `seed` when `do_sample`).

    - `mode: add` adds coefficient × W_dec[f] / s (the decoder direction in model units) at `hook`;
      `clamp` sets latent f to the coefficient (the SAE's error term kept); `ablate` sets it to 0
      (one cell per feature and prompt, `coefficients` unused).
    - `scale: max_activation` multiplies each coefficient by the latent's max activation from the
      SAE's feature store (`saelab analyze` writes it), so 2 means "twice its usual strength";
      `none` uses coefficients as they are.
    - `hook`: empty means the SAE's own hook; `add` may steer at another hook of the same width.
    - `positions`: `all`, `prompt` or `generated` positions; position 0 (the BOS) only with
      `include_first_position`.
    - `targets`: tokens (each one token, e.g. " open") whose log-probability change is recorded.
    Results go to `run/steer/<name>.jsonl` (one row per cell), `<name>.html` (a plotly figure) and
    `<name>.yaml` (this config).
    """

    run: str = "runs/smollm2-135m/train"
    sae: str = "topk-4608-k32"
    features: list[int] = field(default_factory=list)
    mode: Literal["add", "clamp", "ablate"] = "add"
    coefficients: list[float] = field(default_factory=lambda: [0.0, 1.0, 2.0, 4.0])
    scale: Literal["none", "max_activation"] = "none"
    hook: str = ""
    positions: Positions = "all"
    include_first_position: bool = False
    prompts: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)
    max_new_tokens: int = 16
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    seed: int = 0
    name: str = "steer"
    device: str = "auto"

    def validate(self) -> None:
        if not self.features:
            raise ConfigError("features: empty; list the SAE latents to steer with, e.g. features: [123, 456]")
        for i, feature in enumerate(self.features):
            if feature < 0:
                raise ConfigError(f"features[{i}]: latent indices are ≥ 0, got {feature}")
        if len(set(self.features)) != len(self.features):
            raise ConfigError(f"features: a latent is given twice ({', '.join(map(str, self.features))})")
        if self.mode != "ablate" and not self.coefficients:
            raise ConfigError(f"coefficients: empty; mode {self.mode} needs at least one, e.g. coefficients: [0, 2, 4]")
        if not self.prompts:
            raise ConfigError("prompts: empty; give at least one prompt, e.g. prompts: ['def read_file(path):']")
        for i, prompt in enumerate(self.prompts):
            if not prompt:
                raise ConfigError(f"prompts[{i}]: an empty prompt; give some text or remove it")
        for i, target in enumerate(self.targets):
            if not target:
                raise ConfigError(f"targets[{i}]: an empty target; name a token, e.g. ' open'")
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens: must be ≥ 0, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature} (do_sample: false is greedy)")
        if self.top_k < 0:
            raise ConfigError(f"top_k: must be ≥ 0 (0: all tokens), got {self.top_k}")
        if not _NAME.match(self.name):
            raise ConfigError(f"name: {self.name!r} must be a plain file name (letters, digits, '.', '_', '-')")
