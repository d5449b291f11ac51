"""The toy data of GBA's feature-recovery table (Chen et al. 2025): rows of two sparsities over one dictionary.

Each row is a non-negative combination of `s` unit feature directions, with `s` one of `sparsities`
(equally likely; the paper: 3 and 20 of 128 features in d = 42), the features drawn uniformly
without replacement, the magnitudes uniform in [magnitude_low, magnitude_high]:

    x = Σ_{f ∈ S} a_f · d_f + σ · ε,     |S| = s,  a_f ~ U[low, high],  ε ~ N(0, I)

So every feature fires with the same frequency, mean(sparsities) / n_features (≈ 0.09 in the
paper's setting), while the number of active features per row varies 7-fold: a TopK SAE's fixed k
fits at most one of the two kinds of row. What the summaries of the paper do not state (the
magnitudes, the noise, the directions' distribution) is chosen here: Gaussian directions normalised
to unit length, magnitudes U[0.5, 1.5], no noise. With `unit_rows` (the default) each row is then
scaled to unit norm, as the paper's bias range [−1, 0] assumes: without it the 20-feature rows,
~2.6× longer, dominate the loss, and no SAE tried recovered a feature at cosine 0.9.

Batch `i` of `batches(batch_size, seed)` comes from a generator seeded by (config seed, seed, i),
so a resumed run sees identical batches (the trainer's `BatchSource` contract).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from saelab.errors import ConfigError
from saelab.eval.recovery import unit_directions

Batch = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class MixedSparsityConfig:
    d_in: int = 42
    n_features: int = 128
    sparsities: tuple[int, ...] = (3, 20)
    magnitude_low: float = 0.5
    magnitude_high: float = 1.5
    noise_std: float = 0.0
    unit_rows: bool = True
    n_rows: int = 2**16  # rows per epoch
    seed: int = 0

    def validate(self) -> None:
        if min(self.d_in, self.n_features, self.n_rows) <= 0:
            raise ConfigError("d_in, n_features, n_rows: must be positive")
        if not self.sparsities or not all(0 < s <= self.n_features for s in self.sparsities):
            raise ConfigError(f"sparsities: each must be in 1..n_features ({self.n_features}), got {self.sparsities}")
        if not 0 <= self.magnitude_low <= self.magnitude_high:
            raise ConfigError("magnitude_low, magnitude_high: need 0 ≤ low ≤ high")


class MixedSparsityFeatures:
    """A `BatchSource` of toy activations; `directions` [n_features, d_in] are the true features."""

    def __init__(self, cfg: MixedSparsityConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.d_in = cfg.d_in
        self.directions = unit_directions(cfg.n_features, cfg.d_in, torch.Generator().manual_seed(cfg.seed))
        self.frequency = sum(cfg.sparsities) / len(cfg.sparsities) / cfg.n_features  # every feature's

    def n_batches(self, batch_size: int) -> int:
        return self.cfg.n_rows // batch_size

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        """One epoch of (x [batch_size, d_in], None): this data has no downstream loss to differentiate."""
        for index in range(start_batch, self.n_batches(batch_size)):
            yield self.sample(batch_size, self._generator(seed, index))[0], None

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d_in], codes [n, n_features]): the rows and the magnitudes that made them (0 = inactive;
        with `unit_rows`, x's row is that combination divided by its norm)."""
        cfg = self.cfg
        sparsity = torch.tensor(cfg.sparsities)[torch.randint(len(cfg.sparsities), (n,), generator=generator)]
        # the s features of a row: the s smallest of n_features uniform keys, i.e. a uniform s-subset
        rank = torch.rand(n, cfg.n_features, generator=generator).argsort(dim=1).argsort(dim=1)
        active = rank < sparsity[:, None]
        magnitude = cfg.magnitude_low + (cfg.magnitude_high - cfg.magnitude_low) * torch.rand(
            n, cfg.n_features, generator=generator
        )
        codes = torch.where(active, magnitude, 0)
        x = codes @ self.directions + cfg.noise_std * torch.randn(n, cfg.d_in, generator=generator)
        return (torch.nn.functional.normalize(x, dim=1) if cfg.unit_rows else x), codes

    def _generator(self, seed: int, batch: int) -> torch.Generator:
        digest = hashlib.blake2b(f"mixed/{self.cfg.seed}/{seed}/{batch}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
