"""Typed configuration of a training run: the data, the SAEs (a sweep trains in one pass), the optimiser."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from saelab.config import config_from_dict, read_config_mapping
from saelab.errors import ConfigError
from saelab.sae.config import SAEConfig


@dataclass
class WandbConfig:
    """Weights & Biases logging; `offline` writes under the run folder and needs no account or network."""

    enabled: bool = False
    mode: Literal["offline", "online"] = "offline"
    project: str = "saelab"


@dataclass
class TrainConfig:
    """One run: `n_tokens` training tokens (epochs over the store as needed), every SAE in `saes` sees each batch.

    `d_in`, `hook_name` and `model_name` of each SAE come from the activation store.
    `lr: null` uses Gao et al.'s 2e-4 / sqrt(d_sae / 2^14) per SAE; `dead_tokens: null` means
    min(10M, n_tokens / 10): a latent is dead after that many tokens without firing.
    `dtype: bfloat16` runs the encoder's dense product in bf16 (float32 accumulation; the kept values
    are recomputed in float32; the weights and Adam stay float32); `auto` (the default) is bfloat16 on
    a GPU, as sparsify trains, and float32 on the CPU. On a CPU without bf16 matrix instructions (AVX2
    alone) a bf16 product is ~100× slower than float32, so `bfloat16` there trains in float32 and says
    so (`saelab.kernels.cpu_bf16`), unless `force_bf16: true`. `encoder_tile: N` computes pre-activations N
    latents at a time, so peak memory is O(batch · (k + N)) instead of O(batch · d_sae): for wide SAEs
    on small devices (a TopK SAE on CUDA: the fused product and top-k, which never stores them).
    """

    store: str = "runs/smollm2-135m/activations"
    hook: str | None = None
    out: str = "runs/smollm2-135m/train"
    saes: list[SAEConfig] = field(default_factory=lambda: [SAEConfig()])
    n_tokens: int = 819_200
    batch_size: int = 4096
    lr: float | None = None
    lr_decay_fraction: float = 0.2
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    aux_alpha: float = 1 / 32
    k_aux: int | None = None
    dead_tokens: int | None = None
    normalize_activations: bool = True
    init_sample_rows: int = 16_384
    seed: int = 0
    checkpoint_every_tokens: int = 204_800
    keep_checkpoints: int = 2
    log_every_steps: int = 5
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    force_bf16: bool = False
    encoder_tile: int | None = None
    device: str = "auto"
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def validate(self) -> None:
        for key in ("n_tokens", "batch_size", "checkpoint_every_tokens", "keep_checkpoints", "log_every_steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("store", "out"):
            if not getattr(self, key).strip():
                raise ConfigError(f"{key}: must name a folder, got ''")
        for key in ("lr", "aux_alpha"):  # a negative or infinite rate would train without complaint, on nonsense
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value >= 0 and (key != "lr" or value > 0)):
                raise ConfigError(f"{key}: must be a finite number {'> 0' if key == 'lr' else '≥ 0'}, got {value}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.n_tokens < self.batch_size:
            raise ConfigError(f"n_tokens: {self.n_tokens} is less than one batch of {self.batch_size}")
        if not self.saes:
            raise ConfigError("saes: give at least one SAE, e.g. [{architecture: topk, d_sae: 4608, k: 32}]")
        for index, sae in enumerate(self.saes):
            try:
                sae.validate()
            except ConfigError as error:
                raise ConfigError(f"saes[{index}].{error}") from None
        for index, sae in enumerate(self.saes):
            if sae.variant.trains_on_gradients and sae.hook_name and self.hook and sae.hook_name != self.hook:
                raise ConfigError(
                    f"saes[{index}].hook_name: a {sae.architecture} reads the store's gradients, which are the run's "
                    f"hook's ({self.hook}); train it on that hook or make it the run's `hook`"
                )
            if sae.variant.transcoder and not sae.hook_name_out:
                raise ConfigError(
                    f"saes[{index}].hook_name_out: a {sae.architecture} predicts another hook; name it, e.g. "
                    "{architecture: transcoder, hook_name: blocks.15.hook_resid_mid, "
                    "hook_name_out: blocks.15.hook_mlp_out}"
                )
        labels = [sae.label for sae in self.saes]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"saes: two SAEs share a label ({', '.join(labels)}); give them distinct `name`s")
        if self.encoder_tile is not None and self.encoder_tile <= 0:
            raise ConfigError(f"encoder_tile: must be positive or null (all latents at once), got {self.encoder_tile}")
        if not 0 <= self.lr_decay_fraction <= 1:
            raise ConfigError(f"lr_decay_fraction: must be in [0, 1], got {self.lr_decay_fraction}")

    def resolved_dtype(self, device: str) -> Literal["float32", "bfloat16"]:
        """The encoder product's dtype on `device` (a torch device string)."""
        if self.dtype == "auto":
            return "bfloat16" if device.startswith("cuda") else "float32"
        if self.bf16_falls_back(device):
            return "float32"
        return self.dtype

    def bf16_falls_back(self, device: str) -> bool:
        """Whether `dtype: bfloat16` runs in float32 here: a CPU without bf16 matrix instructions, not forced."""
        if self.dtype != "bfloat16" or self.force_bf16 or not device.startswith("cpu"):
            return False
        from saelab.kernels.cpu_bf16 import cpu_has_fast_bf16  # a timed probe, run once and only when asked

        return not cpu_has_fast_bf16()

    @property
    def n_steps(self) -> int:
        return self.n_tokens // self.batch_size

    def resolved_dead_tokens(self) -> int:
        return self.dead_tokens if self.dead_tokens is not None else min(10_000_000, self.n_tokens // 10)


def load_saved_train_config(path: Path) -> TrainConfig:
    """A run folder's config.yaml, which saelab wrote: each SAE's keys that its variant does not read are
    dropped first (saelab saved every variant's keys before each declared its own; they were ignored)."""
    data = read_config_mapping(path)
    if isinstance(data.get("saes"), list):
        data["saes"] = [SAEConfig.own_fields(e) if isinstance(e, dict) else e for e in data["saes"]]
    return config_from_dict(TrainConfig, data)
