"""Per-latent firing statistics over a stream of batches: count, mean, max and a linear histogram.

The histogram. Each latent wants linear bins from 0 to its own maximum, which is known only at
the end. Alternatives: two passes (twice the encoding cost), fixed log-spaced bins in units of a
global scale (one latent's mass lands in a handful of bins and the dashboard needs linear ones),
or binning a stored sample at the end (a few dozen values per latent make a poor histogram).
Instead each latent keeps `bins` equal bins over `[0, 2^e)`, with `e` the smallest exponent such
that every value so far is below `2^e`. A larger value raises `e`; each step up merges adjacent
pairs of bins into the lower half, and since the edges of the coarser grid are edges of the
finer one, the counts stay exact. At the end `2^e` lies in `[max, 2·max)`, so at least half the
bins cover `[0, max]`: an exact count of every activation, in ≥ `bins/2` linear bins up to the
max, in one pass and `[d_sae, bins]` integers. Bin edges are `k · 2^e / bins`, exact in floating
point, so a value's bin is `floor(value · bins / 2^e)` computed without rounding error.
"""

from __future__ import annotations

import torch

_UNSET = -(2**30)  # exponent of a latent that has not fired yet


class LatentStatistics:
    """Accumulates, per latent, how often it fired (value > 0), the sum and max of its activations and
    an exact histogram; `update` takes a batch's activating pairs only."""

    def __init__(self, d_sae: int, bins: int = 64, device: str | torch.device = "cpu") -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two ≥ 2, not {bins}")
        self.d_sae, self.bins = d_sae, bins
        self.n_tokens = 0
        self.n_firing = torch.zeros(d_sae, dtype=torch.long, device=device)
        self.total = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, device=device)
        self.exponent = torch.full((d_sae,), _UNSET, dtype=torch.long, device=device)
        self.counts = torch.zeros(d_sae, bins, dtype=torch.long, device=device)

    def update(self, n_rows: int, latent: torch.Tensor, value: torch.Tensor) -> None:
        """A batch of `n_rows` tokens whose activating pairs are `latent, value: [m]` (value > 0)."""
        self.n_tokens += n_rows
        self.n_firing += torch.bincount(latent, minlength=self.d_sae)
        self.total.index_add_(0, latent, value.double())
        self.max.scatter_reduce_(0, latent, value.float(), reduce="amax")
        self._histogram(latent, value.float())

    def _histogram(self, latent: torch.Tensor, value: torch.Tensor) -> None:
        # frexp: value = m·2^e with m in [0.5, 1), so value < 2^e: the exponent this value needs.
        needed = torch.frexp(value).exponent.long()
        exponent = self.exponent.scatter_reduce(0, latent, needed, reduce="amax")
        shift = torch.where(self.exponent == _UNSET, 0, exponent - self.exponent)
        # Merging log2(bins) times puts everything in bin 0; more merges change nothing.
        for step in range(min(int(shift.max()) if len(shift) else 0, self.bins.bit_length() - 1)):
            merging = torch.nonzero(shift > step).squeeze(1)
            pairs = self.counts[merging].view(len(merging), self.bins // 2, 2).sum(dim=2)
            self.counts[merging] = torch.cat([pairs, torch.zeros_like(pairs)], dim=1)
        self.exponent = exponent
        scaled = torch.ldexp(value, (self.bins.bit_length() - 1) - exponent[latent])  # value · bins / 2^e
        bin_index = scaled.floor().long().clamp_(0, self.bins - 1)
        self.counts.view(-1).index_add_(0, latent * self.bins + bin_index, torch.ones_like(bin_index))

    def mean(self) -> torch.Tensor:
        """Mean activation over the tokens where each latent fired (0 for one that never did): `[d_sae]`."""
        return (self.total / self.n_firing.clamp_min(1)).float()

    def frequency(self) -> torch.Tensor:
        """Fraction of tokens each latent fired on: `[d_sae]`."""
        return self.n_firing.double() / max(self.n_tokens, 1)

    def bin_width(self) -> torch.Tensor:
        """Each latent's histogram bin width `2^e / bins` (0 for a latent that never fired): `[d_sae]`."""
        fired = self.exponent != _UNSET
        width = torch.ldexp(torch.ones(self.d_sae, device=self.exponent.device), self.exponent.clamp_min(-1000))
        return torch.where(fired, width / self.bins, 0.0)
