"""Pairing the latents of two dictionaries by direction: nearest partners and a one-to-one matching.

Two SAEs trained on the same activations learn the same feature when they hold (nearly) the same unit
direction for it, up to the order of their latents. Given the unit rows of two dictionaries, a: [n_a, d]
and b: [n_b, d]:

- `nearest`: each row of a's `count` largest cosines with b's rows (chunked, so the [n_a, n_b] cosine
  matrix never exists whole). Its first column gives the mean max cosine (MMCS).
- `match`: the one-to-one matching that maximises the summed cosine of matched pairs (the Hungarian
  problem; its mean is the MCC of Song et al. 2025). `dense` solves it exactly on the whole cosine matrix
  (`scipy.optimize.linear_sum_assignment`): O(n_a·n_b) memory and up to O(n³) time, fine to ~16k latents.
  `sparse` solves it on the graph of each row's `count` nearest partners
  (`scipy.sparse.csgraph.min_weight_full_bipartite_matching`), so memory is O(n_a·count) plus one chunk of
  cosines; rows that the graph cannot place are matched densely among the partners left over. With every
  partner a candidate it is the dense matching; with fewer it is exact whenever the optimal partners are
  among the candidates, which for trained SAEs they almost always are (tests/test_compare.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.optimize
import scipy.sparse
import scipy.sparse.csgraph
import torch

MatchingMethod = Literal["auto", "dense", "sparse"]
DENSE_LIMIT = 16_384  # `auto` matches densely while both dictionaries have at most this many latents
CANDIDATES = 32  # partners per row kept for the sparse matching
CHUNK_BYTES = 256 * 2**20  # the largest block of cosines held at once while finding nearest partners
_SHIFT = 2.0  # sparse edge weight = cosine + 2 > 0: csgraph drops zero-weight edges
_UNPLACED = 0.5  # weight of a row's fallback edge: below any real edge, so the solver takes one if it can


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x: [n, d] → rows scaled to unit norm (float32; a zero row stays zero)."""
    return torch.nn.functional.normalize(x.detach().float(), dim=1)


@dataclass
class Nearest:
    """Each row's `count` nearest rows of the other dictionary, by cosine, most similar first."""

    cosine: torch.Tensor  # [n_a, count]
    index: torch.Tensor  # [n_a, count] long, rows of b

    @property
    def best(self) -> torch.Tensor:
        """[n_a] each row's max cosine with any row of b."""
        return self.cosine[:, 0]


def chunk_rows(n_columns: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many rows of an [n, n_columns] float32 block fit in `chunk_bytes`."""
    return max(1, chunk_bytes // (4 * max(n_columns, 1)))


def nearest(a: torch.Tensor, b: torch.Tensor, count: int, chunk_bytes: int = CHUNK_BYTES) -> Nearest:
    """The `count` largest cosines of each unit row of a: [n_a, d] with the unit rows b: [n_b, d]."""
    count = min(count, len(b))
    cosines, indices = [], []
    for part in a.split(chunk_rows(len(b), chunk_bytes)):
        top = (part @ b.T).topk(count, dim=1)
        cosines.append(top.values)
        indices.append(top.indices)
    return Nearest(torch.cat(cosines), torch.cat(indices))


@dataclass
class Matching:
    """A one-to-one matching of a's rows to b's rows."""

    partner: torch.Tensor  # [n_a] long, the row of b matched to each row of a; -1 where none (n_a > n_b)
    cosine: torch.Tensor  # [n_a] the matched pair's cosine; NaN where unmatched
    method: str  # "dense" or "sparse"
    peak_bytes: int  # the largest cosine block or graph held while matching

    @property
    def mean_cosine(self) -> float:
        """The mean cosine of the matched pairs (the MCC)."""
        matched = self.partner >= 0
        return float(self.cosine[matched].mean()) if matched.any() else float("nan")


def match(
    a: torch.Tensor,
    b: torch.Tensor,
    method: MatchingMethod = "auto",
    candidates: Nearest | None = None,
    count: int = CANDIDATES,
) -> Matching:
    """The matching of unit rows a: [n_a, d] to b: [n_b, d] with the largest summed cosine.

    `auto` is `dense` up to DENSE_LIMIT latents on either side, else `sparse` on `candidates` (a's
    nearest rows of b; found here with `count` per row when not given)."""
    if method == "auto":
        method = "dense" if max(len(a), len(b)) <= DENSE_LIMIT else "sparse"
    if method == "dense":
        return _match_dense(a, b)
    return _match_sparse(a, b, candidates if candidates is not None else nearest(a, b, count))


def _match_dense(a: torch.Tensor, b: torch.Tensor) -> Matching:
    cosine = (a @ b.T).numpy()
    rows, columns = scipy.optimize.linear_sum_assignment(cosine, maximize=True)
    return _matching(len(a), rows, columns, cosine[rows, columns], "dense", cosine.nbytes)


def _match_sparse(a: torch.Tensor, b: torch.Tensor, candidates: Nearest) -> Matching:
    """Max-weight matching on the candidate graph, each row of a also joined to a fallback column of its
    own (so a full matching always exists); rows left on their fallback are then matched densely to
    the rows of b still free."""
    n_a, n_b, count = len(a), len(b), candidates.index.shape[1]
    rows = np.repeat(np.arange(n_a), count + 1)
    columns = np.concatenate([candidates.index.numpy(), n_b + np.arange(n_a)[:, None]], axis=1).ravel()
    weights = np.concatenate([candidates.cosine.numpy() + _SHIFT, np.full((n_a, 1), _UNPLACED)], axis=1).ravel()
    graph = scipy.sparse.csr_matrix((weights.astype(np.float64), (rows, columns)), shape=(n_a, n_b + n_a))
    matched_rows, matched_columns = scipy.sparse.csgraph.min_weight_full_bipartite_matching(graph, maximize=True)
    placed = matched_columns < n_b
    partner = np.full(n_a, -1)
    partner[matched_rows[placed]] = matched_columns[placed]
    peak = graph.data.nbytes + graph.indices.nbytes + graph.indptr.nbytes
    unplaced = np.flatnonzero(partner < 0)
    free = np.setdiff1d(np.arange(n_b), partner[partner >= 0])
    if len(unplaced) and len(free):
        block = (a[torch.from_numpy(unplaced)] @ b[torch.from_numpy(free)].T).numpy()
        left_rows, left_columns = scipy.optimize.linear_sum_assignment(block, maximize=True)
        partner[unplaced[left_rows]] = free[left_columns]
        peak = max(peak, block.nbytes)
    matched = np.flatnonzero(partner >= 0)
    cosine = (a[torch.from_numpy(matched)] * b[torch.from_numpy(partner[matched])]).sum(1).numpy()
    return _matching(n_a, matched, partner[matched], cosine, "sparse", peak)


def _matching(n_a: int, rows: np.ndarray, columns: np.ndarray, cosine: np.ndarray, method: str, peak: int) -> Matching:
    partner = torch.full((n_a,), -1, dtype=torch.long)
    matched_cosine = torch.full((n_a,), float("nan"))
    partner[torch.from_numpy(np.asarray(rows, dtype=np.int64))] = torch.from_numpy(np.asarray(columns, dtype=np.int64))
    matched_cosine[torch.from_numpy(np.asarray(rows, dtype=np.int64))] = torch.from_numpy(
        np.asarray(cosine, dtype=np.float32)
    )
    return Matching(partner, matched_cosine, method, int(peak))
