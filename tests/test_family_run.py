"""The whole family on the real SmolLM2: one sweep over one store, then `saelab eval` and `saelab analyze`.

A tiny store holds three hooks of block 15 (the residual after it, and what enters and leaves its MLP);
one training pass (its CPU kernels compiled) trains a TopK SAE, the standard, JumpReLU, Gated and
Matryoshka SAEs on the residual and a transcoder and a skip transcoder from the MLP's input to its output.
Eval splices each in (the transcoders in place of the MLP) and analysis writes every feature store.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from saelab.analysis.analyze import analyze
from saelab.analysis.config import AnalyzeConfig
from saelab.analysis.feature_store import FeatureStore
from saelab.eval.ce_loss import next_token_loss_sum
from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import evaluate, held_out_contexts
from saelab.harvest.config import HarvestConfig
from saelab.harvest.harvester import harvest
from saelab.harvest.store import ActivationStore
from saelab.kernels.backend import NUMBA_ENV_VAR
from saelab.run_layout import EVAL_FILE
from saelab.sae import load_sae
from saelab.sae.config import SAEConfig
from saelab.train.config import TrainConfig
from saelab.train.sources import StoreSource
from saelab.train.trainer import train

RESID, MLP_IN, MLP_OUT = "blocks.15.hook_resid_post", "blocks.15.hook_resid_mid", "blocks.15.hook_mlp_out"
CONTEXT = 32
SWEEP = [
    SAEConfig(architecture="topk", d_sae=576, k=8),
    SAEConfig(architecture="standard", d_sae=576, l1_coefficient=2.0),
    SAEConfig(architecture="jumprelu", d_sae=576, l0_coefficient=0.5),
    SAEConfig(architecture="gated", d_sae=576, l1_coefficient=2.0),
    SAEConfig(architecture="matryoshka_batchtopk", d_sae=576, k=8),
    SAEConfig(architecture="transcoder", d_sae=576, hook_name=MLP_IN, hook_name_out=MLP_OUT, l1_coefficient=0.5),
    SAEConfig(architecture="skip_transcoder", d_sae=576, hook_name=MLP_IN, hook_name_out=MLP_OUT, l1_coefficient=0.5),
]


@pytest.fixture(scope="module")
def family_run(smollm2, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("family-run")
    harvest(
        HarvestConfig(
            out=str(root / "store"),
            hooks=[RESID, MLP_IN, MLP_OUT],
            n_tokens=31 * 48,
            context_size=CONTEXT,
            device="cpu",
        ),
        model=smollm2,
        progress=False,
    )
    cfg = TrainConfig(
        store=str(root / "store"), hook=RESID, out=str(root / "run"), n_tokens=4096, batch_size=256, saes=SWEEP
    )
    with pytest.MonkeyPatch.context() as patch:  # the CPU kernels compiled, as at full size (too small here)
        patch.setenv(NUMBA_ENV_VAR, "1")
        train(cfg, progress=False)
    return root / "run"


@pytest.mark.slow
def test_one_sweep_trains_evaluates_and_analyses_every_variant(smollm2, family_run):
    labels = [sae.label for sae in SWEEP]
    summary = json.loads((family_run / "summary.json").read_text())
    assert list(summary) == labels
    results = evaluate(EvalConfig(run=str(family_run), n_tokens=4 * 31, batch_size=4, device="cpu"), smollm2, False)
    for label, result in results.items():
        transcoder = "transcoder" in label
        assert result["hook"] == (MLP_OUT if transcoder else RESID), label
        assert result.get("hook_in") == (MLP_IN if transcoder else None), label
        print(label, {key: round(result[key], 4) for key in ("ce_loss_recovered", "fvu", "l0")})
        # better than ablating (a replacement MLP may even beat the model on 4 contexts)
        assert result["ce_loss_sae"] < result["ce_loss_zero"] and result["ce_loss_recovered"] > 0.3, label
        assert 0 < result["fvu"] < 1 and 0 < result["l0"] < 576, label
    # clean and zero-ablated passes are shared per spliced hook, and differ between the two hooks
    zero = {result["hook"]: result["ce_loss_zero"] for result in results.values()}
    assert len({result["ce_loss_zero"] for result in results.values()}) == 2 and zero[MLP_OUT] < zero[RESID]

    analyzed = analyze(AnalyzeConfig(run=str(family_run), n_tokens=CONTEXT * 16, device="cpu"), smollm2, False)
    assert set(analyzed) == set(labels)
    for label in labels:
        with FeatureStore(family_run / "saes" / label / "features.sqlite") as store:
            assert store.meta["hook"] == (MLP_IN if "transcoder" in label else RESID)
            assert any(frequency > 0 for _, frequency, _, _ in store.summary_table())


@pytest.mark.slow
def test_a_spliced_transcoder_is_the_model_with_its_mlp_output_replaced(smollm2, family_run):
    """eval's CE loss for a transcoder equals a direct forward with blocks.15's MLP output replaced."""
    label = SWEEP[-1].label
    result = json.loads((family_run / "saes" / label / EVAL_FILE).read_text())
    sae = load_sae(family_run / "saes" / label)
    store = ActivationStore(family_run.parent / "store")
    tokens = held_out_contexts(store, smollm2.tokenizer, 4)
    first = store.manifest.first_position
    read = {}

    def record(x: torch.Tensor, hook) -> torch.Tensor:
        read["x"] = x
        return x

    def replace(y: torch.Tensor, hook) -> torch.Tensor:
        patched = y.clone()
        patched[:, first:] = sae(read["x"][:, first:].reshape(-1, 576)).reconstruction.reshape(patched[:, first:].shape)
        return patched

    with torch.inference_mode():
        logits = smollm2.run_with_hooks(tokens, fwd_hooks=[(MLP_IN, record), (MLP_OUT, replace)])
    direct = float(next_token_loss_sum(logits, tokens)) / (tokens.shape[0] * (tokens.shape[1] - 1))
    assert result["ce_loss_sae"] == pytest.approx(direct, rel=1e-5)


@pytest.mark.slow
def test_a_store_source_reads_the_same_rows_at_every_hook(family_run):
    """Training's batches: the run hook's rows as a plain source reads them, and the same rows at the others."""
    store = ActivationStore(family_run.parent / "store")
    with_others = list(StoreSource(store, RESID, [MLP_IN, MLP_OUT]).batches(256, seed=3))
    plain = list(StoreSource(store, RESID).batches(256, seed=3))
    assert len(with_others) == len(plain) == store.n_rows // 256
    for (x, _, others), (x_plain, _) in zip(with_others, plain, strict=True):
        assert torch.equal(x, x_plain) and set(others) == {MLP_IN, MLP_OUT}
        rows = (store.rows(torch.arange(store.n_rows), RESID).float() == x[0]).all(-1).nonzero()[0]
        assert torch.equal(others[MLP_OUT][0], store.rows(rows, MLP_OUT).float()[0])
