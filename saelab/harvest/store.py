"""Reading an activation store: random access to rows, and seeded shuffled batches for training.

The store is the folder the harvester writes: `manifest.json` plus memory-mapped safetensors
shards. Only shards listed in the manifest are read, so a store can be read while its harvest
is still running. Batches shuffle across shards through a bounded buffer of row *indices*:
the order is a pure function of the seed and the sizes, the data are gathered per batch, and
memory stays proportional to the buffer, never to the store.

A store harvested with `gradients: true` also holds ∂L/∂x beside each activation x
(`gradient_rows`, `batches(with_gradients=True)`), row for row.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from saelab.errors import SaelabError
from saelab.harvest.manifest import MANIFEST_FILE, ShardRecord, StoreManifest, gradient_name, read_manifest
from saelab.harvest.shards import SHARD_DIR, map_shard, shard_file, verify_shard

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

Indices = torch.Tensor | Sequence[int] | np.ndarray


class StoreIndexError(SaelabError, IndexError):
    """A row or context index outside the store; the message names the valid range."""


class ActivationStore:
    """An activation store on disk, opened read-only.

    Opening checks every listed shard (sizes always, sha256 when `verify`); shards are mapped
    lazily, once each, on first use.

    `read_threads` > 1 copies a batch's rows from its shards on that many threads (the copies release
    the GIL). The trainer asks for several when the step runs on a GPU and the host's cores are
    otherwise idle; on the CPU the step needs them, and reading stays on one.
    """

    def __init__(self, path: str | Path, verify: bool = True, read_threads: int = 1) -> None:
        self.path = Path(path)
        self.read_threads = read_threads
        self._manifest = read_manifest(self.path)
        if self._manifest.dtype not in _DTYPES:
            raise SaelabError(f"{self.path}: activation dtype {self._manifest.dtype!r} is not one of {list(_DTYPES)}")
        check_layout(self.path, self._manifest)
        verify_shards(self.path, self._manifest.shards, checksum=verify)
        _check_no_unlisted_shards(self.path, self._manifest)
        shards = self._manifest.shards
        # starts[s] = global index of shard s's first row; searchsorted over it finds a row's shard.
        self._row_starts = torch.tensor([0, *itertools.accumulate(r.n_rows for r in shards)][:-1], dtype=torch.int64)
        self._first_contexts = torch.tensor([r.first_context for r in shards], dtype=torch.int64)
        self._mapped: dict[int, dict[str, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, hooks={self.hooks}, n_rows={self.n_rows})"

    # ---- what the store holds -------------------------------------------------------------

    @property
    def manifest(self) -> StoreManifest:
        return self._manifest

    @property
    def hooks(self) -> list[str]:
        return list(self._manifest.hooks)

    @property
    def d_model(self) -> int:
        return self._manifest.d_model

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are stored (and returned by `rows`) in."""
        return _DTYPES[self._manifest.dtype]

    @property
    def n_rows(self) -> int:
        return self._manifest.n_rows

    @property
    def n_contexts(self) -> int:
        return self._manifest.n_contexts

    @property
    def context_size(self) -> int:
        return self._manifest.context_size

    @property
    def has_gradients(self) -> bool:
        """Whether the store holds `<hook>.grad` (harvested with `gradients: true`)."""
        return self._manifest.gradients

    @property
    def complete(self) -> bool:
        """False while the harvest is still running (the listed shards are complete all the same)."""
        return self._manifest.complete

    def hook_name(self, hook: str | None) -> str:
        """Resolve `hook`; None means the store's only hook."""
        if hook is None:
            if len(self._manifest.hooks) != 1:
                raise SaelabError(f"{self.path} holds several hooks {self._manifest.hooks}; name one")
            return self._manifest.hooks[0]
        if hook not in self._manifest.hooks:
            raise SaelabError(f"{self.path} has no hook {hook!r}; its hooks are {self._manifest.hooks}")
        return hook

    # ---- random access --------------------------------------------------------------------

    def rows(self, indices: Indices, hook: str | None = None) -> torch.Tensor:
        """Activations of global rows `indices: [n]` → `[n, d_model]` in the store dtype."""
        name = self.hook_name(hook)
        return self._gather(name, self._check_rows(indices), (self.d_model,), self.dtype)

    def gradient_rows(self, indices: Indices, hook: str | None = None) -> torch.Tensor:
        """Gradients ∂L/∂x of global rows `indices: [n]` → `[n, d_model]` in the store dtype.

        L is the loss the manifest's `gradient_loss` describes; row `i` here is the gradient at
        row `i` of `rows`.
        """
        name = self.hook_name(hook)
        self._require_gradients()
        return self._gather(gradient_name(name), self._check_rows(indices), (self.d_model,), self.dtype)

    def token_ids(self, indices: Indices) -> torch.Tensor:
        """The token at each row: `indices: [n]` → `[n]` int64."""
        return self._gather("token_ids", self._check_rows(indices), (), torch.int32).long()

    def context_of(self, indices: Indices) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each row comes from: `indices: [n]` → (context index `[n]`, position in it `[n]`), int64."""
        index = self._check_rows(indices)
        shard = self._shard_of(index)
        local = index - self._row_starts[shard]
        per_context = self._manifest.rows_per_context
        context = self._first_contexts[shard] + local // per_context
        return context, self._manifest.first_position + local % per_context

    def context_rows(self, context_index: int) -> torch.Tensor:
        """The global rows `[rows_per_context]` of context `context_index`, positions `first_position`… in order."""
        s = self._shard_holding(context_index)
        per_context = self._manifest.rows_per_context
        first = int(self._row_starts[s]) + (context_index - self._manifest.shards[s].first_context) * per_context
        return torch.arange(first, first + per_context)

    def context_tokens(self, context_index: int) -> torch.Tensor:
        """The full token context `[context_size]` (int64) that rows of `context_index` come from."""
        s = self._shard_holding(context_index)
        return self._shard(s)["contexts"][context_index - self._manifest.shards[s].first_context].long()

    def _shard_holding(self, context_index: int) -> int:
        """The shard that holds context `context_index`; a StoreIndexError naming the range held if none."""
        shards = self._manifest.shards
        s = bisect.bisect_right(self._first_contexts.tolist(), context_index) - 1
        if s < 0 or context_index >= shards[s].first_context + shards[s].n_contexts:
            end = shards[-1].first_context + shards[-1].n_contexts if shards else 0
            held = f"[{shards[0].first_context}, {end})" if shards else "none"
            raise StoreIndexError(f"context {context_index} is not in {self.path}; it holds contexts {held}")
        return s

    # ---- batches for training ---------------------------------------------------------------

    def n_batches(self, batch_size: int, drop_last: bool = True) -> int:
        """How many batches one epoch of `batches` yields."""
        full, rest = divmod(self.n_rows, batch_size)
        return full + (rest > 0 and not drop_last)

    def batch_indices(
        self,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        buffer_rows: int = 2**18,
        drop_last: bool = True,
    ) -> Iterator[torch.Tensor]:
        """The global row indices `[batch_size]` of each batch of one epoch, in the order `batches` yields them.

        Shuffled: shards in a seeded random order, each read as chunks of a seeded permutation of
        its rows, mixed through `buffered_shuffle`. Every row appears exactly once; with
        `drop_last` a short final batch is left out. The order depends only on the arguments
        (and the shards' row counts), so a run resumes by skipping batches.
        """
        if batch_size < 1:
            raise SaelabError(f"batch_size must be at least 1, not {batch_size}")
        if not shuffle:
            batches = self._ordered_indices(batch_size)
        else:
            generator = torch.Generator().manual_seed(seed)
            chunks = self._shuffled_chunks(generator, chunk_rows=max(1, buffer_rows // 4))
            batches = buffered_shuffle(chunks, buffer_rows, batch_size, generator)
        return (batch for batch in batches if not (drop_last and len(batch) < batch_size))

    def batches(
        self,
        batch_size: int,
        hook: str | None = None,
        seed: int = 0,
        shuffle: bool = True,
        buffer_rows: int = 2**18,
        drop_last: bool = True,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        start_batch: int = 0,
        with_gradients: bool = False,
    ) -> Iterator[torch.Tensor] | Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of activation batches `[batch_size, d_model]` as `dtype` on `device`.

        Same arguments, same sequence. `start_batch` skips that many batches without reading
        their rows (resuming a run needs the other arguments unchanged). `with_gradients` yields
        `(activations, gradients)` pairs instead, both `[batch_size, d_model]`, of the same rows
        in the same order as without.
        """
        name = self.hook_name(hook)
        if start_batch < 0:
            raise SaelabError(f"start_batch must be non-negative, not {start_batch}")
        if with_gradients:
            self._require_gradients()
        epoch = self.batch_indices(batch_size, seed, shuffle, buffer_rows, drop_last)
        indices = itertools.islice(epoch, start_batch, None)
        # Move in the store dtype (bfloat16 is half the bytes), convert on the device.
        if with_gradients:
            return (
                (self.rows(index, name).to(device).to(dtype), self.gradient_rows(index, name).to(device).to(dtype))
                for index in indices
            )
        return (self.rows(index, name).to(device).to(dtype) for index in indices)

    # ---- internals --------------------------------------------------------------------------

    def _require_gradients(self) -> None:
        if not self.has_gradients:
            raise SaelabError(
                f"{self.path} holds activations without gradients; harvest with gradients=true "
                "(into a new `out` folder) to train a gradient-aware SAE"
            )

    def _ordered_indices(self, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, self.n_rows, batch_size):
            yield torch.arange(start, min(start + batch_size, self.n_rows))

    def _shuffled_chunks(self, generator: torch.Generator, chunk_rows: int) -> Iterator[torch.Tensor]:
        """Global row indices, shard by shard in a random order, each shard's rows permuted."""
        for s in torch.randperm(len(self._manifest.shards), generator=generator).tolist():
            order = torch.randperm(self._manifest.shards[s].n_rows, generator=generator) + self._row_starts[s]
            yield from order.split(chunk_rows)

    def _check_rows(self, indices: Indices) -> torch.Tensor:
        index = torch.as_tensor(indices)
        if index.ndim == 1 and index.numel() == 0:
            return index.long()  # an empty list becomes float32 in torch
        if index.ndim != 1 or index.is_floating_point() or index.is_complex():
            raise SaelabError(f"row indices must be 1-D integers, not shape {tuple(index.shape)} {index.dtype}")
        index = index.long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.n_rows):
            bad = int(index[(index < 0) | (index >= self.n_rows)][0])
            raise StoreIndexError(f"row {bad} is out of range for {self.path}: valid rows are [0, {self.n_rows})")
        return index

    def _shard_of(self, index: torch.Tensor) -> torch.Tensor:
        # right=True: a zero-row shard shares its start with the next one and is skipped.
        return torch.searchsorted(self._row_starts, index, right=True) - 1

    def _gather(self, name: str, index: torch.Tensor, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Tensor `name` at global rows `index: [n]` → `[n, *row_shape]`, read shard by shard in sorted order."""
        out = torch.empty((len(index), *row_shape), dtype=dtype)
        order = torch.argsort(index)  # sorted reads touch each shard once, front to back
        ordered = index[order]
        shard = self._shard_of(ordered)
        shards, counts = torch.unique_consecutive(shard, return_counts=True)
        local = (ordered - self._row_starts[shard]).split(counts.tolist())
        positions = order.split(counts.tolist())
        parts = list(zip(shards.tolist(), local, positions, strict=True))

        def copy_part(part: tuple[int, torch.Tensor, torch.Tensor]) -> None:
            s, rows, where = part  # each part fills its own rows of `out`
            out[where] = self._shard(s)[name].index_select(0, rows)

        if self.read_threads > 1 and len(parts) > 1:
            list(_reader_pool(self.read_threads).map(copy_part, parts))
        else:
            for part in parts:
                copy_part(part)
        return out

    def _shard(self, s: int) -> dict[str, torch.Tensor]:
        """Shard `s`'s tensors, memory-mapped on first use and kept."""
        if s not in self._mapped:
            record = self._manifest.shards[s]
            tensors = map_shard(self.path / record.file)
            _check_shard(self.path, self._manifest, record, tensors)
            self._mapped[s] = tensors
        return self._mapped[s]


@functools.cache
def _reader_pool(threads: int) -> ThreadPoolExecutor:
    """One pool per thread count for the process's stores: a store opened per run leaves no threads behind."""
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="saelab-store-read")


def buffered_shuffle(
    chunks: Iterable[torch.Tensor], buffer_rows: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Mix a stream of chunks `[n_i, ...]` into batches `[batch_size, ...]` through a bounded buffer.

    Chunks are appended to the buffer; once it holds `buffer_rows` rows it is shuffled, batches
    are emitted until about half remains, and the rest waits to mix with later chunks. At the end
    the remainder is shuffled and emitted, the last batch possibly short. The buffer never holds
    more than `buffer_rows` plus one chunk; `buffer_rows` must be at least `2 * batch_size`.
    """
    if batch_size < 1 or buffer_rows < 2 * batch_size:
        raise SaelabError(f"need 1 <= batch_size ({batch_size}) and 2 * batch_size <= buffer_rows ({buffer_rows})")
    return _mix(chunks, buffer_rows, batch_size, generator)


def _mix(
    chunks: Iterable[torch.Tensor], buffer_rows: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    buffer: torch.Tensor | None = None
    for chunk in chunks:
        buffer = chunk if buffer is None else torch.cat([buffer, chunk])
        if len(buffer) >= buffer_rows:
            buffer = buffer[torch.randperm(len(buffer), generator=generator)]
            keep = len(buffer) - (len(buffer) - buffer_rows // 2) // batch_size * batch_size
            yield from buffer[keep:].split(batch_size)
            buffer = buffer[:keep]
    if buffer is not None and len(buffer):
        yield from buffer[torch.randperm(len(buffer), generator=generator)].split(batch_size)


def verify_shards(store: Path, records: list[ShardRecord], checksum: bool) -> None:
    """`verify_shard` for every shard, on several threads (hashlib releases the GIL: opening a store of
    many shards takes its sha256s at the disk's pace, not one core's); the first bad shard in order raises."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(lambda record: verify_shard(store, record, checksum), records):
            pass


def check_layout(store: Path, manifest: StoreManifest) -> None:
    """Shard i is `shard_file(i)` and holds whole contexts right after shard i − 1's (`context_of` and a
    resumed harvest rely on it): a record deleted or edited is an error, not a store with a silent gap."""
    end = 0
    for index, record in enumerate(manifest.shards):
        where = f"{store / MANIFEST_FILE} lists shard {record.file}"
        if record.file != shard_file(index):
            raise SaelabError(
                f"{where} as shard {index}, which should be {shard_file(index)}: a shard record is missing or "
                "out of order; the manifest is damaged (re-harvest into a new folder)"
            )
        if record.n_rows != record.n_contexts * manifest.rows_per_context:
            raise SaelabError(
                f"{where} with {record.n_rows} rows for {record.n_contexts} contexts of "
                f"{manifest.rows_per_context} rows each; the manifest is damaged (re-harvest into a new folder)"
            )
        if record.first_context != end:
            raise SaelabError(
                f"{where} from context {record.first_context}, but the shards before it end at context {end}: "
                "a shard record is missing or edited; the manifest is damaged (re-harvest into a new folder)"
            )
        end = record.first_context + record.n_contexts


def _check_no_unlisted_shards(store: Path, manifest: StoreManifest) -> None:
    """A complete store's shards are all listed (while a harvest runs, the next shard may be there first)."""
    if not manifest.complete or not (store / SHARD_DIR).is_dir():
        return
    listed = {Path(record.file).name for record in manifest.shards}
    unlisted = sorted(p.name for p in (store / SHARD_DIR).glob("shard-*") if p.name not in listed)
    if unlisted:
        raise SaelabError(
            f"{store / MANIFEST_FILE} says the store is complete but does not list {store / SHARD_DIR / unlisted[0]}: "
            "a shard record is missing; the manifest is damaged (rerun the same harvest to rebuild it)"
        )


def _check_shard(store: Path, manifest: StoreManifest, record: ShardRecord, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a SaelabError naming the shard if its tensors do not have the shapes the manifest implies."""
    row_tensors = [*manifest.hooks, *(gradient_name(hook) for hook in manifest.hooks if manifest.gradients)]
    expected = {name: ((record.n_rows, manifest.d_model), _DTYPES[manifest.dtype]) for name in row_tensors}
    expected["token_ids"] = ((record.n_rows,), torch.int32)
    expected["contexts"] = ((record.n_contexts, manifest.context_size), torch.int32)
    for name, (shape, dtype) in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise SaelabError(f"shard {store / record.file} has no tensor {name!r}; re-harvest it")
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise SaelabError(
                f"shard {store / record.file}: {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"the manifest implies {shape} {dtype}; re-harvest it"
            )
