"""Harvesting ∂L/∂x beside the activations (for gradient-aware SAEs), on the real SmolLM2.

The reference is computed independently of the bridge and its hooks: the Hugging Face model's own
`hidden_states[L + 1]` (the residual stream after block L) and `torch.autograd.grad` of the
summed next-token cross-entropy with respect to it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from saelab.errors import SaelabError
from saelab.harvest.config import HarvestConfig
from saelab.harvest.harvester import harvest
from saelab.harvest.manifest import gradient_name, read_manifest
from saelab.harvest.shards import map_shard
from saelab.harvest.store import ActivationStore
from saelab.models.gradients import GRADIENT_LOSS

EARLY, LATE = 3, 15
HOOKS = [f"blocks.{EARLY}.hook_resid_post", f"blocks.{LATE}.hook_resid_post"]
CONTEXT_SIZE = 16
ROWS = CONTEXT_SIZE - 1  # position 0 (BOS) is not stored


def gradient_config(out: Path, **overrides) -> HarvestConfig:
    """12 contexts of 16 tokens in 3 shards of 4, batches of 2: a few seconds on the real model."""
    values = dict(
        out=str(out),
        hooks=HOOKS,
        gradients=True,
        n_tokens=ROWS * 12,
        context_size=CONTEXT_SIZE,
        batch_size=2,
        shard_contexts=4,
        device="cpu",
    )
    values.update(overrides)
    return HarvestConfig(**values)


def store_digest(store: Path) -> list[tuple[str, str]]:
    return [(shard.file, shard.sha256) for shard in read_manifest(store).shards]


def shards(store: Path) -> list[dict[str, torch.Tensor]]:
    return [map_shard(store / record.file) for record in read_manifest(store).shards]


def reference_gradients(hf_model, contexts: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """∂L/∂(residual stream after block L) for each layer, `[n_contexts, context_size, d_model]`."""
    out = hf_model(contexts, output_hidden_states=True)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), contexts[:, 1:].flatten(), reduction="sum")
    # autograd.grad, not backward(): the shared model's parameters must not collect .grad here either.
    grads = torch.autograd.grad(loss, [out.hidden_states[layer + 1] for layer in layers])
    return dict(zip(layers, grads, strict=True))


@pytest.fixture(scope="module")
def gradient_store(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gradients") / "store"
    harvest(gradient_config(out), model=smollm2, progress=False)
    return out


@pytest.fixture(scope="module")
def plain_store(smollm2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "store"
    harvest(gradient_config(out, gradients=False), model=smollm2, progress=False)
    return out


def test_manifest_records_the_gradients_and_their_loss(gradient_store):
    manifest = read_manifest(gradient_store)
    assert manifest.complete and manifest.gradients and manifest.gradient_loss == GRADIENT_LOSS
    assert manifest.config["gradients"] is True and "summed loss" in manifest.gradient_loss
    shard = shards(gradient_store)[0]
    for hook in HOOKS:
        assert shard[gradient_name(hook)].shape == (4 * ROWS, 576) and shard[gradient_name(hook)].dtype == torch.float32


def test_gradients_at_both_hooks_equal_an_independent_reference(smollm2, gradient_store):
    for shard in shards(gradient_store):
        contexts = shard["contexts"].long()
        expected = reference_gradients(smollm2.original_model, contexts, [EARLY, LATE])
        for layer, hook in zip((EARLY, LATE), HOOKS, strict=True):
            want = expected[layer][:, 1:].reshape(-1, 576)
            got = shard[gradient_name(hook)]
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
        # Every path from block 3 to the logits runs through block 15's output: had the harvest
        # cut the graph at the later hook, the earlier hook's gradient would be all zero.
        assert shard[gradient_name(HOOKS[0])].abs().sum() > 0


def test_a_later_hook_does_not_change_the_earlier_hooks_gradient(smollm2, gradient_store, tmp_path):
    cfg = gradient_config(tmp_path / "store", hooks=HOOKS[:1], n_tokens=ROWS * 4, dtype="bfloat16")
    harvest(cfg, model=smollm2, progress=False)
    alone = shards(tmp_path / "store")[0][gradient_name(HOOKS[0])]
    together = shards(gradient_store)[0][gradient_name(HOOKS[0])]
    assert alone.dtype == torch.bfloat16 and torch.equal(alone, together.to(torch.bfloat16))


def test_activations_are_exactly_the_no_gradient_harvests(gradient_store, plain_store):
    assert not read_manifest(plain_store).gradients
    for with_grads, plain in zip(shards(gradient_store), shards(plain_store), strict=True):
        assert set(with_grads) == set(plain) | {gradient_name(hook) for hook in HOOKS}
        for name in (*HOOKS, "token_ids", "contexts"):
            assert torch.equal(with_grads[name], plain[name]), name


def test_only_the_last_position_has_zero_gradient(gradient_store):
    # The last position predicts nothing inside its context, and no other position attends to it.
    store = ActivationStore(gradient_store)
    rows = torch.arange(store.n_rows)
    _, position = store.context_of(rows)
    last = position == CONTEXT_SIZE - 1
    for hook in HOOKS:
        norms = store.gradient_rows(rows, hook).norm(dim=-1)
        assert int(last.sum()) == 12 and (norms[last] == 0).all()
        assert (norms[~last] > 0).all()


def test_a_resumed_gradient_harvest_is_byte_identical(smollm2, gradient_store, tmp_path):
    store = tmp_path / "store"
    shutil.copytree(gradient_store, store)
    # Fake a kill after shard 1 was renamed into place but before the manifest listed it.
    raw = json.loads((store / "manifest.json").read_text())
    raw["shards"], raw["complete"] = raw["shards"][:1], False
    (store / "manifest.json").write_text(json.dumps(raw))
    (store / "shards" / "shard-000001.safetensors").write_bytes(b"half a shard")
    (store / "shards" / "shard-000002.safetensors").unlink()
    harvest(gradient_config(store), model=smollm2, progress=False)
    assert store_digest(store) == store_digest(gradient_store) and len(store_digest(store)) == 3


def test_store_yields_activation_gradient_pairs_of_the_same_rows(gradient_store):
    store = ActivationStore(gradient_store)
    assert store.has_gradients
    kwargs = dict(batch_size=16, hook=HOOKS[1], seed=7, buffer_rows=64)
    indices = list(store.batch_indices(16, seed=7, buffer_rows=64))
    pairs = list(store.batches(with_gradients=True, **kwargs))
    plain = list(store.batches(**kwargs))
    assert len(pairs) == len(plain) == len(indices) == 12 * ROWS // 16
    for index, (activations, gradients), alone in zip(indices, pairs, plain, strict=True):
        assert torch.equal(activations, alone) and torch.equal(activations, store.rows(index, HOOKS[1]))
        assert torch.equal(gradients, store.gradient_rows(index, HOOKS[1]))


def test_a_store_without_gradients_refuses_to_yield_them(plain_store):
    store = ActivationStore(plain_store)
    assert not store.has_gradients
    with pytest.raises(SaelabError, match="harvest with gradients=true"):
        store.batches(16, hook=HOOKS[0], with_gradients=True)


def test_gradients_are_part_of_the_store_identity(smollm2, gradient_store):
    before = store_digest(gradient_store)
    with pytest.raises(SaelabError, match="gradients: True → False"):
        harvest(gradient_config(gradient_store, gradients=False), model=smollm2, progress=False)
    assert store_digest(gradient_store) == before


def test_parameters_get_no_grad_and_keep_their_requires_grad(smollm2, tmp_path):
    parameters = list(smollm2.parameters())
    frozen = parameters[5]  # one parameter the caller had frozen stays frozen
    frozen.requires_grad_(False)
    try:
        before = [parameter.requires_grad for parameter in parameters]
        assert all(parameter.grad is None for parameter in parameters)
        harvest(gradient_config(tmp_path / "store", n_tokens=ROWS * 2), model=smollm2, progress=False)
        assert [parameter.requires_grad for parameter in parameters] == before
        assert sum(before) == len(parameters) - 1
        assert all(parameter.grad is None for parameter in parameters)
    finally:
        frozen.requires_grad_(True)
