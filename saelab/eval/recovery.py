"""Synthetic activations built from KNOWN features, and how well a decoder recovers them.

The statistical model follows Chen et al. 2025 ("Taming Polysemanticity in LLMs: Provable Feature
Recovery via Sparse Autoencoders"): each row is a sparse non-negative combination of unit feature
directions plus isotropic noise,

    x = Σ_{f fired} a_f · d_f + σ_x · ε,        d_f: [d_in] unit, a_f > 0, ε ~ N(0, I),

with heterogeneous firing frequencies and some features that tend to fire together. An SAE that
reconstructs x well need not have found the d_f; `feature_recovery` measures whether it did.

Modelling choices (all in `SyntheticConfig`):
- Frequencies: feature f fires with marginal probability p_f, log-uniformly spaced from `freq_max`
  (f = 0) down to `freq_min` (f = n_features - 1): a few features fire often, many rarely. Feature
  index is frequency rank. With the defaults a row has ≈ 3.3 features on average.
- Magnitudes: a_f = |N(magnitude_mean, magnitude_std)|, drawn afresh per firing (≈ 1 ± 0.25).
- Correlation: features are grouped into random clusters of `cluster_size`. Per row, each cluster
  has a latent switch z_c ~ Bernoulli(q = cluster_rate). A member fires with probability L·p_f when
  its cluster is on and p_f·(1 - qL)/(1 - q) when off (L = cluster_lift), which keeps its marginal
  exactly p_f. Members of one cluster then co-fire with probability
  p_f·p_g·(qL² + (1 - qL)²/(1 - q)) (≈ 8.4 × independent with the defaults); features in different
  clusters are independent.
- Gradients (for the gradient-aware g-SAE, which ranks latents by activation × |decoder · ∂L/∂x|):
  each feature has a fixed downstream importance c_f = exp(importance_sigma · N(0, 1)), drawn
  independently of its frequency, and the per-row gradient is

      g = Σ_{f fired} c_f · d_f + σ_g · ε.

  This is a modelling choice, not derived from any loss: it makes each active feature visible
  through g in proportion to its importance (and independent of its magnitude), so a g-SAE has a
  real signal to prefer important features with.

Batch `i` of `batches(batch_size, seed)` is drawn from a generator seeded by (config seed, seed, i)
alone, so skipping to `start_batch` costs nothing and a resumed run sees identical batches.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from saelab.errors import ConfigError, SaelabError

Batch = tuple[torch.Tensor, torch.Tensor | None]  # as saelab.train.sources.Batch


@dataclass
class SyntheticConfig:
    """Ground-truth features and the data drawn from them; `seed` fixes directions, clusters, importances."""

    d_in: int = 64
    n_features: int = 512
    n_rows: int = 2**17  # rows per epoch
    freq_max: float = 3e-2  # firing probability of the most frequent feature
    freq_min: float = 3e-4  # ... and of the rarest; log-uniform in between
    magnitude_mean: float = 1.0  # a_f = |N(mean, std)|
    magnitude_std: float = 0.25
    cluster_size: int = 4  # 1 (or cluster_lift 1) makes every feature independent
    cluster_rate: float = 0.02  # q: P(a cluster's latent switch is on) per row
    cluster_lift: float = 20.0  # L: P(fire | cluster on) = L · p_f
    noise_std: float = 0.01  # σ_x, per coordinate of x
    importance_sigma: float = 1.0  # c_f = exp(importance_sigma · N(0, 1))
    gradient_noise_std: float = 0.01  # σ_g, per coordinate of g
    seed: int = 0

    def validate(self) -> None:
        for key in ("d_in", "n_features", "n_rows", "cluster_size"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key}: must be positive, got {getattr(self, key)}")
        if not 0 < self.freq_min <= self.freq_max <= 1:
            raise ConfigError(
                f"freq_min, freq_max: need 0 < freq_min <= freq_max <= 1, got {self.freq_min}, {self.freq_max}"
            )
        for key in ("magnitude_std", "noise_std", "importance_sigma", "gradient_noise_std"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be non-negative, got {getattr(self, key)}")
        if not 0 < self.cluster_rate < 1:
            raise ConfigError(f"cluster_rate: must be in (0, 1), got {self.cluster_rate}")
        if self.cluster_lift < 1:
            raise ConfigError(f"cluster_lift: must be at least 1, got {self.cluster_lift}")
        # Exact marginals need P(fire | on) = L·p_f <= 1 and P(fire | off) ∝ 1 - qL >= 0.
        if self.cluster_lift * self.freq_max > 1:
            raise ConfigError(f"cluster_lift: {self.cluster_lift} × freq_max {self.freq_max} exceeds 1; lower either")
        if self.cluster_lift * self.cluster_rate > 1:
            raise ConfigError(
                f"cluster_lift: {self.cluster_lift} × cluster_rate {self.cluster_rate} exceeds 1; lower either"
            )


@dataclass
class SyntheticSample:
    """Rows with their ground truth. Feature `features[j]` fired in row `rows[j]` with `magnitudes[j]`.

    x, gradient: [n, d_in]; rows, features: [nnz] int64; magnitudes: [nnz] float32.
    """

    x: torch.Tensor
    gradient: torch.Tensor
    rows: torch.Tensor
    features: torch.Tensor
    magnitudes: torch.Tensor
    n_features: int

    def codes(self) -> torch.Tensor:
        """The dense sparse code: [n, n_features], magnitude where a feature fired, else 0."""
        codes = torch.zeros(self.x.shape[0], self.n_features)
        codes[self.rows, self.features] = self.magnitudes
        return codes


class SyntheticFeatures:
    """A data source (the trainer's `BatchSource`) of activations with known features.

    directions: [n_features, d_in] unit rows; probabilities: [n_features] marginal firing
    probabilities, descending; cluster: [n_features] cluster id; importance: [n_features] c_f.
    """

    def __init__(self, cfg: SyntheticConfig) -> None:
        cfg.validate()
        self.cfg = cfg
        self.d_in = cfg.d_in
        generator = torch.Generator().manual_seed(cfg.seed)
        self.directions = unit_directions(cfg.n_features, cfg.d_in, generator)
        self.probabilities = torch.logspace(math.log10(cfg.freq_max), math.log10(cfg.freq_min), cfg.n_features)
        # Clusters are blocks of a random order, so each mixes frequent and rare features.
        self.cluster = torch.empty(cfg.n_features, dtype=torch.int64)
        self.cluster[torch.randperm(cfg.n_features, generator=generator)] = (
            torch.arange(cfg.n_features) // cfg.cluster_size
        )
        self.n_clusters = math.ceil(cfg.n_features / cfg.cluster_size)
        self.importance = torch.exp(cfg.importance_sigma * torch.randn(cfg.n_features, generator=generator))
        q, lift = cfg.cluster_rate, cfg.cluster_lift
        p_on = lift * self.probabilities.double()
        self._p_off = (self.probabilities.double() * (1 - q * lift) / (1 - q)).clamp(min=0)
        self._p_extra = (p_on - self._p_off) / (1 - self._p_off)
        self._members = torch.full((self.n_clusters * cfg.cluster_size,), -1, dtype=torch.int64)
        self._members[: cfg.n_features] = torch.argsort(self.cluster, stable=True)
        self._members = self._members.view(self.n_clusters, cfg.cluster_size)

    def __repr__(self) -> str:
        return f"SyntheticFeatures({self.cfg})"

    def n_batches(self, batch_size: int) -> int:
        return self.cfg.n_rows // batch_size

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        """One epoch: `n_batches(batch_size)` pairs (x [batch_size, d_in] float32, g or None).

        Batch i equals `activations_with_truth(batch_size, seed, batch=i)` (x, and gradient when asked).
        """
        if batch_size <= 0:
            raise SaelabError(f"batch_size must be positive, not {batch_size}")
        if start_batch < 0:
            raise SaelabError(f"start_batch must be non-negative, not {start_batch}")
        samples = (
            self._sample(batch_size, self._generator(seed, i), with_gradients)
            for i in range(start_batch, self.n_batches(batch_size))
        )
        return ((sample.x, sample.gradient if with_gradients else None) for sample in samples)

    def activations_with_truth(self, n: int, seed: int, batch: int = 0) -> SyntheticSample:
        """n rows with the features that made them; (n, seed, batch) = (batch_size, seed, i) is batch i."""
        return self._sample(n, self._generator(seed, batch), with_gradients=True)

    # ---- internals --------------------------------------------------------------------------

    def _generator(self, seed: int, batch: int) -> torch.Generator:
        # A hash, not arithmetic, so distinct (config seed, seed, batch) never share a stream.
        digest = hashlib.blake2b(f"{self.cfg.seed}/{seed}/{batch}".encode(), digest_size=8).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)

    def _sample(self, n: int, generator: torch.Generator, with_gradients: bool) -> SyntheticSample:
        # Sparse throughout: rows × features uniform draws would cost ~100× the ~3 firings per row.
        # Firing = base OR (cluster on AND extra), with P(base) = p_off and P(extra) chosen so that
        # P(fire | on) = p_off + (1 - p_off)·P(extra) = p_on.
        cfg = self.cfg
        on_rows, on_clusters = _bernoulli_process(
            torch.full((self.n_clusters,), cfg.cluster_rate, dtype=torch.float64), n, generator
        )
        base_rows, base_features = _bernoulli_process(self._p_off, n, generator)
        members = self._members[on_clusters]  # [n_on, cluster_size], -1 pads the last cluster
        p_extra = torch.where(members >= 0, self._p_extra[members.clamp(min=0)], 0.0)
        extra = torch.rand(members.shape, generator=generator, dtype=torch.float64) < p_extra
        rows = torch.cat([base_rows, on_rows[:, None].expand_as(members)[extra]])
        features = torch.cat([base_features, members[extra]])
        keys = torch.unique(rows * cfg.n_features + features)  # a firing both ways counts once; sorts by row
        rows, features = keys // cfg.n_features, keys % cfg.n_features

        magnitudes = (cfg.magnitude_mean + cfg.magnitude_std * torch.randn(len(rows), generator=generator)).abs()
        x = torch.sparse.mm(self._sparse(rows, features, magnitudes, n), self.directions)  # codes @ directions
        x += cfg.noise_std * torch.randn(n, cfg.d_in, generator=generator)
        gradient = torch.zeros(0, cfg.d_in)
        if with_gradients:  # drawn after x, so x is the same whether or not gradients are asked for
            gradient = torch.sparse.mm(self._sparse(rows, features, self.importance[features], n), self.directions)
            gradient += cfg.gradient_noise_std * torch.randn(n, cfg.d_in, generator=generator)
        return SyntheticSample(x, gradient, rows, features, magnitudes, cfg.n_features)

    def _sparse(self, rows: torch.Tensor, features: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
        """[n, n_features] sparse matrix; (rows, features) come unique and row-major from `_sample`."""
        return torch.sparse_coo_tensor(
            torch.stack([rows, features]), values, (n, self.cfg.n_features), check_invariants=False, is_coalesced=True
        )


def _bernoulli_process(p: torch.Tensor, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Successes of independent Bernoulli(p[j]) trials in rows 0..n-1, for every j: (rows, js), both [hits].

    Exact, at a cost proportional to the hits: the gaps between successes are Geometric(p[j]),
    gap = floor(log(1 - U) / log(1 - p)) + 1, drawn in blocks until every j has passed row n - 1.
    """
    p = p.double()
    log_miss = torch.log1p(-p)  # 0 for p = 0 gives infinite gaps: never fires
    expected = n * p
    block = max(1, int((expected + 6 * expected.sqrt() + 16).max().clamp(max=n)))
    last = torch.full(p.shape, -1.0, dtype=torch.float64)  # each j's last success so far
    todo = torch.arange(len(p))
    hits_rows, hits_js = [], []
    while len(todo):
        u = torch.rand(len(todo), block, generator=generator, dtype=torch.float64)
        positions = last[todo, None] + (torch.floor(torch.log1p(-u) / log_miss[todo, None]) + 1).cumsum(dim=1)
        inside = positions < n
        hits_rows.append(positions[inside].long())
        hits_js.append(todo[:, None].expand_as(positions)[inside])
        last[todo] = positions[:, -1]
        todo = todo[positions[:, -1] < n - 1]
    return torch.cat(hits_rows), torch.cat(hits_js)


def unit_directions(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """n random directions in d dimensions, Gaussian then normalised: [n, d] unit rows."""
    directions = torch.randn(n, d, generator=generator)
    return directions / directions.norm(dim=1, keepdim=True)


def max_cosine(true_directions: torch.Tensor, decoder: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each true feature, its largest (signed) cosine with any decoder row: [n_features].

    true_directions: [n_features, d_in]; decoder: [d_sae, d_in]; neither needs unit rows.
    """
    if true_directions.shape[1] != decoder.shape[1]:
        raise SaelabError(f"true directions have d_in {true_directions.shape[1]}, the decoder {decoder.shape[1]}")
    decoder = torch.nn.functional.normalize(decoder.float(), dim=1)
    true = torch.nn.functional.normalize(true_directions.float().to(decoder.device), dim=1)
    return torch.cat([(part @ decoder.T).max(dim=1).values for part in true.split(chunk)]).cpu()


def feature_recovery(
    true_directions: torch.Tensor,
    decoder: torch.Tensor,
    threshold: float = 0.9,
    frequencies: torch.Tensor | None = None,
) -> dict[str, float]:
    """How many true features have a decoder row within cosine `threshold`, overall and by frequency band.

    true_directions: [n_features, d_in]; decoder: [d_sae, d_in]; frequencies: [n_features] firing
    probabilities, or None when rows are already most-frequent first (as `SyntheticFeatures` makes
    them). Bands are thirds by frequency rank: `frequent`, `middle`, `rare`. Returns `recovered`
    (fraction with max cosine > threshold) and `mean_max_cos`, plus `recovered_{band}` and
    `mean_max_cos_{band}`.
    """
    best = max_cosine(true_directions, decoder)
    if frequencies is None:
        order = torch.arange(len(best))
    else:
        order = torch.argsort(frequencies.cpu(), descending=True, stable=True)
    result = {"recovered": (best > threshold).float().mean().item(), "mean_max_cos": best.mean().item()}
    for band, members in zip(("frequent", "middle", "rare"), order.tensor_split(3), strict=True):
        part = best[members]
        result[f"recovered_{band}"] = (part > threshold).float().mean().item() if len(part) else float("nan")
        result[f"mean_max_cos_{band}"] = part.mean().item() if len(part) else float("nan")
    return result
