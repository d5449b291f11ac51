"""Where training batches come from: anything with `batches(...)` and `n_batches(...)`.

The activation store is the usual source; the synthetic recovery benchmark is another. Batches
must be a deterministic function of (seed, batch index) so that a resumed run sees the same data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol

import torch

from saelab.harvest.store import ActivationStore

Batch = tuple[torch.Tensor, torch.Tensor | None]  # activations [batch, d_in], gradients or None


class BatchSource(Protocol):
    d_in: int

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]: ...

    def n_batches(self, batch_size: int) -> int: ...


class StoreSource:
    """One hook of an activation store, shuffled per epoch with the epoch's seed."""

    def __init__(self, store: ActivationStore, hook: str | None = None) -> None:
        self.store = store
        self.hook = store.hook_name(hook)
        self.d_in = store.d_model

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        if with_gradients:
            yield from self.store.batches(
                batch_size, hook=self.hook, seed=seed, start_batch=start_batch, with_gradients=True
            )
            return
        for activations in self.store.batches(batch_size, hook=self.hook, seed=seed, start_batch=start_batch):
            yield activations, None

    def batch_slices(
        self, batch_size: int, seed: int, rows: slice, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        """`rows` of each batch `batches` yields, reading only those rows (a data-parallel rank's share)."""
        epoch = itertools.islice(self.store.batch_indices(batch_size, seed), start_batch, None)
        for index in epoch:
            part = index[rows]
            gradients = self.store.gradient_rows(part, self.hook).float() if with_gradients else None
            yield self.store.rows(part, self.hook).float(), gradients

    def n_batches(self, batch_size: int) -> int:
        return self.store.n_batches(batch_size)


class TensorSource:
    """Activations (and optionally gradients) held in memory: for notebooks, tests and small experiments."""

    def __init__(self, activations: torch.Tensor, gradients: torch.Tensor | None = None) -> None:
        self.activations = activations
        self.gradients = gradients
        self.d_in = activations.shape[1]

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        if with_gradients and self.gradients is None:
            raise ValueError("this TensorSource holds no gradients")
        order = torch.randperm(len(self.activations), generator=torch.Generator().manual_seed(seed))
        for index in range(start_batch, self.n_batches(batch_size)):
            rows = order[index * batch_size : (index + 1) * batch_size]
            yield self.activations[rows], self.gradients[rows] if with_gradients else None

    def n_batches(self, batch_size: int) -> int:
        return len(self.activations) // batch_size
