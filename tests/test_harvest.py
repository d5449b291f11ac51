"""The harvester: what it writes, that it resumes after a real kill, and what it refuses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saelab.errors import ConfigError, SaelabError
from saelab.harvest.config import CorpusConfig, HarvestConfig
from saelab.harvest.harvester import harvest
from saelab.harvest.manifest import read_manifest
from saelab.harvest.shards import map_shard
from saelab.locking import folder_lock


def small_config(out: Path, **overrides) -> HarvestConfig:
    """A harvest of a few hundred tokens in several shards: seconds on the real model."""
    values = dict(out=str(out), n_tokens=31 * 12, context_size=32, batch_size=2, shard_contexts=4, device="cpu")
    values.update(overrides)
    return HarvestConfig(**values)


def tiny_config(out: Path, model_dir: Path, **overrides) -> HarvestConfig:
    return small_config(out, model=str(model_dir), hooks=["blocks.1.hook_resid_post"], **overrides)


def store_digest(store: Path) -> list[tuple[str, str]]:
    return [(shard.file, shard.sha256) for shard in read_manifest(store).shards]


def test_store_holds_the_models_activations_and_tokens(smollm2, tmp_path):
    manifest = harvest(small_config(tmp_path / "store"), model=smollm2, progress=False)
    assert manifest.complete and manifest.n_contexts == 12 and len(manifest.shards) == 3
    assert manifest.n_rows == 12 * 31 and manifest.first_position == 1 and manifest.d_model == 576
    shard = map_shard(tmp_path / "store" / manifest.shards[1].file)
    assert not manifest.gradients and manifest.gradient_loss is None
    assert set(shard) == {"blocks.15.hook_resid_post", "token_ids", "contexts"}  # gradients only when asked
    contexts = shard["contexts"].long()
    assert contexts.shape == (4, 32) and (contexts[:, 0] == smollm2.tokenizer.bos_token_id).all()
    assert torch.equal(shard["token_ids"].long(), contexts[:, 1:].reshape(-1))
    with torch.no_grad():
        _, cache = smollm2.run_with_cache(contexts, names_filter=["blocks.15.hook_resid_post"])
    expected = cache["blocks.15.hook_resid_post"][:, 1:].reshape(-1, 576)
    stored = shard["blocks.15.hook_resid_post"]
    assert stored.shape == (4 * 31, 576)
    assert (stored - expected).abs().max().item() < 1e-3 * expected.abs().max().item()
    # Position 0, the attention sink, is excluded: no stored row has its enormous norm.
    assert stored.norm(dim=-1).max() < 0.2 * cache["blocks.15.hook_resid_post"][:, 0].norm(dim=-1).min()


def test_several_hooks_and_bfloat16_on_a_local_model(tiny_model, tiny_model_dir, tmp_path):
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.2.hook_resid_post"]
    cfg = small_config(tmp_path / "store", model=str(tiny_model_dir), hooks=hooks, dtype="bfloat16")
    manifest = harvest(cfg, model=tiny_model, progress=False)
    shard = map_shard(tmp_path / "store" / manifest.shards[0].file)
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(shard["contexts"].long(), names_filter=hooks)
    for hook in hooks:
        assert shard[hook].dtype == torch.bfloat16
        expected = cache[hook][:, 1:].reshape(-1, 32)
        assert torch.allclose(shard[hook].float(), expected, rtol=1e-2, atol=1e-2)


def test_keeping_the_first_position(tiny_model, tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "store", tiny_model_dir, exclude_first_position=False, n_tokens=32 * 4)
    manifest = harvest(cfg, model=tiny_model, progress=False)
    shard = map_shard(tmp_path / "store" / manifest.shards[0].file)
    assert manifest.first_position == 0 and manifest.n_rows == 4 * 32
    assert torch.equal(shard["token_ids"], shard["contexts"].reshape(-1))


def test_a_later_first_position_skips_the_positions_before_it(tiny_model, tiny_model_dir, tmp_path):
    """`first_position: 2` (SmolLM2's position-1 sinks): rows are positions 2..T-1, as the model computed them."""
    cfg = tiny_config(tmp_path / "store", tiny_model_dir, first_position=2, n_tokens=30 * 4)
    manifest = harvest(cfg, model=tiny_model, progress=False)
    shard = map_shard(tmp_path / "store" / manifest.shards[0].file)
    assert manifest.first_position == 2 and manifest.rows_per_context == 30 and manifest.n_rows == 4 * 30
    assert torch.equal(shard["token_ids"], shard["contexts"][:, 2:].reshape(-1))
    hook = cfg.hooks[0]
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(shard["contexts"].long(), names_filter=[hook])
    assert torch.allclose(shard[hook], cache[hook][:, 2:].reshape(-1, shard[hook].shape[-1]), atol=1e-5)
    with pytest.raises(ConfigError, match="first_position: must be in 0..context_size-1"):
        tiny_config(tmp_path / "bad", tiny_model_dir, first_position=32).validate()


def _run_harvest_cli(out: Path, *extra: str) -> subprocess.Popen:
    args = [f"out={out}", "n_tokens=2480", "context_size=32", "batch_size=2", "shard_contexts=4", "device=cpu"]
    return subprocess.Popen(
        [sys.executable, "-m", "saelab", "harvest", "--quiet", *args, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after_shards(process: subprocess.Popen, store: Path, n_shards: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        manifest = store / "manifest.json"
        if manifest.exists() and len(json.loads(manifest.read_text())["shards"]) >= n_shards:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return
        time.sleep(0.01)
    raise AssertionError(f"harvest ended before {n_shards} shards were written: {process.communicate()}")


@pytest.mark.slow
def test_resume_after_sigkill_gives_the_uninterrupted_store(tmp_path):
    reference = _run_harvest_cli(tmp_path / "reference")
    assert reference.wait() == 0, reference.communicate()
    killed_store = tmp_path / "killed"
    for n_shards in (3, 9):  # kill twice, at different points
        _kill_after_shards(_run_harvest_cli(killed_store), killed_store, n_shards)
        assert not read_manifest(killed_store).complete
    resumed = _run_harvest_cli(killed_store)
    stdout, stderr = resumed.communicate()
    assert resumed.returncode == 0, stderr
    assert read_manifest(killed_store).complete
    assert store_digest(killed_store) == store_digest(tmp_path / "reference")
    assert len(store_digest(killed_store)) == 20
    leftovers = [p.name for p in (killed_store / "shards").iterdir() if not p.name.startswith("shard-")]
    assert leftovers == []


def killed_after(store: Path, n_shards: int) -> Path:
    """Rewrite a finished store's manifest as a harvest killed after its first `n_shards` shards leaves it."""
    manifest_path = store / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    raw["shards"], raw["complete"] = raw["shards"][:n_shards], False
    manifest_path.write_text(json.dumps(raw))
    return manifest_path


def test_unlisted_shards_and_temporaries_are_rebuilt(tiny_model, tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "store", tiny_model_dir)
    harvest(cfg, model=tiny_model, progress=False)
    expected = store_digest(tmp_path / "store")
    # Fake a kill after shard 1 was renamed into place but before the manifest listed it.
    killed_after(tmp_path / "store", 1)
    (tmp_path / "store" / "shards" / "shard-000001.safetensors").write_bytes(b"half a shard")
    (tmp_path / "store" / "shards" / ".shard-000002.safetensors.abc.tmp").write_bytes(b"junk")
    harvest(cfg, model=tiny_model, progress=False)
    assert store_digest(tmp_path / "store") == expected
    assert sorted(p.name for p in (tmp_path / "store" / "shards").iterdir()) == [
        "shard-000000.safetensors",
        "shard-000001.safetensors",
        "shard-000002.safetensors",
    ]


def test_resume_finds_a_damaged_listed_shard_before_appending(tiny_model, tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "store", tiny_model_dir)
    harvest(cfg, model=tiny_model, progress=False)
    manifest_path = killed_after(tmp_path / "store", 2)
    (tmp_path / "store" / "shards" / "shard-000002.safetensors").unlink()
    shard = tmp_path / "store" / "shards" / "shard-000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01  # one bit of one stored activation: same size, only the sha256 tells
    shard.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match=r"shard .*shard-000000.safetensors fails its sha256 check"):
        harvest(cfg, model=tiny_model, progress=False)
    assert not (tmp_path / "store" / "shards" / "shard-000002.safetensors").exists()  # nothing appended
    assert len(json.loads(manifest_path.read_text())["shards"]) == 2


def test_a_store_from_before_gradients_existed_reads_and_resumes(tiny_model, tiny_model_dir, tmp_path):
    from saelab.harvest.store import ActivationStore

    cfg = tiny_config(tmp_path / "store", tiny_model_dir)
    harvest(cfg, model=tiny_model, progress=False)
    expected = store_digest(tmp_path / "store")
    # The manifest as saelab wrote it before `gradients` existed, killed after its first shard.
    manifest_path = tmp_path / "store" / "manifest.json"
    raw = json.loads(manifest_path.read_text())
    del raw["gradients"], raw["gradient_loss"], raw["config"]["gradients"]
    raw["shards"], raw["complete"] = raw["shards"][:1], False
    manifest_path.write_text(json.dumps(raw))
    assert not ActivationStore(tmp_path / "store").has_gradients
    harvest(cfg, model=tiny_model, progress=False)
    assert store_digest(tmp_path / "store") == expected


def test_a_rerun_may_change_the_batch_size_and_ends_with_the_same_store(tiny_model, tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "store", tiny_model_dir)
    harvest(cfg, model=tiny_model, progress=False)
    expected = store_digest(tmp_path / "store")
    killed_after(tmp_path / "store", 1)
    cfg.batch_size = 3  # a shard of 4 contexts now runs as batches of 3 and 1
    harvest(cfg, model=tiny_model, progress=False)
    assert store_digest(tmp_path / "store") == expected


def test_refuses_a_store_made_with_another_config(tiny_model, tiny_model_dir, tmp_path):
    cfg = tiny_config(tmp_path / "store", tiny_model_dir)
    harvest(cfg, model=tiny_model, progress=False)
    before = store_digest(tmp_path / "store")
    cfg.context_size = 16
    with pytest.raises(SaelabError, match=r"context_size: 32 → 16"):
        harvest(cfg, model=tiny_model, progress=False)
    assert store_digest(tmp_path / "store") == before


def test_refuses_a_folder_that_is_not_a_store(tiny_model, tiny_model_dir, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SaelabError, match="notes.txt"):
        harvest(tiny_config(tmp_path, tiny_model_dir), model=tiny_model, progress=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_second_harvest_into_a_locked_store_is_refused(tiny_model, tiny_model_dir, tmp_path):
    with folder_lock(tmp_path / "store"), pytest.raises(SaelabError, match="in use by another"):
        harvest(tiny_config(tmp_path / "store", tiny_model_dir), model=tiny_model, progress=False)


def test_local_jsonl_corpus_and_a_corpus_smaller_than_one_context(tiny_model, tiny_model_dir, tmp_path):
    lines = [json.dumps({"body": f"Document {i}: the quick brown fox jumps over the lazy dog."}) for i in range(40)]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines))
    corpus = CorpusConfig(source="datasets", path=str(tmp_path / "docs.jsonl"), text_column="body")
    cfg = tiny_config(tmp_path / "store", tiny_model_dir, corpus=corpus)
    manifest = harvest(cfg, model=tiny_model, progress=False)
    assert manifest.n_rows == 12 * 31 and manifest.corpus["source"] == "datasets"
    (tmp_path / "tiny.jsonl").write_text(json.dumps({"body": "too short"}))
    cfg.corpus.path, cfg.out = str(tmp_path / "tiny.jsonl"), str(tmp_path / "tiny-store")
    with pytest.raises(SaelabError, match="no full context of 32 tokens"):
        harvest(cfg, model=tiny_model, progress=False)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["n_tokenz=5"], "unknown key 'n_tokenz'"),
        (["dtype=float16"], "dtype"),
        (["corpus.source=hub"], "corpus.source"),
        (["--config", "no-such-file.yaml"], "no-such-file.yaml"),
    ],
)
def test_cli_reports_bad_input_in_one_line(argv, message, tmp_path, saelab_error):
    assert message in saelab_error("harvest", f"out={tmp_path / 'store'}", *argv)
    assert not (tmp_path / "store").exists()


def test_a_harvested_store_reads_back_and_detects_corruption(smollm2, tmp_path):
    from saelab.harvest.store import ActivationStore

    manifest = harvest(small_config(tmp_path / "store", n_tokens=31 * 8), model=smollm2, progress=False)
    store = ActivationStore(tmp_path / "store")
    shard = map_shard(tmp_path / "store" / manifest.shards[1].file)
    rows = torch.tensor([0, 5, 31 * 4 + 3, 31 * 8 - 1])
    local = rows[rows >= 31 * 4] - 31 * 4
    assert torch.equal(store.rows(rows)[2:], shard["blocks.15.hook_resid_post"][local])
    assert torch.equal(store.token_ids(rows)[2:], shard["token_ids"][local].long())
    shuffled = torch.cat(list(store.batches(batch_size=31, seed=3)))
    in_order = store.rows(torch.arange(31 * 8))
    assert shuffled.shape == in_order.shape and not torch.equal(shuffled, in_order)
    by_first_value = lambda rows: rows[rows[:, 0].argsort()]  # noqa: E731
    assert torch.equal(by_first_value(shuffled), by_first_value(in_order))
    path = tmp_path / "store" / manifest.shards[1].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SaelabError, match="shard-000001.safetensors"):
        ActivationStore(tmp_path / "store")
