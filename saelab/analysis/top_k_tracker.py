"""Per latent, the n entries with the largest keys over a stream of batches, in memory that does not grow.

The state is a few tensors `[d_sae, n, ...]`, each latent's entries sorted by key, largest first:

    keys     [d_sae, n]          what entries are ranked by (−inf in an empty slot)
    values   [d_sae, n]          the latent's activation at the entry
    rows     [d_sae, n]          global store row (−1 in an empty slot)
    slots    [d_sae, n]          where the entry's window lives in `windows`
    windows  [d_sae, n, width]   the latent's activations around each entry's row, unordered

A batch arrives as its activating (row, latent) pairs. `update` keeps the pairs whose key beats
their latent's current n-th best, ranks them per latent with one sort of a combined integer key
(latent, then key descending; no Python loop over latents), lays each latent's best n out as
`[touched, n]` and merges them with the state by a `topk` over the concatenation `[touched, 2n]`.
Windows do not move in the merge: an entering pair's window is gathered (only then) into the slot
of the entry it evicts. With key = activation this is the top-n activating tokens; with key = a
uniform random number it is a bottom-k sketch (top-k of the keys, the same thing mirrored): a
uniform sample without replacement of n activating tokens per latent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WindowFn = Callable[[torch.Tensor], torch.Tensor]


class PerLatentTopK:
    """The `n` entries with the largest keys per latent, among everything passed to `update`."""

    def __init__(self, d_sae: int, n: int, width: int = 0, device: str | torch.device = "cpu") -> None:
        self.d_sae, self.n, self.width = d_sae, n, width
        self.keys = torch.full((d_sae, n), -torch.inf, device=device)
        self.values = torch.zeros(d_sae, n, device=device)
        self.rows = torch.full((d_sae, n), -1, dtype=torch.long, device=device)
        self.slots = torch.arange(n, device=device).repeat(d_sae, 1)
        self.windows = torch.full((d_sae, n, width), torch.nan, device=device)

    def update(
        self,
        latent: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        row: torch.Tensor,
        window: WindowFn | None = None,
    ) -> None:
        """Offer the pairs `latent, key, value, row: [m]`; `window(pairs [m']) → [m', width]` gives the
        windows of the pairs (indices into the `m`) that enter, so only those are gathered."""
        key = key.float()
        pair = torch.nonzero(key > self.keys[latent, -1]).squeeze(1)
        if len(pair) == 0:
            return
        # One sort groups the pairs by latent, largest key first; rank = place within the group.
        pair = pair[torch.argsort(latent[pair] * 2**32 + _descending(key[pair]))]
        group = latent[pair]
        counts = torch.bincount(group, minlength=self.d_sae)
        rank = torch.arange(len(pair), device=pair.device) - (counts.cumsum(0) - counts)[group]
        keep = rank < self.n
        pair, group, rank = pair[keep], group[keep], rank[keep]

        touched = torch.nonzero(counts).squeeze(1)
        slot_of = torch.empty(self.d_sae, dtype=torch.long, device=pair.device)
        slot_of[touched] = torch.arange(len(touched), device=pair.device)
        place = slot_of[group]
        shape = (len(touched), self.n)
        candidates = torch.full(shape, -1, dtype=torch.long, device=pair.device)  # index into the m pairs
        candidates[place, rank] = pair
        present = candidates >= 0
        safe = candidates.clamp(min=0)
        new_keys = torch.where(present, key[safe], -torch.inf)

        keys = torch.cat([self.keys[touched], new_keys], dim=1)
        best = keys.topk(self.n, dim=1).indices  # sorted, largest first
        self.keys[touched] = keys.gather(1, best)
        new_values = torch.where(present, value[safe].to(self.values.dtype), 0.0)
        self.values[touched] = torch.cat([self.values[touched], new_values], dim=1).gather(1, best)
        new_rows = torch.where(present, row[safe], -1)
        self.rows[touched] = torch.cat([self.rows[touched], new_rows], dim=1).gather(1, best)

        # Entering candidates take over the window slots of the old entries they push out. Both
        # masks are read row-major, i.e. latent by latent, and a latent evicts as many as enter.
        stays = torch.zeros(len(touched), 2 * self.n, dtype=torch.bool, device=pair.device)
        stays.scatter_(1, best, True)
        old_slots = self.slots[touched]
        freed = old_slots[~stays[:, : self.n]]
        enters = best >= self.n
        slots = old_slots.gather(1, best.clamp(max=self.n - 1))
        slots[enters] = freed
        self.slots[touched] = slots
        if self.width:
            entering = candidates.gather(1, (best - self.n).clamp(min=0))[enters]
            where = (touched[:, None].expand(shape)[enters], freed)
            self.windows[where] = torch.nan
            if window is not None:
                real = entering >= 0
                self.windows[where[0][real], where[1][real]] = window(entering[real]).to(self.windows.dtype)

    def ordered_windows(self) -> torch.Tensor:
        """The windows in entry order: `[d_sae, n, width]`, row `[f, j]` belongs to `rows[f, j]`."""
        return self.windows.gather(1, self.slots[..., None].expand(-1, -1, self.width))

    def counts(self) -> torch.Tensor:
        """How many slots each latent has filled: `[d_sae]`."""
        return (self.rows >= 0).sum(dim=1)


def _descending(key: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 2^32) that sort float32 `key` in descending order (−0.0 after +0.0, NaN anywhere)."""
    bits = key.contiguous().view(torch.int32).long()
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-integer order = float order
    return 2**31 - 1 - ordered
