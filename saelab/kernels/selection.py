"""Selection rules: which (token, latent) pairs a sparse encode keeps, fed one tile of latents at a time.

The encode pass (`encode.py`) computes pre-activations u for a tile of latents [start, start + T)
and hands the tile to each rule's `update`; `result()` then gives the kept pairs as padded rows.
A rule never needs more than the current tile and what it keeps, which is what bounds memory.

- `RowTopK(k, score=…, allowed=…)`: the k best latents per token. `score` is the selection hook:
  a variant may rank latents by something other than u (g-SAE: activation × gradient alignment)
  while the value passed on stays u. `allowed` restricts the choice (AuxK: dead latents only).
- `BatchTopK(k)`: the batch·k largest relu(u) over the whole batch (BatchTopK SAEs in training).
- `AboveThreshold(θ)`: every u > θ (GBA's ReLU with θ = 0; BatchTopK's JumpReLU at inference).

Rules whose number of pairs varies per token pad their rows: `valid` marks real slots; padded ones
hold latent 0 and value 0 and get no gradient.

On the CPU, `row_topk` finds each row's top-k through group maxima (exact; see its docstring),
~1.4× faster than `torch.topk` over 9216 latents (and 2.5× faster again compiled, `compiled_topk.py`,
where numba is installed); `largest_relu` finds BatchTopK's through a sampled threshold (exact; ~7×
faster over [4096, 4608]). On a GPU both are `torch.topk`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from saelab.kernels.backend import use_compiled
from saelab.kernels.sparse_ops import full_rows

# score(u_tile: [batch, T], start) -> [batch, T]: larger is kept first.
ScoreHook = Callable[[torch.Tensor, int], torch.Tensor]
GROUP = 16  # latents per group in row_topk's first pass
COMPILED_GROUP = 32  # the same in its compiled route, which selects among fewer groups faster (measured)
SAMPLE_STRIDE = 16  # largest_relu reads its threshold from one entry in this many
# AboveThreshold keeps a tile dense when more than this fraction of its pairs pass (the class docstring).
DENSE_FRACTION = 1 / 8


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest scores per row, unsorted: the same as `torch.topk` (ties aside).

    On the CPU, in two cheap passes instead of one expensive one. Split a row's n entries into m = n/G
    groups (group j = entries j, j + m, j + 2m, …, so the group maxima are one vectorised reduction).
    Every top-k entry lies in one of the k groups with the largest maxima: an entry in any other group
    is below k group maxima, i.e. below k entries. So the top-k of the row is the top-k of those k·G
    candidates, and torch.topk runs over m + k·G entries per row instead of n.
    """
    batch, n = scores.shape
    m = n // GROUP
    if not group_maxima_applies(n, k, scores.is_cuda):
        return scores.topk(k, dim=-1, sorted=False)
    if use_compiled(scores) and scores.is_contiguous() and n % COMPILED_GROUP == 0 and n // COMPILED_GROUP > k:
        from saelab.kernels import compiled_topk

        return compiled_topk.row_topk(scores, k)
    group_max = scores.view(batch, GROUP, m).amax(dim=1)  # [batch, m]
    groups = group_max.topk(k, dim=-1, sorted=False).indices  # [batch, k]
    candidates = (groups.unsqueeze(-1) + torch.arange(0, n, m, device=scores.device)).view(batch, -1)
    top = scores.gather(-1, candidates).topk(k, dim=-1, sorted=False)
    return top.values, candidates.gather(-1, top.indices)


def group_maxima_applies(n: int, k: int, on_cuda: bool) -> bool:
    """Whether `row_topk` of k among n takes the group-maxima route: on the CPU, with n a multiple of GROUP
    and more groups than k (on a GPU `torch.topk` is already fast)."""
    return not on_cuda and n % GROUP == 0 and n // GROUP > k


def largest_relu(pre: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, flat indices) of the n largest entries of relu(pre) over the whole tensor, unsorted: the same
    as `pre.relu().flatten().topk(n)` (ties aside).

    On the CPU one top-k over a [4096, 9216] tensor costs several matmuls; instead a threshold is read from
    every SAMPLE_STRIDE-th entry (a rank a quarter above n's share, so that more than n entries clear it),
    the entries ≥ it are gathered, and the top-k runs over those. Exact whenever at least n entries, all
    positive, clear the threshold (checked); otherwise, and on a GPU, the plain top-k.
    """
    flat = pre.reshape(-1)
    if pre.is_cuda or n * SAMPLE_STRIDE * 4 > flat.numel():  # keeping over 1/64 of the entries: no gain
        return flat.relu().topk(n, sorted=False)
    sample = flat[::SAMPLE_STRIDE]
    rank = min(len(sample), math.ceil(1.25 * n / SAMPLE_STRIDE) + 64)
    threshold = sample.topk(rank, sorted=False).values.min()
    candidates = (flat >= threshold).nonzero().squeeze(1) if threshold > 0 else flat[:0].long()
    if len(candidates) < n:
        return flat.relu().topk(n, sorted=False)
    top = flat[candidates].topk(n, sorted=False)
    return top.values, candidates[top.indices]


@dataclass
class Selected:
    indices: torch.Tensor  # [batch, k'] long, latent indices
    pre_activations: torch.Tensor  # [batch, k'] u at those latents (0 at padded slots)
    valid: torch.Tensor | None = None  # [batch, k'] bool; None when every slot is real


class RowTopK:
    """The k latents with the largest score per token (score = u unless a hook is given), as a running top-k."""

    def __init__(self, k: int, score: ScoreHook | None = None, allowed: torch.Tensor | None = None) -> None:
        self.k, self.score, self.allowed = k, score, allowed
        self._best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (score, index, u)

    @property
    def ranks_all_by_u(self) -> bool:
        """Whether this is the plain top-k of u over every latent (no score hook, no restriction)."""
        return self.score is None and self.allowed is None

    def update(self, pre: torch.Tensor, start: int) -> None:
        score = pre if self.score is None else self.score(pre, start)
        if self.allowed is not None:
            score = score.masked_fill(~self.allowed[start : start + pre.shape[1]], -torch.inf)
        values, indices = row_topk(score, min(self.k, pre.shape[1]))
        candidate = (values, indices + start, pre.gather(-1, indices))
        if self._best is not None:
            merged = [torch.cat(pair, dim=-1) for pair in zip(self._best, candidate, strict=True)]
            keep = merged[0].topk(min(self.k, merged[0].shape[1]), dim=-1, sorted=False).indices
            candidate = tuple(part.gather(-1, keep) for part in merged)
        self._best = candidate

    def result(self) -> Selected:
        score, indices, pre = self._best
        if self.allowed is None:
            return Selected(indices, pre)
        valid = score > -torch.inf  # fewer allowed latents than k: the rest are padding
        return Selected(torch.where(valid, indices, 0), torch.where(valid, pre, 0), valid)


class BatchTopK:
    """The batch·k largest relu(u) over the whole batch: k per token on average, any number for one token."""

    def __init__(self, k: int) -> None:
        self.k = k
        self._best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (u, row, latent), flat

    def update(self, pre: torch.Tensor, start: int) -> None:
        batch, width = pre.shape
        values, flat = largest_relu(pre, min(self.k * batch, pre.numel()))
        candidate = (values, flat // width, flat % width + start)
        if self._best is not None:
            merged = [torch.cat(pair) for pair in zip(self._best, candidate, strict=True)]
            keep = merged[0].topk(min(self.k * batch, merged[0].numel()), sorted=False).indices
            candidate = tuple(part[keep] for part in merged)
        self._best = candidate
        self._batch = batch

    def result(self) -> Selected:
        values, rows, latents = self._best
        positive = values > 0
        return padded_rows(rows[positive], latents[positive], values[positive], self._batch)


class AboveThreshold:
    """Every (token, latent) with u > θ; θ is a number or a per-latent tensor [n].

    A tile in which more than DENSE_FRACTION of the pairs pass is kept dense; if any tile is, the result
    is dense too: `full_rows` indices (every latent of every token), u where it passes and 0 elsewhere,
    and `valid` the pass mask. Early in training a ReLU SAE keeps about half its latents, and padded
    rows that wide cost several times the dense product; the sparse products take full rows as dense.
    """

    def __init__(self, threshold: float | torch.Tensor = 0.0) -> None:
        self.threshold = threshold
        self._found: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (row, latent, u) triples
        self._dense: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (start, u masked, mask) of dense tiles
        self._n = 0

    def update(self, pre: torch.Tensor, start: int) -> None:
        threshold = self.threshold
        if isinstance(threshold, torch.Tensor):
            threshold = threshold[start : start + pre.shape[1]]
        passed = pre > threshold
        self._batch, self._n = pre.shape[0], max(self._n, start + pre.shape[1])
        if int(passed.count_nonzero()) > DENSE_FRACTION * passed.numel():  # a bool sum() is ~18× slower
            self._dense.append((start, torch.where(passed, pre, 0), passed))
            return
        rows, latents = passed.nonzero(as_tuple=True)
        self._found.append((rows, latents + start, pre[rows, latents]))

    def result(self) -> Selected:
        if self._dense:
            return self._dense_result()
        rows, latents, values = (torch.cat(parts) for parts in zip(*self._found, strict=True))
        return padded_rows(rows, latents, values, self._batch)

    def _dense_result(self) -> Selected:
        start, values, passed = self._dense[0]
        if values.shape[1] == self._n:  # one tile of every latent: it is the result
            return Selected(full_rows(self._batch, self._n, values.device), values, passed)
        pre = values.new_zeros(self._batch, self._n)
        valid = torch.zeros(self._batch, self._n, dtype=torch.bool, device=values.device)
        for start, values, passed in self._dense:
            pre[:, start : start + values.shape[1]] = values
            valid[:, start : start + values.shape[1]] = passed
        for rows, latents, values in self._found:
            pre[rows, latents], valid[rows, latents] = values, True
        return Selected(full_rows(self._batch, self._n, pre.device), pre, valid)


def padded_rows(rows: torch.Tensor, latents: torch.Tensor, values: torch.Tensor, batch: int) -> Selected:
    """(row, latent, value) triples → padded [batch, max per row] rows with a `valid` mask."""
    counts = torch.bincount(rows, minlength=batch)
    width = max(int(counts.max()) if len(rows) else 0, 1)
    order = rows.argsort(stable=True)
    rows, latents, values = rows[order], latents[order], values[order]
    row_start = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(rows), device=rows.device) - row_start[rows]
    indices = torch.zeros(batch, width, dtype=torch.long, device=rows.device)
    pre = torch.zeros(batch, width, dtype=values.dtype, device=rows.device)
    valid = torch.zeros(batch, width, dtype=torch.bool, device=rows.device)
    indices[rows, slot], pre[rows, slot], valid[rows, slot] = latents, values, True
    return Selected(indices, pre, valid)
