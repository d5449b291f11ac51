"""A variant of one's own, defined in this file and nowhere else (docs/own-variant.md).

`ShrunkTopKSAE` keeps each token's k largest pre-activations and soft-thresholds them, z = relu(u − s), with
s an option of its own. Registered here with one line, it trains from a store, saves in SAELens's format
(as a plain TopK whose b_enc is lowered by s: the same SAE exactly), loads, is evaluated by `saelab eval`,
and appears in the dashboard's runs table; its config takes its own keys and refuses another variant's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from dashboard_runs import APP
from streamlit.testing.v1 import AppTest

from saelab import cli
from saelab.config import config_from_dict, config_to_dict
from saelab.errors import ConfigError
from saelab.harvest.config import HarvestConfig
from saelab.harvest.harvester import harvest
from saelab.harvest.store import ActivationStore
from saelab.kernels import RowTopK
from saelab.kernels.encode import SelectionRule
from saelab.run_layout import EVAL_FILE, SAE_DIR
from saelab.sae import SAEConfig, SparseAutoencoder, load_sae
from saelab.sae.registry import register
from saelab.train.config import TrainConfig
from saelab.train.trainer import train

HOOK = "blocks.1.hook_resid_post"
SHRINK = 0.1


class ShrunkTopKSAE(SparseAutoencoder):
    """The k largest u per token, each shrunk by s: z = relu(u − s) there, 0 elsewhere."""

    architecture = "shrunk_topk"
    config_keys = ("k",)
    option_defaults = {"shrink": 0.05}
    revives_with_auxk = True
    saelens_architecture = "topk"  # SAELens's TopK on u − s picks the same latents and gives relu(u − s)

    def select(self, pre_activations: torch.Tensor, gradient: torch.Tensor | None = None) -> torch.Tensor:
        top = pre_activations.topk(self.cfg.k, dim=-1)
        shrunk = (top.values - self.option("shrink")).relu()
        return torch.zeros_like(pre_activations).scatter(-1, top.indices, shrunk)

    def selection_rule(self, x: torch.Tensor, gradient: torch.Tensor | None) -> SelectionRule:
        return RowTopK(self.cfg.k)

    def kept_values(
        self, indices: torch.Tensor, pre_activations: torch.Tensor, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return (pre_activations - self.option("shrink")).relu()

    def to_saelens_(self, weights: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        weights["b_enc"] = weights["b_enc"] - self.option("shrink")

    def from_saelens_(self, tensors: dict[str, torch.Tensor], fold_in: float, fold_out: float) -> None:
        super().from_saelens_(tensors, fold_in, fold_out)
        self.b_enc.copy_(tensors["b_enc"] + self.option("shrink"))


register(ShrunkTopKSAE)


@pytest.fixture(scope="module")
def own_run(tiny_model, tiny_model_dir, tmp_path_factory) -> Path:
    """runs/own/train: one ShrunkTopK SAE trained on a tiny random Llama's store, then `saelab eval`."""
    root = tmp_path_factory.mktemp("runs")
    store = root / "own" / "activations"
    harvest_cfg = HarvestConfig(
        model=str(tiny_model_dir), hooks=[HOOK], out=str(store), n_tokens=31 * 40, context_size=32, device="cpu"
    )
    harvest(harvest_cfg, model=tiny_model, progress=False)
    sae = SAEConfig(architecture="shrunk_topk", d_sae=64, k=4, options={"shrink": SHRINK})
    run = root / "own" / "train"
    train(TrainConfig(store=str(store), out=str(run), saes=[sae], n_tokens=4096, batch_size=256), progress=False)
    assert cli.main(["eval", "--quiet", f"run={run}", "n_tokens=62", "batch_size=2", "device=cpu"]) == 0
    return run


def test_it_trains_saves_as_an_exact_saelens_topk_and_loads(own_run):
    folder = own_run / SAE_DIR / "shrunk_topk-64-k4"
    saved = json.loads((folder / "cfg.json").read_text())
    assert saved["architecture"] == "topk" and saved["k"] == 4
    assert saved["metadata"]["saelab_architecture"] == "shrunk_topk"
    assert saved["metadata"]["saelab_config"]["options"] == {"shrink": SHRINK}
    sae = load_sae(folder)
    assert isinstance(sae, ShrunkTopKSAE) and sae.option("shrink") == SHRINK
    x = ActivationStore(own_run.parent / "activations").rows(torch.arange(200), HOOK).float()

    # SAELens's TopK forward on the saved tensors: u = (x − b_dec) W_enc + b_enc, its top k, relu
    weights = safetensors.torch.load_file(folder / "sae_weights.safetensors")
    u = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    top = u.topk(4, dim=-1)
    saelens = torch.zeros_like(u).scatter(-1, top.indices, top.values.relu())
    latents = sae.encode(x)
    assert (latents > 0).sum(-1).float().mean() > 1, "the SAE should fire after training"
    torch.testing.assert_close(latents, saelens, atol=1e-5, rtol=1e-4)


def test_saelab_eval_measured_it_and_the_runs_table_shows_it(own_run, monkeypatch):
    evaluation = json.loads((own_run / SAE_DIR / "shrunk_topk-64-k4" / EVAL_FILE).read_text())
    assert evaluation["architecture"] == "shrunk_topk" and 0 < evaluation["l0"] <= 4 and 0 < evaluation["fvu"] < 1

    monkeypatch.setenv("SAELAB_RUNS", str(own_run.parents[1]))
    at = AppTest.from_file(str(APP), default_timeout=60).run()
    assert not at.exception, [e.message for e in at.exception]
    row = at.dataframe[0].value.iloc[0]
    assert (row["run"], row["SAE"], row["variant"], row["width"], row["k / target"]) == (
        "own/train",
        "shrunk_topk-64-k4",
        "shrunk_topk",
        64,
        "k 4",
    )
    assert row["FVU"] == evaluation["fvu"]


def test_its_config_takes_its_own_keys_and_refuses_another_variants():
    data = {"architecture": "shrunk_topk", "d_sae": 64, "k": 4, "options": {"shrink": 0.2}}
    cfg = config_from_dict(SAEConfig, data)
    assert config_to_dict(cfg) == {
        **{key: getattr(SAEConfig(), key) for key in ("d_in", "name", "input_norm", "train_b_dec", "hook_name")},
        **data,
        "model_name": "",
    }
    with pytest.raises(ConfigError, match=r"^saes\[0\]\.beta: not a key of a shrunk_topk SAE, whose own keys are k"):
        config_from_dict(TrainConfig, {"saes": [{"architecture": "shrunk_topk", "beta": 2.0}]})
    with pytest.raises(
        ConfigError, match=r"options\.sharpness: not an option of a shrunk_topk SAE \(its options: shrink\)"
    ):
        config_from_dict(SAEConfig, {"architecture": "shrunk_topk", "options": {"sharpness": 1.0}})
    with pytest.raises(ConfigError, match="architecture: 'shrunk_topc' is not a registered SAE variant"):
        config_from_dict(SAEConfig, {"architecture": "shrunk_topc"})


def test_saelab_processes_import_a_variant_named_in_saelab_variants(tmp_path):
    """`saelab` commands run in processes of their own: SAELAB_VARIANTS names the modules they import first."""
    (tmp_path / "my_variants.py").write_text(
        textwrap.dedent(
            """
            from saelab.sae.registry import register
            from saelab.sae.topk import TopKSAE

            class MyTopK(TopKSAE):
                architecture = "my_topk"
                loads_saelens = ()

            register(MyTopK)
            """
        )
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    code = "from saelab.sae import SAEConfig; print(SAEConfig(architecture='my_topk', d_sae=64, k=4).label)"

    def run(modules: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": path, "SAELAB_VARIANTS": modules}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)

    assert run("my_variants").stdout.strip() == "my_topk-64-k4"
    assert "SAELAB_VARIANTS: cannot import 'no_such_module'" in run("no_such_module").stderr
