"""Typed configurations of the evaluations of a training run's SAEs: held-out reconstruction and CE loss
(`saelab eval`), and sparse probing and absorption (`saelab probe`)."""

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


PROBE_TASKS = ("sparse_probing", "absorption")


@dataclass
class ProbeConfig:
    """Sparse probing and first-letter absorption (`saelab.eval.probing`, `saelab.eval.absorption`) of the
    SAEs `saes` (all when empty) of the training run `run`.

    Sparse probing labels the tokens of `n_code` source files and `n_prose` pydoc topics from the end
    of the default corpus, one context each; `ks` are the sparse probes' sizes; each concept keeps at
    most `max_per_class` tokens per class. Absorption reads a random `max_words` of the model's
    single-token words. `seed` fixes the samples and splits.
    """

    run: str = "runs/smollm2-135m/train"
    saes: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=lambda: list(PROBE_TASKS))
    n_code: int = 96
    n_prose: int = 32
    ks: list[int] = field(default_factory=lambda: [1, 2, 5, 20])
    max_per_class: int = 1000
    max_words: int = 8192
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        unknown = [task for task in self.tasks if task not in PROBE_TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"tasks: {unknown or '[]'} — choose among {', '.join(PROBE_TASKS)}")
        for key in ("n_code", "n_prose", "max_per_class", "max_words"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if not self.ks or min(self.ks) <= 0:
            raise ConfigError(f"ks: the sparse probes' sizes must be positive, got {self.ks}")
        if len(set(self.saes)) != len(self.saes):
            raise ConfigError(f"saes: a label is given twice ({', '.join(self.saes)})")
