"""`saelab import-sae`: SAELens pretrained SAEs from a Hugging Face cache laid out as the hub lays it out
(offline, under tmp_path), converted (legacy cfgs too) so that they compute SAELens's formula, and laid out
as a run that eval and analysis read, on a real SmolLM2 store; clear one-line errors, nothing overwritten."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml

from saelab.cli import main
from saelab.errors import SaelabError
from saelab.run_layout import CONFIG_FILE, EVAL_FILE, FEATURES_FILE
from saelab.sae import load_sae
from saelab.train.pretrained import import_pretrained_sae, read_releases, same_model, write_pretrained_sae

HOOK = "blocks.15.hook_resid_post"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(hf_home: Path, repo_id: str, folder: str, files: dict[str, bytes]) -> Path:
    """Write `files` into `folder` of `repo_id` as huggingface_hub caches a download: HF_HOME/hub/
    models--<org>--<name>/snapshots/<commit>/<folder>/…, with refs/main naming the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    target = repo / "snapshots" / COMMIT / folder
    target.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (target / name).write_bytes(data)
    return target


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face home under tmp_path (HF_HOME, HF_HUB_OFFLINE=1)."""
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return home


def releases_file(folder: Path, releases: dict) -> Path:
    path = folder / "releases.yaml"
    path.write_text(yaml.safe_dump(releases))
    return path


def random_weights(d_in: int, d_sae: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.3,
        "b_dec": torch.randn(d_in, generator=g) * 0.5 + 0.7,  # a mean ≠ 0, so centring the input matters
    }


def legacy_jb_cfg(d_in: int, d_sae: int, hook: str) -> dict:
    """A cfg.json as jbloom/GPT2-Small-SAEs-Reformatted holds them (SAELens before 6.0)."""
    return {
        "model_name": "gpt2-small",
        "hook_point": hook,
        "hook_point_layer": 8,
        "hook_point_head_index": None,
        "dataset_path": "Skylion007/openwebtext",
        "is_dataset_tokenized": False,
        "context_size": 128,
        "d_in": d_in,
        "d_sae": d_sae,
        "expansion_factor": d_sae // d_in,
        "b_dec_init_method": "geometric_median",
        "l1_coefficient": 8e-05,
        "lr": 0.0004,
        "train_batch_size": 4096,
        "total_training_tokens": 300_000_000,
        "device": "mps",
        "dtype": "torch.float32",
        "seed": 42,
    }


# ---- conversion: the imported SAE computes SAELens's formula ------------------------------------------


@pytest.mark.parametrize("shipped", [True, False], ids=["gpt2-small-res-jb", "own-release"])
def test_a_legacy_jb_folder_computes_saelens_standard_formula(hub, tmp_path, shipped):
    d_in, d_sae, hook = 16, 32, "blocks.8.hook_resid_pre"
    weights = random_weights(d_in, d_sae, seed=1)
    # the shipped release names SAELens's newer weights file; the older name must read the same
    weights_name = "sae_weights.safetensors" if shipped else "sparse_autoencoder.safetensors"
    files = {
        "cfg.json": json.dumps(legacy_jb_cfg(d_in, d_sae, hook)).encode(),
        weights_name: safetensors.torch.save(weights | {"scaling_factor": torch.ones(d_sae)}),
        "sparsity.safetensors": safetensors.torch.save({"sparsity": torch.zeros(d_sae)}),
    }
    put_in_hub_cache(hub, "jbloom/GPT2-Small-SAEs-Reformatted", hook, files)
    if shipped:  # the table's release: trained on TransformerLens's centred residual stream
        release, extra = "gpt2-small-res-jb", None
    else:
        release = "my-jb"
        own = {"repo_id": "jbloom/GPT2-Small-SAEs-Reformatted", "model": "gpt2", "saes": {"layer8": hook}}
        extra = releases_file(tmp_path, {release: own})
    sae_id = hook if shipped else "layer8"

    folder = write_pretrained_sae(release, sae_id, tmp_path / "sae", extra)
    cfg = json.loads((folder / "cfg.json").read_text())
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    assert cfg["architecture"] == "standard" and cfg["d_in"] == d_in and cfg["d_sae"] == d_sae
    assert cfg["dtype"] == "float32" and cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"]
    assert cfg["metadata"]["hook_name"] == hook and cfg["metadata"]["model_name"] == "gpt2-small"
    assert cfg["metadata"]["context_size"] == 128 and "hook_point" not in cfg
    source = cfg["metadata"]["saelab_import"]
    assert (source["release"], source["commit"], source["center_input"]) == (release, COMMIT, shipped)

    sae = load_sae(folder)
    assert sae.cfg.hook_name == hook and sae.cfg.d_in == d_in and sae.cfg.d_sae == d_sae
    x = torch.randn(200, d_in, generator=torch.Generator().manual_seed(2)) * 3 + 1.5
    w = {name: t.double() for name, t in weights.items()}
    seen = x.double() - x.double().mean(-1, keepdim=True) if shipped else x.double()  # center_writing_weights
    z = torch.relu((seen - w["b_dec"]) @ w["W_enc"] + w["b_enc"])  # SAELens's StandardSAE
    x_hat = z @ w["W_dec"] + w["b_dec"]
    with torch.no_grad():
        out = sae(x)
    assert 0.1 < (z > 0).double().mean() < 0.9
    torch.testing.assert_close(out.latents.double(), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.reconstruction.double(), x_hat, atol=1e-5, rtol=1e-5)


def test_the_shipped_table_holds_every_gpt2_small_res_jb_id():
    releases = read_releases()
    jb = releases["gpt2-small-res-jb"]
    assert jb.repo_id == "jbloom/GPT2-Small-SAEs-Reformatted" and jb.model == "gpt2-small" and jb.center_input
    ids = [f"blocks.{layer}.hook_resid_pre" for layer in range(12)] + ["blocks.11.hook_resid_post"]
    assert jb.saes == {sae_id: sae_id for sae_id in ids}
    assert releases["pythia-70m-deduped-res-sm"].saes["blocks.0.hook_resid_pre"] == "e-res-sm"
    assert same_model("gpt2-small", "gpt2") and same_model("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not same_model("gpt2", "smollm2-135m")


def test_not_in_the_cache_while_offline_is_one_clear_error(hub, tmp_path):
    with pytest.raises(SaelabError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE forbids downloading"):
        write_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre", tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


# ---- a real SmolLM2 store: import, evaluate, analyse -------------------------------------------------


@pytest.fixture(scope="module")
def store(smollm2, tmp_path_factory) -> Path:
    """16 contexts of 32 tokens of SmolLM2's layer-15 residual stream (as tests/test_eval.py makes its store)."""
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest

    folder = tmp_path_factory.mktemp("pretrained") / "store"
    harvest(
        HarvestConfig(out=str(folder), n_tokens=31 * 16, context_size=32, device="cpu"), model=smollm2, progress=False
    )
    return folder


def smollm2_sae_files(store: Path, d_sae: int, hook: str = HOOK) -> dict[str, bytes]:
    """A SAELens 6 folder (as `SAE.save_model` writes it) of a ReLU SAE whose decoder rows are store rows:
    latents that fire on the store's text."""
    from saelab.harvest.store import ActivationStore

    rows = ActivationStore(store).rows(torch.arange(0, 31 * 16, 7)[:d_sae]).float()
    b_dec = rows.mean(0)
    directions = torch.nn.functional.normalize(rows - b_dec, dim=-1)
    weights = {"W_enc": directions.T.contiguous(), "W_dec": directions, "b_enc": torch.full((d_sae,), -5.0)}
    cfg = {
        "d_in": 576,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": hook, "model_name": SMOLLM2_HUB_NAME},
        "architecture": "standard",
    }
    return {
        "cfg.json": json.dumps(cfg).encode(),
        "sae_weights.safetensors": safetensors.torch.save(weights | {"b_dec": b_dec}),
    }


@pytest.mark.slow
def test_import_then_evaluate_and_analyse_a_smollm2_sae(smollm2, store, hub, tmp_path, capsys):
    from saelab.analysis.analyze import analyze
    from saelab.analysis.config import AnalyzeConfig
    from saelab.analysis.feature_store import FeatureStore
    from saelab.browse.runs import read_run
    from saelab.eval.config import EvalConfig
    from saelab.eval.evaluate import evaluate

    put_in_hub_cache(hub, "saelab-test/smollm2-res-saes", "layer_15/width_64", smollm2_sae_files(store, 64))
    own = {
        "smollm2-res": {
            "repo_id": "saelab-test/smollm2-res-saes",
            "model": "smollm2-135m",
            "saes": {HOOK: "layer_15/width_64"},
        }
    }
    extra = releases_file(tmp_path, own)
    run = tmp_path / "run"
    run.mkdir()  # an empty --out is fine
    argv = ["import-sae", "--release", "smollm2-res", "--id", HOOK, "--store", str(store), "--out", str(run)]
    assert main([*argv, "--releases", str(extra)]) == 0
    label = f"smollm2-res__{HOOK}"
    printed = capsys.readouterr().out
    assert f"saes/{label}/ reads {HOOK}" in printed and "64 latents" in printed

    config = yaml.safe_load((run / CONFIG_FILE).read_text())
    assert config["store"] == str(store) and config["hook"] == HOOK and config["saes"][0]["name"] == label
    assert not list(tmp_path.glob(".*.tmp"))

    results = evaluate(
        EvalConfig(run=str(run), n_tokens=2 * 31, batch_size=2, device="cpu"), model=smollm2, progress=False
    )
    saved = json.loads((run / "saes" / label / EVAL_FILE).read_text())
    assert saved == results[label] and saved["hook"] == HOOK and saved["d_sae"] == 64
    assert saved["ce_loss_clean"] < saved["ce_loss_zero"] and saved["l0"] > 0

    cfg = AnalyzeConfig(run=str(run), n_tokens=31 * 8, top_n=3, sample_size=10, per_band=2, batch_size=128)
    summaries = analyze(cfg, model=smollm2, progress=False)
    features = FeatureStore(run / "saes" / label / FEATURES_FILE)
    assert summaries[label].n_latents == features.n_latents == 64 and features.meta["hook"] == HOOK

    listed = read_run(run)  # as the dashboard lists it
    assert not listed.problems and [sae.label for sae in listed.saes] == [label] and listed.status == "finished"
    assert listed.saes[0].hook == HOOK and listed.saes[0].ce_loss_recovered == saved["ce_loss_recovered"]


@pytest.mark.slow
def test_a_store_of_another_hook_or_model_is_refused_before_the_weights_are_fetched(store, hub, tmp_path):
    # only cfg.json in the cache: the mismatch must be found before the weights are needed
    only_cfg = {"cfg.json": smollm2_sae_files(store, 8, hook="blocks.14.hook_resid_post")["cfg.json"]}
    put_in_hub_cache(hub, "saelab-test/smollm2-res-saes", "layer_14", only_cfg)
    own = {"repo_id": "saelab-test/smollm2-res-saes", "model": "smollm2-135m", "saes": {"l14": "layer_14"}}
    extra = releases_file(tmp_path, {"smollm2-res": own})
    with pytest.raises(SaelabError) as error:
        import_pretrained_sae("smollm2-res", "l14", store, tmp_path / "run", extra)
    message = str(error.value)
    assert "reads blocks.14.hook_resid_post" in message and "holds blocks.15.hook_resid_post" in message
    assert "saelab harvest model=smollm2-135m hooks=[blocks.14.hook_resid_post]" in message

    jb = {"cfg.json": json.dumps(legacy_jb_cfg(768, 24576, "blocks.8.hook_resid_pre")).encode()}
    put_in_hub_cache(hub, "jbloom/GPT2-Small-SAEs-Reformatted", "blocks.8.hook_resid_pre", jb)
    with pytest.raises(SaelabError, match=r"reads gpt2-small but .* holds smollm2-135m.*model=gpt2 hooks=\[blocks.8"):
        import_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre", store, tmp_path / "run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "releases.yaml"]  # no run, no temporary left


def test_unknown_release_or_id_is_one_line_from_the_cli(hub, tmp_path, saelab_error):
    common = ["--store", str(tmp_path / "store"), "--out", str(tmp_path / "run")]
    line = saelab_error("import-sae", "--release", "gpt2-small-res-jb", "--id", "blocks.99.hook_resid_pre", *common)
    assert "release 'gpt2-small-res-jb' has no SAE id 'blocks.99.hook_resid_pre'" in line
    assert "blocks.8.hook_resid_pre" in line
    with pytest.raises(
        SaelabError, match="unknown release 'no-such-release'; saelab knows .*gpt2-small-res-jb.*--releases"
    ):
        import_pretrained_sae("no-such-release", "x", tmp_path / "store", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_non_empty_out_is_refused_and_left_as_it_was(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SaelabError, match="already exists and is not an empty folder"):
        import_pretrained_sae("gpt2-small-res-jb", "blocks.8.hook_resid_pre", tmp_path / "store", out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
