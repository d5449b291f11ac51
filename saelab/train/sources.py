"""Where training batches come from: anything with `batches(...)` and `n_batches(...)`.

The activation store is the usual source; the synthetic recovery benchmark is another. Batches
must be a deterministic function of (seed, batch index) so that a resumed run sees the same data.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import torch

from saelab.harvest.store import ActivationStore

# activations [batch, d_in], gradients or None; a source asked for `other_hooks` adds a third item, the same
# rows at those hooks ({hook: [batch, width]}: a transcoder's target, an SAE of the sweep on another hook).
# Rows may come in the store's dtype (half the bytes to move for a 16-bit store); the trainer makes them float32.
Batch = tuple[torch.Tensor, torch.Tensor | None] | tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]


def map_batch(batch: Batch, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
    """`fn` applied to every tensor of a batch."""
    x, gradient, *others = batch
    mapped = (fn(x), None if gradient is None else fn(gradient))
    return (*mapped, {hook: fn(rows) for hook, rows in others[0].items()}) if others else mapped


class BatchSource(Protocol):
    """A source of rows at several hooks (a third batch item) also has `width(hook)`, each hook's width."""

    d_in: int

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]: ...

    def n_batches(self, batch_size: int) -> int: ...


class StoreSource:
    """One hook of an activation store (and the same rows at `other_hooks`), shuffled per epoch with its seed,
    in the store's dtype."""

    def __init__(self, store: ActivationStore, hook: str | None = None, other_hooks: Sequence[str] = ()) -> None:
        self.store = store
        self.hook = store.hook_name(hook)
        self.other_hooks = [store.hook_name(other) for other in other_hooks if other != self.hook]
        self.d_in = store.d_model

    def width(self, hook: str) -> int:
        """The width of the rows at `hook` (every hook of a store has the model's width)."""
        return self.store.d_model

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        if self.other_hooks:
            yield from self.batch_slices(batch_size, seed, slice(None), start_batch, with_gradients)
            return
        batches = self.store.batches(
            batch_size, self.hook, seed, dtype=self.store.dtype, start_batch=start_batch, with_gradients=with_gradients
        )
        if with_gradients:
            yield from batches
            return
        for activations in batches:
            yield activations, None

    def batch_slices(
        self, batch_size: int, seed: int, rows: slice, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        """`rows` of each batch `batches` yields, reading only those rows (a data-parallel rank's share)."""
        epoch = itertools.islice(self.store.batch_indices(batch_size, seed), start_batch, None)
        for index in epoch:
            part = index[rows]
            gradients = self.store.gradient_rows(part, self.hook) if with_gradients else None
            x = self.store.rows(part, self.hook)
            if not self.other_hooks:
                yield x, gradients
                continue
            yield x, gradients, {hook: self.store.rows(part, hook) for hook in self.other_hooks}

    def n_batches(self, batch_size: int) -> int:
        return self.store.n_batches(batch_size)


class TensorSource:
    """Activations (and optionally gradients, and the same rows at other hooks) held in memory: for
    notebooks, tests and small experiments."""

    def __init__(
        self,
        activations: torch.Tensor,
        gradients: torch.Tensor | None = None,
        other_hooks: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.activations = activations
        self.gradients = gradients
        self.other_hooks = other_hooks or {}
        self.d_in = activations.shape[1]

    def width(self, hook: str) -> int:
        return self.other_hooks[hook].shape[1] if hook in self.other_hooks else self.d_in

    def batches(
        self, batch_size: int, seed: int, start_batch: int = 0, with_gradients: bool = False
    ) -> Iterator[Batch]:
        if with_gradients and self.gradients is None:
            raise ValueError("this TensorSource holds no gradients")
        order = torch.randperm(len(self.activations), generator=torch.Generator().manual_seed(seed))
        for index in range(start_batch, self.n_batches(batch_size)):
            rows = order[index * batch_size : (index + 1) * batch_size]
            gradients = self.gradients[rows] if with_gradients else None
            if not self.other_hooks:
                yield self.activations[rows], gradients
                continue
            yield self.activations[rows], gradients, {hook: rows_of[rows] for hook, rows_of in self.other_hooks.items()}

    def n_batches(self, batch_size: int) -> int:
        return len(self.activations) // batch_size
