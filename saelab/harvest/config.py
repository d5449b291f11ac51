"""Typed configuration of a harvest: which model, which hooks, which text, how much, where."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from saelab.errors import ConfigError

DEFAULT_HOOK = "blocks.15.hook_resid_post"


@dataclass
class CorpusConfig:
    """Where the text comes from.

    `source: default` is the offline corpus (the Python standard library's source and
    `pydoc_data.topics`, in a fixed seeded order). `source: datasets` streams any
    Hugging Face `datasets` source: a hub name (`path: monology/pile-uncopyrighted`) or
    local files (`path: data/*.jsonl`; json, jsonl, parquet, txt and csv are recognised
    by extension).
    """

    source: Literal["default", "datasets"] = "default"
    path: str | None = None
    name: str | None = None
    split: str = "train"
    text_column: str = "text"
    seed: int = 0


@dataclass
class HarvestConfig:
    """One harvest: `n_tokens` activation rows per hook, written in shards under `out`.

    `gradients: true` also stores, beside each hook's activations x, the gradient ∂L/∂x of the
    summed next-token loss (what gradient-aware SAEs such as g-SAE select latents with); it costs a
    full forward and backward pass per batch instead of a forward stopped at the deepest hook.
    """

    model: str = "smollm2-135m"
    hooks: list[str] = field(default_factory=lambda: [DEFAULT_HOOK])
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    out: str = "runs/smollm2-135m/activations"
    n_tokens: int = 204_800
    context_size: int = 128
    prepend_bos: bool = True
    exclude_first_position: bool = True
    first_position: int | None = None
    batch_size: int = 8
    shard_contexts: int = 512
    dtype: Literal["float32", "bfloat16"] = "float32"
    gradients: bool = False
    device: str = "auto"

    def validate(self) -> None:
        validate_harvest_config(self)

    @property
    def stored_from(self) -> int:
        """The first position stored: `first_position`, else 1 (BOS excluded) or 0."""
        if self.first_position is not None:
            return self.first_position
        return 1 if self.exclude_first_position else 0


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(f"{name}: must be positive, got {value}")


def validate_harvest_config(cfg: HarvestConfig) -> None:
    """Checks that need more than a type: sizes positive, at least one hook, room for a kept position."""
    for name in ("n_tokens", "context_size", "batch_size", "shard_contexts"):
        _check_positive(name, getattr(cfg, name))
    if not cfg.out.strip():
        raise ConfigError("out: must name the store's folder, got ''")
    if not cfg.hooks:
        raise ConfigError("hooks: give at least one hook, e.g. [blocks.15.hook_resid_post]")
    if cfg.exclude_first_position and cfg.context_size < 2:
        raise ConfigError("context_size: must be at least 2 when exclude_first_position is true")
    if cfg.first_position is not None and not 0 <= cfg.first_position < cfg.context_size:
        raise ConfigError(
            f"first_position: must be in 0..context_size-1 ({cfg.context_size - 1}), got {cfg.first_position}"
        )
    if cfg.corpus.source == "datasets" and not cfg.corpus.path:
        raise ConfigError("corpus.path: required for corpus.source: datasets (a hub dataset name or local files)")
