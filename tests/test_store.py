"""ActivationStore on small synthetic stores written with the real shard and manifest code."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from saelab.errors import SaelabError
from saelab.harvest import store as store_module
from saelab.harvest.manifest import StoreManifest, gradient_name
from saelab.harvest.shards import shard_file, write_shard
from saelab.harvest.store import ActivationStore, StoreIndexError, buffered_shuffle

HOOK = "blocks.3.hook_resid_post"
OTHER_HOOK = "blocks.5.hook_resid_post"
D_MODEL = 8
CONTEXT_SIZE, FIRST_POSITION = 6, 1  # 5 rows per context
ROWS_PER_CONTEXT = CONTEXT_SIZE - FIRST_POSITION
CONTEXTS_PER_SHARD = (3, 5, 4)  # 15, 25 and 20 rows: 60 in all


@dataclass
class Source:
    """What a synthetic store was written from, concatenated over shards in store order."""

    path: Path
    activations: dict[str, torch.Tensor]  # hook -> [n_rows, d_model] in the store dtype
    gradients: dict[str, torch.Tensor]  # hook -> [n_rows, d_model]; empty for a store without gradients
    token_ids: torch.Tensor  # [n_rows]
    contexts: torch.Tensor  # [n_contexts, context_size]
    row_context: torch.Tensor  # [n_rows] the context each row was cut from
    row_shard: torch.Tensor  # [n_rows]

    @property
    def n_rows(self) -> int:
        return len(self.token_ids)


def make_store(
    path: Path,
    contexts_per_shard: tuple[int, ...] = CONTEXTS_PER_SHARD,
    dtype: str = "float32",
    hooks: tuple[str, ...] = (HOOK,),
    complete: bool = True,
    seed: int = 0,
    gradients: bool = False,
    d_model: int = D_MODEL,
    draw: Callable[[int, torch.Generator], torch.Tensor] | None = None,
) -> Source:
    """Write shards of random activations (and random tokens, and random gradients) plus a manifest listing them.

    `draw(n_rows, generator)` makes each shard's activations, [n_rows, d_model] (default: Gaussian)."""
    draw = draw or (lambda n_rows, gen: torch.randn(n_rows, d_model, generator=gen))
    gen = torch.Generator().manual_seed(seed)
    records, parts = [], []
    first = 0
    for index, n_contexts in enumerate(contexts_per_shard):
        n_rows = n_contexts * ROWS_PER_CONTEXT
        contexts = torch.randint(3, 50_000, (n_contexts, CONTEXT_SIZE), generator=gen, dtype=torch.int32)
        tensors = {hook: draw(n_rows, gen).to(getattr(torch, dtype)) for hook in hooks}
        if gradients:
            for hook in hooks:
                tensors[gradient_name(hook)] = torch.randn(n_rows, d_model, generator=gen).to(getattr(torch, dtype))
        tensors["token_ids"] = contexts[:, FIRST_POSITION:].reshape(-1)
        tensors["contexts"] = contexts
        records.append(write_shard(path, index, first, n_contexts, tensors))
        context_of_row = first + torch.arange(n_contexts).repeat_interleave(ROWS_PER_CONTEXT)
        parts.append((tensors, context_of_row, torch.full((n_rows,), index)))
        first += n_contexts
    manifest = StoreManifest(
        config={},
        model="test-model",
        hooks=list(hooks),
        d_model=d_model,
        dtype=dtype,
        context_size=CONTEXT_SIZE,
        first_position=FIRST_POSITION,
        n_contexts_planned=first,
        tokenizer={},
        corpus={},
        versions={},
        shards=records,
        complete=complete,
        gradients=gradients,
    )
    manifest.save(path)
    return Source(
        path=path,
        activations={hook: torch.cat([tensors[hook] for tensors, _, _ in parts]) for hook in hooks},
        gradients={
            hook: torch.cat([tensors[gradient_name(hook)] for tensors, _, _ in parts]) for hook in hooks if gradients
        },
        token_ids=torch.cat([tensors["token_ids"] for tensors, _, _ in parts]),
        contexts=torch.cat([tensors["contexts"] for tensors, _, _ in parts]),
        row_context=torch.cat([context for _, context, _ in parts]),
        row_shard=torch.cat([shard for _, _, shard in parts]),
    )


def row_ids(batch: torch.Tensor, activations: torch.Tensor) -> list[int]:
    """Identify each batch row by its exact bytes (random rows are unique); unknown rows raise KeyError."""
    index = {row.tobytes(): i for i, row in enumerate(activations.float().numpy())}
    return [index[row.tobytes()] for row in batch.float().numpy()]


def epoch_ids(store: ActivationStore, source: Source, **kwargs) -> list[list[int]]:
    return [row_ids(batch, source.activations[HOOK]) for batch in store.batches(**kwargs)]


@pytest.fixture(params=["float32", "bfloat16"])
def source(request, tmp_path) -> Source:
    return make_store(tmp_path, dtype=request.param)


# ---- what the store holds ----------------------------------------------------------------------


def test_properties_come_from_the_manifest(tmp_path):
    make_store(tmp_path, dtype="bfloat16", hooks=(HOOK, OTHER_HOOK), complete=False)
    store = ActivationStore(tmp_path)
    assert store.hooks == [HOOK, OTHER_HOOK]
    assert (store.d_model, store.dtype, store.context_size) == (D_MODEL, torch.bfloat16, CONTEXT_SIZE)
    assert (store.n_rows, store.n_contexts, store.complete) == (60, 12, False)
    assert store.manifest.shards[1].file == shard_file(1)


def test_hook_name_resolves_the_only_hook(source):
    assert ActivationStore(source.path).hook_name(None) == HOOK


def test_unknown_hook_lists_the_hooks(tmp_path):
    make_store(tmp_path, hooks=(HOOK, OTHER_HOOK))
    store = ActivationStore(tmp_path)
    for hook in ("blocks.4.hook_resid_post", None):
        with pytest.raises(SaelabError, match="hooks") as error:
            store.rows([0], hook=hook)
        assert HOOK in str(error.value) and OTHER_HOOK in str(error.value)
    with pytest.raises(SaelabError, match="blocks.9.hook_resid_post"):
        store.batches(4, hook="blocks.9.hook_resid_post")  # raised on the call, not on the first batch


# ---- random access -----------------------------------------------------------------------------


@pytest.mark.parametrize("read_threads", [1, 3])
def test_rows_match_the_source_across_shard_boundaries(source, read_threads):
    store = ActivationStore(source.path, read_threads=read_threads)
    boundaries = torch.tensor([0, 14, 15, 16, 39, 40, 41, 59])
    indices = torch.cat([torch.randint(0, 60, (50,), generator=torch.Generator().manual_seed(1)), boundaries])
    got = store.rows(indices)
    assert got.dtype == store.dtype and got.shape == (len(indices), D_MODEL)
    assert torch.equal(got, source.activations[HOOK][indices])
    assert torch.equal(store.rows(indices.tolist()), got)  # plain lists work too
    assert store.rows([]).shape == (0, D_MODEL)


def test_rows_of_each_hook(tmp_path):
    source = make_store(tmp_path, hooks=(HOOK, OTHER_HOOK))
    store = ActivationStore(tmp_path)
    indices = torch.randperm(60, generator=torch.Generator().manual_seed(2))
    for hook in (HOOK, OTHER_HOOK):
        assert torch.equal(store.rows(indices, hook=hook), source.activations[hook][indices])


def test_token_ids_and_contexts_match_the_source(source):
    store = ActivationStore(source.path)
    indices = torch.randperm(60, generator=torch.Generator().manual_seed(3))
    token_ids = store.token_ids(indices)
    assert token_ids.dtype == torch.int64
    assert torch.equal(token_ids, source.token_ids[indices].long())
    context, position = store.context_of(indices)
    assert torch.equal(context, source.row_context[indices])
    assert set(position.tolist()) == set(range(FIRST_POSITION, CONTEXT_SIZE))
    for row, c, p in zip(indices.tolist(), context.tolist(), position.tolist(), strict=True):
        tokens = store.context_tokens(c)
        assert tokens.shape == (CONTEXT_SIZE,) and torch.equal(tokens, source.contexts[c].long())
        assert tokens[p] == source.token_ids[row]


def test_context_rows_are_each_contexts_rows_in_position_order(source):
    store = ActivationStore(source.path)
    n_contexts = int(source.row_context.max()) + 1
    for c in range(n_contexts):  # across shard boundaries
        rows = store.context_rows(c)
        context, position = store.context_of(rows)
        assert (context == c).all() and position.tolist() == list(range(FIRST_POSITION, CONTEXT_SIZE))
    with pytest.raises(StoreIndexError, match=f"context {n_contexts} is not in"):
        store.context_rows(n_contexts)


@pytest.mark.parametrize("bad", [60, -1, 10**9])
def test_out_of_range_rows_name_the_valid_range(source, bad):
    store = ActivationStore(source.path)
    for read in (store.rows, store.token_ids, store.context_of):
        with pytest.raises(StoreIndexError, match=r"\[0, 60\)") as error:
            read([0, bad, 1])
        assert isinstance(error.value, IndexError) and isinstance(error.value, SaelabError)
    with pytest.raises(StoreIndexError, match=r"\[0, 12\)"):
        store.context_tokens(12 if bad > 0 else -1)


def test_float_indices_are_refused(source):
    with pytest.raises(SaelabError, match="integers"):
        ActivationStore(source.path).rows(torch.tensor([1.0, 2.0]))


def test_shards_are_mapped_lazily_and_once(source, monkeypatch):
    mapped = []
    original = store_module.map_shard
    monkeypatch.setattr(store_module, "map_shard", lambda path: mapped.append(path.name) or original(path))
    store = ActivationStore(source.path)
    assert mapped == []
    store.rows([0, 3])
    store.token_ids([1])
    assert mapped == ["shard-000000.safetensors"]
    store.rows(torch.arange(60))
    assert sorted(mapped) == [f"shard-00000{i}.safetensors" for i in range(3)]


# ---- batches -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch_size", "buffer_rows"), [(8, 16), (7, 20), (5, 2**18)])
def test_shuffled_epoch_has_every_row_once(source, batch_size, buffer_rows):
    store = ActivationStore(source.path)
    ids = epoch_ids(store, source, batch_size=batch_size, buffer_rows=buffer_rows, drop_last=False)
    assert all(len(batch) == batch_size for batch in ids[:-1]) and 0 < len(ids[-1]) <= batch_size
    flat = [i for batch in ids for i in batch]
    assert sorted(flat) == list(range(60))
    assert flat != sorted(flat)  # and it is shuffled


def test_drop_last_leaves_out_only_the_short_batch(source):
    store = ActivationStore(source.path)
    ids = epoch_ids(store, source, batch_size=8, buffer_rows=16)
    assert [len(batch) for batch in ids] == [8] * 7
    assert len({i for batch in ids for i in batch}) == 56
    assert store.n_batches(8) == 7 and store.n_batches(8, drop_last=False) == 8 and store.n_batches(5) == 12


def test_unshuffled_batches_are_in_store_order(source):
    store = ActivationStore(source.path)
    batches = list(store.batches(7, shuffle=False, drop_last=False, dtype=store.dtype))
    assert [len(b) for b in batches] == [7] * 8 + [4]
    assert torch.equal(torch.cat(batches), source.activations[HOOK])
    assert len(list(store.batches(7, shuffle=False))) == 8


def test_same_seed_same_batches_other_seed_other_batches(source):
    store = ActivationStore(source.path)
    kwargs = dict(batch_size=8, buffer_rows=16)
    first = torch.cat(list(store.batches(seed=5, **kwargs)))
    assert torch.equal(first, torch.cat(list(ActivationStore(source.path).batches(seed=5, **kwargs))))
    assert not torch.equal(first, torch.cat(list(store.batches(seed=6, **kwargs))))


@pytest.mark.parametrize("seed", range(10))
def test_first_batch_mixes_shards(tmp_path, seed):
    # Shards of 50, 60 and 45 rows; a 64-row buffer fills from the first shard and part of another.
    source = make_store(tmp_path, contexts_per_shard=(10, 12, 9))
    store = ActivationStore(tmp_path)
    first = next(iter(store.batches(16, seed=seed, buffer_rows=64)))
    shards = source.row_shard[row_ids(first, source.activations[HOOK])]
    assert len(set(shards.tolist())) >= 2


def test_seed_picks_which_shard_is_read_first(tmp_path):
    # Shards of 50, 60 and 45 rows and a 32-row buffer: the first batch comes from the first shard read.
    source = make_store(tmp_path, contexts_per_shard=(10, 12, 9))
    store = ActivationStore(tmp_path)
    first_shards = set()
    for seed in range(10):
        first = next(iter(store.batches(8, seed=seed, buffer_rows=32)))
        first_shards |= set(source.row_shard[row_ids(first, source.activations[HOOK])].tolist())
    assert first_shards == {0, 1, 2}


def test_batches_convert_dtype(tmp_path):
    source = make_store(tmp_path, dtype="bfloat16")
    store = ActivationStore(tmp_path)
    as_float = next(iter(store.batches(8, shuffle=False)))
    as_bf16 = next(iter(store.batches(8, shuffle=False, dtype=torch.bfloat16)))
    assert as_float.dtype == torch.float32 and as_bf16.dtype == torch.bfloat16
    assert torch.equal(as_float, source.activations[HOOK][:8].float())
    assert torch.equal(as_bf16, source.activations[HOOK][:8])


def test_start_batch_resumes_without_reading_skipped_batches(source, monkeypatch):
    store = ActivationStore(source.path)
    kwargs = dict(batch_size=6, seed=11, buffer_rows=12, drop_last=False)
    full = list(store.batches(**kwargs))
    reads = []
    original = store.rows
    monkeypatch.setattr(store, "rows", lambda index, hook=None: reads.append(len(index)) or original(index, hook))
    tail = list(store.batches(start_batch=4, **kwargs))
    assert len(full) == 10 and len(tail) == 6 and len(reads) == 6
    assert all(torch.equal(a, b) for a, b in zip(full[4:], tail, strict=True))
    assert list(store.batches(start_batch=10, **kwargs)) == []


def test_store_reads_at_most_one_buffer_ahead(source, monkeypatch):
    store = ActivationStore(source.path)
    pulled = 0
    original = store._shuffled_chunks

    def counting(generator, chunk_rows):
        nonlocal pulled
        for chunk in original(generator, chunk_rows):
            pulled += len(chunk)
            yield chunk

    monkeypatch.setattr(store, "_shuffled_chunks", counting)
    emitted = 0
    for batch in store.batches(4, buffer_rows=16, drop_last=False):
        emitted += len(batch)
        assert pulled - emitted < 16 + 16 // 4  # buffer_rows plus one chunk
    assert pulled == emitted == 60


@pytest.mark.parametrize(("buffer_rows", "batch_size", "chunk_rows"), [(16, 4, 5), (10, 5, 9), (12, 3, 1)])
def test_buffered_shuffle_holds_at_most_buffer_plus_chunk(buffer_rows, batch_size, chunk_rows):
    items = torch.arange(200)
    pulled = 0

    def chunks():
        nonlocal pulled
        for chunk in items.split(chunk_rows):
            pulled += len(chunk)
            yield chunk

    emitted, out = 0, []
    for batch in buffered_shuffle(chunks(), buffer_rows, batch_size, torch.Generator().manual_seed(0)):
        emitted += len(batch)
        assert pulled - emitted <= buffer_rows + chunk_rows - batch_size
        out.append(batch)
    assert torch.equal(torch.cat(out).sort().values, items)
    assert all(len(batch) == batch_size for batch in out[:-1])


def test_buffer_smaller_than_two_batches_is_refused(source):
    with pytest.raises(SaelabError, match="buffer_rows"):
        ActivationStore(source.path).batches(8, buffer_rows=15)


# ---- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gradient_rows_match_the_source(tmp_path, dtype):
    source = make_store(tmp_path, dtype=dtype, hooks=(HOOK, OTHER_HOOK), gradients=True)
    store = ActivationStore(tmp_path)
    assert store.has_gradients
    indices = torch.cat([torch.randperm(60, generator=torch.Generator().manual_seed(4)), torch.tensor([14, 15, 40])])
    for hook in (HOOK, OTHER_HOOK):
        got = store.gradient_rows(indices, hook=hook)
        assert got.dtype == store.dtype and torch.equal(got, source.gradients[hook][indices])
        assert torch.equal(store.rows(indices, hook=hook), source.activations[hook][indices])


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_with_gradients_pair_the_same_rows_in_the_same_order(tmp_path, shuffle):
    source = make_store(tmp_path, dtype="bfloat16", gradients=True)
    store = ActivationStore(tmp_path)
    kwargs = dict(batch_size=7, seed=3, shuffle=shuffle, buffer_rows=14, drop_last=False)
    plain = list(store.batches(**kwargs))
    pairs = list(store.batches(with_gradients=True, **kwargs))
    assert len(pairs) == len(plain) == 9
    for activations, (paired, gradients) in zip(plain, pairs, strict=True):
        assert paired.dtype == gradients.dtype == torch.float32 and gradients.shape == activations.shape
        assert torch.equal(paired, activations)
        assert torch.equal(gradients, source.gradients[HOOK][row_ids(activations, source.activations[HOOK])].float())
    tail = list(store.batches(with_gradients=True, start_batch=5, dtype=torch.bfloat16, **kwargs))
    assert len(tail) == 4 and all(g.dtype == torch.bfloat16 for _, g in tail)
    assert all(torch.equal(g.float(), full) for (_, g), (_, full) in zip(tail, pairs[5:], strict=True))


def test_a_store_without_gradients_says_how_to_get_them(source):
    store = ActivationStore(source.path)
    assert not store.has_gradients and not store.manifest.gradients
    with pytest.raises(SaelabError, match="gradients=true"):
        store.batches(8, with_gradients=True)  # raised on the call, not on the first batch
    with pytest.raises(SaelabError, match="gradients=true"):
        store.gradient_rows([0])
    assert len(list(store.batches(8, with_gradients=False))) == 7


def test_shard_missing_its_gradients_is_named_on_first_read(tmp_path):
    make_store(tmp_path)
    manifest = ActivationStore(tmp_path).manifest
    manifest.gradients = True
    manifest.save(tmp_path)
    store = ActivationStore(tmp_path)
    with pytest.raises(SaelabError, match=rf"shard-000000\.safetensors.*{HOOK}\.grad"):
        store.rows([0])


# ---- damaged and unfinished stores -------------------------------------------------------------


def test_flipped_byte_fails_the_checksum_naming_the_shard(source):
    path = source.path / shard_file(1)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match="sha256") as error:
        ActivationStore(source.path)
    assert "shard-000001.safetensors" in str(error.value)
    ActivationStore(source.path, verify=False)  # sizes still match: only the checksum sees it


def test_of_several_bad_shards_the_first_is_named(source):
    """Shards are checked on several threads; the error is still the first bad shard's, as one thread gave."""
    for index in (2, 1):
        path = source.path / shard_file(index)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x40
        path.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match="shard-000001.safetensors"):
        ActivationStore(source.path)


def test_truncated_shard_is_named_even_without_verify(source):
    path = source.path / shard_file(2)
    path.write_bytes(path.read_bytes()[:-10])
    for verify in (True, False):
        with pytest.raises(SaelabError, match="shard-000002.safetensors"):
            ActivationStore(source.path, verify=verify)


def test_shard_missing_a_hook_is_named_on_first_read(tmp_path):
    make_store(tmp_path)
    manifest = ActivationStore(tmp_path).manifest
    manifest.hooks.append(OTHER_HOOK)
    manifest.save(tmp_path)
    store = ActivationStore(tmp_path)
    with pytest.raises(SaelabError, match=rf"shard-000000\.safetensors.*{OTHER_HOOK}"):
        store.rows([0], hook=OTHER_HOOK)


def test_manifest_rows_disagreeing_with_contexts_is_refused(tmp_path):
    make_store(tmp_path)
    manifest = ActivationStore(tmp_path).manifest
    manifest.shards[1].n_rows -= 1
    manifest.save(tmp_path)
    with pytest.raises(SaelabError, match="shard-000001.safetensors"):
        ActivationStore(tmp_path)


def test_incomplete_store_reads_its_listed_shards(tmp_path):
    source = make_store(tmp_path, complete=False)
    (tmp_path / shard_file(3)).write_bytes(b"half-written shard the manifest does not list")
    store = ActivationStore(tmp_path)
    assert not store.complete and store.n_rows == 60
    assert torch.equal(store.rows(torch.arange(60)), source.activations[HOOK])
    assert sorted(i for batch in epoch_ids(store, source, batch_size=8, drop_last=False) for i in batch) == list(
        range(60)
    )
