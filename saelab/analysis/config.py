"""Typed configuration of a feature analysis: which training run, which of its SAEs, over how many tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

from saelab.errors import ConfigError

NO_EXPLAINER = "none"  # `explainer: none`: only the token summaries are explained (and scored)


@dataclass
class AnalyzeConfig:
    """Analyse every latent of the SAEs `saes` (all when empty) of the training run `run`.

    One pass, in store order, over the first `n_tokens` rows of the run's activation store (rounded
    up to whole contexts, capped at the store's size). Per latent: frequency, mean and max
    activation, a histogram, the `top_n` most activating contexts, and `per_band` contexts from each
    of `n_bands` quantile bands, drawn from a uniform sample of `sample_size` activating tokens;
    each context is a window of `window_before` tokens, the token, and `window_after` tokens. The
    logit effects list the `n_logits` tokens each latent's decoder direction pushes up and down most.
    `batch_size` rows per step (rounded down to whole contexts); `histogram_bins` a power of two.
    """

    run: str = "runs/smollm2-135m/train"
    saes: list[str] = field(default_factory=list)
    n_tokens: int = 204_800
    top_n: int = 20
    window_before: int = 24
    window_after: int = 8
    n_bands: int = 4
    per_band: int = 5
    sample_size: int = 40
    n_logits: int = 10
    histogram_bins: int = 64
    batch_size: int = 4096
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.run.strip():
            raise ConfigError("run: must name a training run's folder, got ''")
        for key in ("n_tokens", "top_n", "n_bands", "per_band", "sample_size", "n_logits", "batch_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        for key in ("window_before", "window_after"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be ≥ 0, got {getattr(self, key)}")
        bins = self.histogram_bins
        if bins < 2 or bins & (bins - 1):
            raise ConfigError(f"histogram_bins: must be a power of two ≥ 2, got {bins}")
        if self.sample_size < self.n_bands * self.per_band:
            raise ConfigError(
                f"sample_size: {self.sample_size} cannot fill {self.n_bands} bands × {self.per_band} contexts; "
                f"use at least {self.n_bands * self.per_band}"
            )
        if len(set(self.saes)) != len(self.saes):
            raise ConfigError(f"saes: a label is given twice ({', '.join(self.saes)})")


@dataclass
class ExplainConfig:
    """Explain and score latents of the SAEs `saes` (all when empty) of the training run `run` (`saelab explain`).

    `latents` names the latents; empty: a random `n_latents` of those with enough contexts in the
    feature store (`n_latents: 0`: all of them). The explainer reads `n_explain` top contexts; the
    scorer judges `n_score` held-out activating and as many non-activating contexts. `explainer` and
    `scorer` are chat-model specs (`saelab.analysis.chat_models`: `smollm2-135m`, a Hugging Face model
    folder or name, or an OpenAI-compatible URL with `endpoint_model`); an empty scorer is the explainer.
    `explainer: none` runs no LLM explainer (then an empty scorer is `smollm2-135m`). `token_summary`
    also labels every latent by its token summary (the tokens it fires on and promotes,
    `saelab.analysis.token_summary`), scored by the same scorer against the same shuffled control.
    """

    run: str = "runs/smollm2-135m/train"
    saes: list[str] = field(default_factory=list)
    latents: list[int] = field(default_factory=list)
    n_latents: int = 100
    explainer: str = "smollm2-135m"
    scorer: str = ""
    endpoint_model: str = ""
    n_explain: int = 10
    n_score: int = 6
    token_summary: bool = True
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.run.strip():
            raise ConfigError("run: must name a training run's folder, got ''")
        if not self.explainer.strip():
            raise ConfigError("explainer: empty; name a chat model (smollm2-135m, a folder, a URL) or none")
        if self.explainer == NO_EXPLAINER and not self.token_summary:
            raise ConfigError("explainer: none with token_summary: false leaves nothing to explain; enable one")
        if self.n_latents < 0:
            raise ConfigError(f"n_latents: must be 0 (all) or positive, got {self.n_latents}")
        for key in ("n_explain", "n_score"):
            if getattr(self, key) < 2:
                raise ConfigError(f"{key}: at least 2 contexts are needed, got {getattr(self, key)}")
        if min(self.latents, default=0) < 0:
            raise ConfigError(f"latents: indices must be ≥ 0, got {min(self.latents)}")
