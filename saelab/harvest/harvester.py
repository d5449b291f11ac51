"""Run a language model over a corpus and write its activations at chosen hooks to a sharded store.

The harvest is deterministic and resumable: contexts are numbered in corpus order, shard `i`
holds contexts `[i·S, (i+1)·S)`, and the manifest lists a shard only after the shard is safely on
disk. A rerun of the same command after a kill skips the listed shards, deletes anything unlisted,
and ends with the store an uninterrupted run would make. `batch_size` and `device` say how the
model runs, not what a shard holds (contexts are whole and unpadded, so a batch's rows do not see
each other), and a rerun may change them.

Under `torchrun` (several ranks) shard `i` is harvested by rank `i mod world_size`: every rank reads
and tokenises the corpus and skips the contexts it does not own. Each rank lists its finished
shards in its own partial manifest (`rank_manifests.py`); rank 0 holds the folder lock, and once
every rank has finished it merges the lists into `manifest.json` in context order. The shards are
the ones a single process would write, under the same names, so the store is the same store.

With `gradients`, every batch runs the whole model and back: the shard also holds, for each hook,
`<hook>.grad` = ∂L/∂x at that hook, where L is `GRADIENT_LOSS` (`activations.py`).
"""

from __future__ import annotations

import math
import platform
import sys
from collections import deque
from contextlib import ExitStack
from importlib.metadata import version
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

import saelab
from saelab import distributed
from saelab.atomic import DiskFullError, remove_stale_temporaries, removed_on_failure, size_text
from saelab.config import config_changes, config_identity
from saelab.errors import SaelabError
from saelab.harvest.activations import shard_tensors
from saelab.harvest.config import HarvestConfig
from saelab.harvest.corpus import describe_corpus, iter_documents
from saelab.harvest.manifest import MANIFEST_FILE, ShardRecord, StoreManifest, read_manifest
from saelab.harvest.packing import iter_contexts
from saelab.harvest.rank_manifests import (
    RANK_DIR,
    all_rank_shards,
    rank_manifest_path,
    read_rank_shards,
    save_rank_shards,
)
from saelab.harvest.shards import SHARD_DIR, verify_shard, write_shard
from saelab.harvest.store import check_layout
from saelab.locking import LOCK_FILE, folder_lock
from saelab.models import HookPoint, load_model, parse_hook
from saelab.models.gradients import GRADIENT_LOSS

# Settings that do not change what a store contains; everything else must match to resume.
_NOT_IDENTITY = ("out", "device", "batch_size")


def harvest(cfg: HarvestConfig, model: TransformerBridge | None = None, progress: bool = True) -> StoreManifest:
    """Harvest (or finish harvesting) the store `cfg.out`; returns its complete manifest.

    Under `torchrun` every rank calls this; each harvests its share of the shards (module docstring).
    """
    cfg.validate()
    out = Path(cfg.out)
    distributed.init_from_environment()
    if distributed.is_distributed() or (out / RANK_DIR).is_dir():
        return _harvest_by_ranks(cfg, model, progress)
    created = not out.exists()
    with folder_lock(out, what="harvest"), removed_on_failure(out, created, _has_shards):
        model = model if model is not None else load_model(cfg.model, cfg.device)
        hooks = [parse_hook(name, model.cfg.n_layers) for name in cfg.hooks]
        manifest = _open_or_create_manifest(out, cfg, model)
        _remove_unlisted_shards(out, manifest)
        _write_remaining_shards(out, cfg, model, hooks, manifest, progress)
        if manifest.n_contexts == 0:
            raise SaelabError(
                f"the corpus yields no full context of {cfg.context_size} tokens; add text or lower context_size"
            )
        manifest.complete = True
        manifest.save(out)
    return manifest


def _write_remaining_shards(
    out: Path,
    cfg: HarvestConfig,
    model: TransformerBridge,
    hooks: list[HookPoint],
    manifest: StoreManifest,
    progress: bool,
) -> None:
    contexts = iter_contexts(iter_documents(cfg.corpus), model.tokenizer, cfg.context_size, cfg.prepend_bos)
    remaining = islice(contexts, manifest.n_contexts, manifest.n_contexts_planned)
    bar = tqdm(
        total=manifest.n_contexts_planned * manifest.rows_per_context,
        initial=manifest.n_rows,
        unit="tok",
        unit_scale=True,
        desc=f"harvest {', '.join(cfg.hooks)}{' + gradients' if cfg.gradients else ''}",
        disable=not progress,
    )
    with bar:  # with gradients, `forward_with_gradients` freezes the weights for each batch
        while chunk := list(islice(remaining, cfg.shard_contexts)):
            first_context = manifest.n_contexts
            tensors = shard_tensors(model, torch.tensor(chunk, dtype=torch.long), hooks, cfg, manifest, bar)
            record = _write_shard(out, len(manifest.shards), first_context, len(chunk), tensors, manifest)
            manifest.shards.append(record)
            manifest.save(out)


def _write_shard(
    out: Path,
    index: int,
    first_context: int,
    n_contexts: int,
    tensors: dict[str, torch.Tensor],
    manifest: StoreManifest,
    world_size: int = 1,
) -> ShardRecord:
    """`write_shard`, whose full-disk error also says about how much the rest of the store (this
    process's share of it) needs, so one cleanup frees enough for the whole harvest."""
    try:
        return write_shard(out, index, first_context, n_contexts, tensors)
    except DiskFullError as error:
        shard_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
        remaining = manifest.n_contexts_planned - first_context  # this shard's contexts and every later one
        rest = shard_bytes * remaining / n_contexts / world_size
        share = " (this rank's share)" if world_size > 1 else ""
        raise DiskFullError(
            error.path,
            f"{size_text(shard_bytes)} needed for this shard, about {size_text(int(rest))} for the "
            f"{remaining:,} contexts still to harvest{share}",
        ) from error


def _identity(cfg: HarvestConfig) -> dict[str, Any]:
    return config_identity(cfg, ignore=_NOT_IDENTITY)


def _open_or_create_manifest(out: Path, cfg: HarvestConfig, model: TransformerBridge) -> StoreManifest:
    if (out / MANIFEST_FILE).exists():
        manifest = read_manifest(out)
        check_layout(out, manifest)  # a record deleted from the manifest must not make a shard be overwritten
        if not manifest.complete:  # damage found now, before shards are appended, not later by training
            for record in manifest.shards:
                verify_shard(out, record)
        # Keys added to HarvestConfig since the store was made read as their defaults.
        _check_same_config(out, {**_identity(HarvestConfig()), **manifest.config}, _identity(cfg))
        return manifest
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (LOCK_FILE, SHARD_DIR, RANK_DIR))
    if foreign:
        raise SaelabError(
            f"{out} already holds {', '.join(foreign[:3])}{'…' if len(foreign) > 3 else ''} and is not an activation "
            "store; choose an empty or new `out` folder"
        )
    manifest = _new_manifest(cfg, model)
    manifest.save(out)
    return manifest


def _check_same_config(out: Path, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    if changed := config_changes(stored, wanted):
        raise SaelabError(
            f"{out} was harvested with a different config ({'; '.join(changed)}); "
            "rerun with the original settings to resume, or harvest into a new `out` folder"
        )


def _new_manifest(cfg: HarvestConfig, model: TransformerBridge) -> StoreManifest:
    first_position = cfg.stored_from
    tokenizer = model.tokenizer
    return StoreManifest(
        config=_identity(cfg),
        model=cfg.model,
        hooks=list(cfg.hooks),
        d_model=model.cfg.d_model,
        dtype=cfg.dtype,
        context_size=cfg.context_size,
        first_position=first_position,
        n_contexts_planned=math.ceil(cfg.n_tokens / (cfg.context_size - first_position)),
        tokenizer={
            "name_or_path": str(tokenizer.name_or_path),
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "vocab_size": len(tokenizer),
        },
        corpus=describe_corpus(cfg.corpus),
        gradients=cfg.gradients,
        gradient_loss=GRADIENT_LOSS if cfg.gradients else None,
        versions={
            **{package: version(package) for package in ("torch", "transformer-lens", "transformers")},
            "saelab": saelab.__version__,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    )


def _has_shards(out: Path) -> bool:
    return any((out / SHARD_DIR).glob("shard-*")) if (out / SHARD_DIR).is_dir() else False


def _remove_unlisted_shards(out: Path, manifest: StoreManifest) -> None:
    """Delete shards a killed run wrote after its last manifest update; they are recomputed identically."""
    shard_dir = out / SHARD_DIR
    if not shard_dir.is_dir():
        return
    remove_stale_temporaries(shard_dir)
    listed = {Path(record.file).name for record in manifest.shards}
    for path in shard_dir.iterdir():
        if path.name not in listed:
            path.unlink()


# ---- several ranks ----------------------------------------------------------------------------


def _harvest_by_ranks(cfg: HarvestConfig, model: TransformerBridge | None, progress: bool) -> StoreManifest:
    """The harvest as one rank of a job (also a single process finishing a store that ranks began)."""
    out, rank, world_size = Path(cfg.out), distributed.rank(), distributed.world_size()
    with ExitStack() as lock:
        # Rank 0 holds the folder lock for the whole job: its ranks share it, a second job is refused.
        distributed.run_on_main(lambda: lock.enter_context(folder_lock(out, what="harvest")), "locking the store")
        model = model if model is not None else load_model(cfg.model, distributed.device_for(cfg.device))
        hooks = [parse_hook(name, model.cfg.n_layers) for name in cfg.hooks]
        manifest = distributed.run_on_main(lambda: _prepare_rank_store(out, cfg, model), "opening the store")
        error = None
        try:
            _write_rank_shards(out, cfg, model, hooks, manifest, rank, world_size, progress)
        except SaelabError as raised:  # e.g. a full disk on one rank: every rank stops with its message
            error = raised
        distributed.agree_on_error(error, "comparing the ranks' results")
        distributed.barrier("waiting for every rank to finish its shards")
        return distributed.run_on_main(lambda: _merge_rank_shards(out, manifest, world_size), "merging the manifest")


def _prepare_rank_store(out: Path, cfg: HarvestConfig, model: TransformerBridge) -> StoreManifest:
    """Rank 0, before any rank writes: open or create the manifest; delete shards no manifest lists."""
    manifest = _open_or_create_manifest(out, cfg, model)
    (out / RANK_DIR).mkdir(exist_ok=True)
    remove_stale_temporaries(out / RANK_DIR)
    listed = {record.file: record for record in manifest.shards}
    listed.update(all_rank_shards(out))
    manifest.shards = sorted(listed.values(), key=lambda record: record.first_context)
    _remove_unlisted_shards(out, manifest)
    return manifest


def _write_rank_shards(
    out: Path,
    cfg: HarvestConfig,
    model: TransformerBridge,
    hooks: list[HookPoint],
    manifest: StoreManifest,
    rank: int,
    world_size: int,
    progress: bool,
) -> None:
    """Harvest the shards `i ≡ rank (mod world_size)` that no rank has finished, in context order."""
    size = cfg.shard_contexts
    done = {record.first_context // size for record in manifest.shards}
    n_shards = math.ceil(manifest.n_contexts_planned / size)
    mine = [i for i in range(rank, n_shards, world_size) if i not in done]
    own_path = rank_manifest_path(out, rank)
    finished = read_rank_shards(own_path) if own_path.exists() else []
    contexts = iter_contexts(iter_documents(cfg.corpus), model.tokenizer, cfg.context_size, cfg.prepend_bos)
    planned_rows = sum(min(size, manifest.n_contexts_planned - i * size) for i in mine) * manifest.rows_per_context
    bar = tqdm(
        total=planned_rows,
        unit="tok",
        unit_scale=True,
        desc=f"harvest rank {rank}/{world_size} {', '.join(cfg.hooks)}",
        disable=not progress or rank != 0,
    )
    position = 0  # contexts read from `contexts` so far
    with bar:  # with gradients, `forward_with_gradients` freezes the weights for each batch
        for i in mine:
            first = i * size
            deque(islice(contexts, first - position), maxlen=0)  # another rank's contexts: skip them
            chunk = list(islice(contexts, min(size, manifest.n_contexts_planned - first)))
            position = first + len(chunk)
            if not chunk:  # the corpus ended before this shard
                break
            tensors = shard_tensors(model, torch.tensor(chunk, dtype=torch.long), hooks, cfg, manifest, bar)
            finished.append(_write_shard(out, i, first, len(chunk), tensors, manifest, world_size))
            save_rank_shards(out, rank, world_size, finished)


def _merge_rank_shards(out: Path, manifest: StoreManifest, world_size: int) -> StoreManifest:
    """Rank 0, after every rank finished: list every shard in context order, mark complete, drop `ranks/`."""
    listed = {record.file: record for record in manifest.shards}
    from_ranks = all_rank_shards(out)
    if manifest.complete and not from_ranks.keys() - listed.keys():  # a rerun of a finished store
        (out / RANK_DIR).rmdir()
        return manifest
    listed.update(from_ranks)
    shards = sorted(listed.values(), key=lambda record: record.first_context)
    expected_first = 0
    for record in shards:
        if record.first_context != expected_first:
            raise SaelabError(
                f"{out}: no rank listed the shard of contexts from {expected_first}; rerun the same command"
            )
        verify_shard(out, record, checksum=False)
        expected_first += record.n_contexts
    manifest.shards = shards
    if manifest.n_contexts == 0:
        raise SaelabError(
            f"the corpus yields no full context of {manifest.context_size} tokens; add text or lower context_size"
        )
    manifest.ranks = {
        "world_size": world_size,
        "assignment": "shard i (contexts [i·shard_contexts, (i+1)·shard_contexts)) harvested by rank i mod world_size",
        "row_order": "shards are listed in context order, so rows are in the order a single-process harvest gives",
    }
    manifest.complete = True
    manifest.save(out)
    for path in (out / RANK_DIR).glob("*"):
        path.unlink()
    (out / RANK_DIR).rmdir()
    return manifest
