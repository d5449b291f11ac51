"""Damaged files: bytes flipped in a shard, a checkpoint truncated, a manifest entry deleted, a `cfg.json`
edited, an SAE's weights flipped. Each is found when the file is opened, by the library and by the CLI
(exit 2, one line naming the file and what is wrong); nothing damaged is silently used.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from faultlib import differences, in_process_cli, one_line_error, run_digest, store_digest
from pipeline import analyze_args, harvest_args, train_args

from saelab.errors import SaelabError
from saelab.harvest.store import ActivationStore
from saelab.sae import load_sae


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def cli_error(*args: str) -> str:
    code, _, stderr = in_process_cli(*args)
    return one_line_error((code, stderr))


@pytest.fixture
def store(reference, tmp_path) -> Path:
    return Path(shutil.copytree(reference["store"], tmp_path / "store"))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_flipped_bytes_in_a_shard_are_found_on_open(store, tmp_path, seed):
    rng = random.Random(seed)
    shard = store / "shards" / f"shard-{rng.randrange(20):06d}.safetensors"
    size = shard.stat().st_size
    offset = [rng.randrange(8, 200), rng.randrange(size // 2, size), size - 1][seed - 1]  # header, data, last byte
    flip(shard, offset)
    with pytest.raises(SaelabError, match=f"shard {shard} fails its sha256 check"):
        ActivationStore(store)
    out = tmp_path / "train"
    line = cli_error("train", "--quiet", *train_args(store, out))
    assert str(shard) in line and "sha256" in line
    assert not out.exists()  # refused before a run folder was made


def test_a_truncated_checkpoint_is_named_and_the_previous_one_resumes_bit_for_bit(reference, tmp_path):
    run = Path(shutil.copytree(reference["run"], tmp_path / "train"))
    args = ["train", "--quiet", "--resume", *train_args(reference["store"], run)]
    last, previous = sorted((run / "checkpoints").glob("step-*.pt"))[::-1]
    for cut in (0, 1, last.stat().st_size // 2, last.stat().st_size - 1):
        data = last.read_bytes()
        last.write_bytes(data[:cut])
        line = cli_error(*args)
        assert f"checkpoint {last} fails its sha256 check ({cut} bytes)" in line and "truncated" in line, line
        last.write_bytes(data)
    # the message's advice: delete it (and its .sha256), and training resumes from the one before
    last.unlink()
    last.with_suffix(".sha256").unlink()
    code, _, stderr = in_process_cli(*args)
    assert code == 0, stderr
    assert differences(run_digest(run), run_digest(reference["run"])) == []
    assert previous.exists() and last.exists()


def test_a_deleted_manifest_entry_is_found_and_no_shard_is_overwritten(reference, store, tiny_model_dir, tmp_path):
    manifest_path = store / "manifest.json"
    original = json.loads(manifest_path.read_text())
    shards_before = {p.name: p.read_bytes() for p in (store / "shards").iterdir()}

    for index in (0, 7):  # the first and a middle shard record: a gap the harvest must not fill over
        raw = json.loads(json.dumps(original))
        del raw["shards"][index]
        manifest_path.write_text(json.dumps(raw))
        with pytest.raises(SaelabError, match=r"manifest\.json lists shard .* the manifest is damaged"):
            ActivationStore(store)
        harvest_line = cli_error("harvest", "--quiet", *harvest_args(tiny_model_dir, store))
        assert str(manifest_path) in harvest_line and "a shard record is missing" in harvest_line
        train_line = cli_error("train", "--quiet", *train_args(store, tmp_path / "train"))
        assert str(manifest_path) in train_line and "a shard record is missing" in train_line
        assert {p.name: p.read_bytes() for p in (store / "shards").iterdir()} == shards_before  # nothing rewritten

    # the last record: the store still says it is complete, but shard-000019 is there, unlisted
    raw = json.loads(json.dumps(original))
    del raw["shards"][19]
    manifest_path.write_text(json.dumps(raw))
    train_line = cli_error("train", "--quiet", *train_args(store, tmp_path / "train"))
    assert "says the store is complete but does not list" in train_line and "shard-000019" in train_line
    code, _, stderr = in_process_cli("harvest", "--quiet", *harvest_args(tiny_model_dir, store))  # as it advises
    assert code == 0, stderr
    assert differences(store_digest(store), store_digest(reference["store"])) == []

    for key in ("d_model", "shards", "context_size"):  # a key of the manifest itself
        raw = json.loads(json.dumps(original))
        del raw[key]
        manifest_path.write_text(json.dumps(raw))
        line = cli_error("train", "--quiet", *train_args(store, tmp_path / "train"))
        assert f"{manifest_path} is damaged" in line and key in line, line
    manifest_path.write_text(json.dumps(original)[:-20])  # torn
    assert f"{manifest_path} is damaged" in cli_error("train", "--quiet", *train_args(store, tmp_path / "train"))
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda cfg: cfg.update(k=16), "k is 16 but the SAE saelab saved there has 8"),
        (lambda cfg: cfg.update(d_sae=256), "d_sae is 256 but the SAE saelab saved there has 128"),
        (lambda cfg: cfg.update(architecture="standard"), "architecture is 'standard'"),
        (lambda cfg: cfg.update(normalize_activations="layer_norm"), "normalize_activations is 'layer_norm'"),
        (lambda cfg: cfg.update(apply_b_dec_to_input=False), "apply_b_dec_to_input is False"),
        (lambda cfg: cfg["metadata"].update(hook_name="blocks.0.hook_resid_post"), "metadata.hook_name is"),
        (lambda cfg: cfg["metadata"].update(saelab_input_scale=-1.0), "saelab_input_scale must be a positive"),
        (lambda cfg: cfg["metadata"]["saelab_config"].update(k="eight"), "metadata.saelab_config.k: expected"),
    ],
)
def test_an_edited_cfg_json_is_found_on_load(reference, tmp_path, edit, expected):
    run = Path(shutil.copytree(reference["run"], tmp_path / "train", ignore=shutil.ignore_patterns("checkpoints")))
    folder = run / "saes" / "topk-128-k8"
    cfg = json.loads((folder / "cfg.json").read_text())
    edit(cfg)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaelabError, match="cfg.json") as error:
        load_sae(folder)
    assert expected in str(error.value)
    line = cli_error("analyze", "--quiet", *analyze_args(run))
    assert str(folder / "cfg.json") in line and expected in line


def test_flipped_bytes_in_sae_weights_and_a_torn_cfg_json_are_found(reference, tmp_path):
    run = Path(shutil.copytree(reference["run"], tmp_path / "train", ignore=shutil.ignore_patterns("checkpoints")))
    weights = run / "saes" / "batchtopk-128-k8" / "sae_weights.safetensors"
    flip(weights, weights.stat().st_size - 3)  # inside a tensor: still a valid safetensors file
    line = cli_error("analyze", "--quiet", *analyze_args(run))
    assert f"{weights}: fails its sha256 check" in line
    buffers = run / "saes" / "gba-128-l08" / "saelab_buffers.safetensors"
    flip(buffers, buffers.stat().st_size - 1)
    with pytest.raises(SaelabError, match="saelab_buffers.safetensors: fails its sha256 check"):
        load_sae(buffers.parent)
    cfg = run / "saes" / "topk-128-k8" / "cfg.json"
    cfg.write_text(cfg.read_text()[:100])
    with pytest.raises(SaelabError, match=f"{cfg}: not readable JSON"):
        load_sae(cfg.parent)
