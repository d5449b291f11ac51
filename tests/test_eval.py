"""Evaluation: metrics against hand-computed values, streaming = one shot, CE loss recovered on the real
model (identity → 1, zeros → 0, hooks always removed), and `evaluate` end to end on a tiny real run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.cli import main
from saelab.config import load_config, save_config
from saelab.errors import SaelabError
from saelab.eval import metrics as M
from saelab.eval.ce_loss import CELossAccumulator, CleanPredictions, ce_loss_recovered
from saelab.eval.config import EvalConfig
from saelab.eval.evaluate import evaluate, held_out_contexts
from saelab.harvest.config import CorpusConfig, HarvestConfig
from saelab.harvest.corpus import iter_documents
from saelab.harvest.harvester import harvest
from saelab.harvest.packing import iter_contexts
from saelab.harvest.store import ActivationStore
from saelab.models.upper_layers import UpperLayers
from saelab.run_layout import CONFIG_FILE, EVAL_FILE
from saelab.sae import load_sae
from saelab.sae.config import SAEConfig
from saelab.train.config import TrainConfig
from saelab.train.trainer import train

HOOK = "blocks.15.hook_resid_post"
CONTEXT = 32


# ---- metrics on small tensors ------------------------------------------------------------------


def test_metrics_match_a_case_computed_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    x_hat = torch.tensor([[2.0, 2.0], [3.0, 5.0]])
    # x̄ = [2, 4]; Σ‖x − x̄‖² = (1 + 4) + (1 + 4) = 10; Σ‖x − x̂‖² = 1 + 1 = 2.
    assert M.fvu(x, x_hat).item() == pytest.approx(0.2)
    assert M.explained_variance(x, x_hat).item() == pytest.approx(0.8)
    # per dimension: 1 − 1/2 and 1 − 1/8, averaged.
    assert M.explained_variance_per_dim(x, x_hat).item() == pytest.approx((0.5 + 0.875) / 2)
    assert M.mse(x, x_hat).item() == pytest.approx(1.0)
    assert M.mse_per_element(x, x_hat).item() == pytest.approx(0.5)

    z = torch.tensor([[0.0, 1.5, 0.0, 0.2], [0.0, 0.0, 0.0, 3.0], [0.0, 2.0, 0.0, 1.0]])
    assert M.l0(z).tolist() == [2, 1, 2]
    assert M.l0_histogram(z).tolist() == [0, 1, 2, 0, 0]
    counts = M.firing_counts(z)
    assert counts.tolist() == [0, 2, 0, 3]
    assert M.dead_latents(counts).tolist() == [True, False, True, False]
    assert M.dense_latents(counts, 3).tolist() == [False, True, False, True]
    assert M.dense_latents(counts, 3, threshold=0.7).tolist() == [False, False, False, True]
    # log10(1/3) = −0.48 → bins [−0.5, −0.25), [−0.25, 0]; frequencies 2/3 (−0.18) and 1 (0, the closed right edge).
    assert M.feature_density_histogram(counts, 3) == {
        "log10_frequency_edges": [-0.5, -0.25, 0.0],
        "counts": [0, 2],
        "n_dead": 2,
    }


def test_feature_density_bins_reach_the_rarest_possible_firing():
    counts = torch.tensor([0, 1, 16, 1638, 16384])
    histogram = M.feature_density_histogram(counts, n_tokens=16384)
    edges = histogram["log10_frequency_edges"]
    assert edges[0] == -4.25 and edges[-1] == 0.0 and len(edges) == 18  # log10(1/16384) = −4.21
    assert histogram["n_dead"] == 1
    # 1/16384 → first bin; 16/16384 = 10^−3.01 → [−3.25, −3); 1638/16384 → [−1.25, −1); 1 → the last bin
    assert histogram["counts"] == [1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1]


def random_batch(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activations far from the origin (as residual streams are), a noisy reconstruction, sparse latents."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.1, 20, 12)
    x = 40 + torch.randn(n, 12, generator=g) * scales
    x_hat = x + 0.3 * torch.randn(n, 12, generator=g) * scales
    fires = torch.rand(n, 48, generator=g) < torch.linspace(0, 0.6, 48)  # latent 0 never fires
    latents = torch.rand(n, 48, generator=g).add(0.1) * fires
    return x, x_hat, latents


def test_streaming_accumulator_equals_one_shot_and_numpy():
    batches = [random_batch(n, seed) for seed, n in enumerate([7, 300, 1, 192])]
    x, x_hat, z = (torch.cat(parts) for parts in zip(*batches, strict=True))
    accumulator = M.MetricsAccumulator(d_in=12, d_sae=48)
    for batch in batches:
        accumulator.update(*batch)
    result = accumulator.result()

    counts = M.firing_counts(z)
    assert result["n_tokens"] == 500
    assert result["fvu"] == pytest.approx(M.fvu(x, x_hat).item(), rel=1e-10)
    assert result["explained_variance"] == pytest.approx(M.explained_variance(x, x_hat).item(), rel=1e-10)
    assert result["explained_variance_per_dim"] == pytest.approx(
        M.explained_variance_per_dim(x, x_hat).item(), rel=1e-10
    )
    assert result["mse"] == pytest.approx(M.mse(x, x_hat).item(), rel=1e-10)
    assert result["mse_per_element"] == pytest.approx(M.mse_per_element(x, x_hat).item(), rel=1e-10)
    assert result["l0"] == pytest.approx(M.l0(z).double().mean().item(), rel=1e-12)
    histogram = M.l0_histogram(z).tolist()
    assert result["l0_histogram"] == {str(k): c for k, c in enumerate(histogram) if c}
    assert result["n_dead"] == int(M.dead_latents(counts).sum()) >= 1
    assert result["n_dense"] == int(M.dense_latents(counts, 500).sum()) >= 1
    assert result["dead_fraction"] == result["n_dead"] / 48 and result["dense_fraction"] == result["n_dense"] / 48
    assert result["feature_density"] == M.feature_density_histogram(counts, 500)

    # an independent reference in numpy, float64
    xn, rn = x.double().numpy(), x_hat.double().numpy()
    fvu = ((xn - rn) ** 2).sum() / (xn.var(axis=0) * len(xn)).sum()
    per_dim = np.mean(1 - ((xn - rn) ** 2).sum(0) / (xn.var(axis=0) * len(xn)))
    assert result["fvu"] == pytest.approx(fvu, rel=1e-10)
    assert result["explained_variance_per_dim"] == pytest.approx(per_dim, rel=1e-10)
    assert 0 < result["fvu"] < 1


def test_clean_predictions_give_the_loss_and_kl_of_a_float64_log_softmax():
    """The logsumexp-and-dot form against the textbook one, on random logits of a realistic spread."""
    generator = torch.Generator().manual_seed(0)
    batch, length, vocab = 3, 9, 500
    tokens = torch.randint(0, vocab, (batch, length), generator=generator)
    clean = 4 * torch.randn(batch, length, vocab, generator=generator)
    other = clean + torch.randn(batch, length, vocab, generator=generator)

    def reference(logits: torch.Tensor) -> tuple[float, float]:
        log_p = torch.log_softmax(logits[:, :-1].double(), -1)
        log_c = torch.log_softmax(clean[:, :-1].double(), -1)
        loss = -log_p.gather(-1, tokens[:, 1:, None]).sum()
        return float(loss), float((log_c.exp() * (log_c - log_p)).sum())

    predictions = CleanPredictions(clean, tokens)
    loss, kl = predictions.compare(other)
    expected_loss, expected_kl = reference(other)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert kl == pytest.approx(expected_kl, rel=1e-5) and expected_kl > 1
    assert predictions.loss_sum == pytest.approx(reference(clean)[0], rel=1e-6)
    assert predictions.compare(clean)[1] == pytest.approx(0.0, abs=1e-4)


# ---- CE loss recovered on the real model --------------------------------------------------------


@pytest.fixture(scope="module")
def contexts(smollm2) -> torch.Tensor:
    """4 contexts of 32 tokens of the default corpus."""
    stream = iter_contexts(iter_documents(CorpusConfig()), smollm2.tokenizer, CONTEXT, prepend_bos=True)
    return torch.tensor(list(islice(stream, 4)))


@pytest.mark.slow
def test_identity_recovers_everything_and_zeros_recover_nothing(smollm2, contexts):
    ce = ce_loss_recovered(
        smollm2, contexts, HOOK, {"identity": lambda x: x.clone(), "zeros": torch.zeros_like}, batch_size=4
    )
    assert ce.n_predictions == 4 * (CONTEXT - 1)
    assert ce.sae["identity"] == pytest.approx(ce.clean, abs=1e-6)
    assert ce.recovered("identity") == pytest.approx(1.0, abs=1e-4)
    assert ce.sae["zeros"] == pytest.approx(ce.zero, abs=1e-6)
    assert ce.recovered("zeros") == pytest.approx(0.0, abs=1e-4)
    assert ce.delta("zeros") == pytest.approx(ce.zero - ce.clean)
    assert 1 < ce.clean < ce.zero - 1  # ablating the middle of the residual stream hurts a lot


@pytest.mark.slow
def test_kl_is_zero_for_the_identity_and_matches_a_direct_computation(smollm2, contexts):
    def shrink(x: torch.Tensor) -> torch.Tensor:
        return 0.8 * x

    ce = ce_loss_recovered(smollm2, contexts, HOOK, {"identity": lambda x: x.clone(), "shrink": shrink}, batch_size=2)
    assert ce.kl["identity"] == pytest.approx(0.0, abs=1e-6)

    def patch(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[:, 1:] = 0.8 * x[:, 1:]
        return x

    with torch.inference_mode():
        p = torch.softmax(smollm2(contexts)[:, :-1].double(), -1)
        with smollm2.hooks(fwd_hooks=[(HOOK, patch)]):
            q = torch.softmax(smollm2(contexts)[:, :-1].double(), -1)
    direct = (p * (p.log() - q.log())).sum(-1).mean().item()
    assert ce.kl["shrink"] == pytest.approx(direct, rel=1e-3) and direct > 0.01
    assert ce.kl["zero"] > ce.kl["shrink"]


@pytest.mark.slow
def test_the_gradient_aware_pass_gets_each_rows_own_loss_gradient(smollm2, contexts):
    """The g-SAE eval path: g from the clean pass, row for row, against a direct autograd computation."""
    step = 0.05

    def along_gradient(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x + step * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    accumulator = CELossAccumulator(smollm2, HOOK, {}, gradient_reconstructions={"g": along_gradient})
    accumulator.update(contexts)
    result = accumulator.result()

    kept = {}

    def keep(x: torch.Tensor, hook) -> torch.Tensor:
        kept["x"] = x.detach().requires_grad_()
        return kept["x"]

    with torch.enable_grad(), smollm2.hooks(fwd_hooks=[(HOOK, keep)]):
        logits = smollm2(contexts)
        predicted, following = logits[:, :-1].flatten(0, 1), contexts[:, 1:].flatten()
        loss = torch.nn.functional.cross_entropy(predicted, following, reduction="sum")
        (gradient,) = torch.autograd.grad(loss, [kept["x"]])

    def moved(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[:, 1:] = along_gradient(x[:, 1:], gradient[:, 1:])
        return x

    with torch.inference_mode(), smollm2.hooks(fwd_hooks=[(HOOK, moved)]):
        direct = torch.nn.functional.cross_entropy(
            smollm2(contexts)[:, :-1].flatten(0, 1), contexts[:, 1:].flatten(), reduction="mean"
        ).item()
    assert result.sae["g"] == pytest.approx(direct, rel=1e-4)
    assert result.sae["g"] > result.clean + 1e-3, "stepping up the loss gradient raises the loss"


@contextmanager
def block_zero_runs(model) -> Iterator[list[int]]:
    """Counts block 0's forward calls inside (the list's one item)."""
    calls = [0]
    handle = model.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


@pytest.mark.slow
def test_spliced_passes_run_only_the_blocks_from_the_hooks_and_lose_nothing(smollm2, contexts):
    def shrink(x: torch.Tensor) -> torch.Tensor:
        return 0.8 * x

    def along_gradient(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return x + 0.05 * g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    results, calls = {}, {}
    for resume in (True, False):
        accumulator = CELossAccumulator(
            smollm2, HOOK, {"shrink": shrink}, gradient_reconstructions={"g": along_gradient}, resume=resume
        )
        accumulator.update(contexts[:2])  # the first batch also checks a resumed pass against the clean one
        with block_zero_runs(smollm2) as counted:
            accumulator.update(contexts[2:])
        results[resume], calls[resume] = accumulator.result(), counted[0]
    assert calls == {True: 1, False: 4}  # clean (with its gradient), then zero, shrink, g: from block 15 only
    resumed, full = results[True], results[False]
    assert resumed.clean == full.clean and resumed.zero == pytest.approx(full.zero, rel=1e-6)
    for label in ("shrink", "g"):
        assert resumed.sae[label] == pytest.approx(full.sae[label], rel=1e-6)
        assert resumed.kl[label] == pytest.approx(full.kl[label], rel=1e-4, abs=1e-7)


@pytest.mark.slow
def test_a_model_the_resumed_pass_cannot_reproduce_gets_full_passes(smollm2, contexts, monkeypatch):
    monkeypatch.setattr(UpperLayers, "reproduces", lambda self, logits: False)
    accumulator = CELossAccumulator(smollm2, HOOK, {"identity": lambda x: x.clone()})
    with pytest.warns(UserWarning, match="does not reproduce its logits"):
        accumulator.update(contexts[:1])
    assert accumulator.upper is None
    with block_zero_runs(smollm2) as counted:
        accumulator.update(contexts[1:2])
    assert counted[0] == 3  # clean, zero, identity
    assert accumulator.result().recovered("identity") == pytest.approx(1.0, abs=1e-4)


@pytest.mark.slow
def test_hooks_are_removed_when_the_reconstruction_raises(smollm2, contexts):
    with torch.inference_mode():
        before = smollm2(contexts[:1])

    def broken(x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("reconstruction failed")

    with pytest.raises(RuntimeError, match="reconstruction failed"):
        ce_loss_recovered(smollm2, contexts[:1], HOOK, {"broken": broken})
    assert smollm2.list_hooks() == {}
    with torch.inference_mode():
        assert torch.equal(smollm2(contexts[:1]), before)


# ---- evaluate on a tiny real run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(smollm2, tmp_path_factory) -> Path:
    """A 32-context store of SmolLM2's layer-15 residual stream and a run with a TopK and a BatchTopK SAE."""
    root = tmp_path_factory.mktemp("eval-run")
    harvest(
        HarvestConfig(out=str(root / "store"), n_tokens=31 * 32, context_size=CONTEXT, device="cpu"),
        model=smollm2,
        progress=False,
    )
    saes = [SAEConfig(architecture="topk", d_sae=576, k=8), SAEConfig(architecture="batchtopk", d_sae=576, k=8)]
    cfg = TrainConfig(store=str(root / "store"), out=str(root / "run"), n_tokens=2048, batch_size=256, saes=saes)
    train(cfg, progress=False)
    return root / "run"


@pytest.mark.slow
def test_evaluate_writes_eval_json_and_metrics_lines_on_held_out_text(smollm2, tiny_run):
    metrics_file = tiny_run / "metrics.jsonl"
    lines_before = metrics_file.read_text().splitlines()
    cfg = EvalConfig(run=str(tiny_run), n_tokens=4 * 31, batch_size=4, device="cpu")
    results = evaluate(cfg, model=smollm2, progress=False)

    assert set(results) == {"topk-576-k8", "batchtopk-576-k8"}
    for label, result in results.items():
        saved = json.loads((tiny_run / "saes" / label / EVAL_FILE).read_text())
        assert saved == result
        for key in ("fvu", "explained_variance", "l0", "dead_fraction", "dense_fraction", "l0_histogram"):
            assert key in saved
        assert saved["hook"] == HOOK and saved["step"] == 8 and saved["n_tokens"] == 4 * 31
        # a trained SAE: better than ablating, worse than the model itself
        assert saved["ce_loss_clean"] < saved["ce_loss_sae"] < saved["ce_loss_zero"]
        assert 0 < saved["ce_loss_recovered"] < 1
        assert saved["delta_lm_loss"] == pytest.approx(saved["ce_loss_sae"] - saved["ce_loss_clean"])
        assert 0 < saved["fvu"] < 1
    assert results["topk-576-k8"]["l0"] <= 8
    assert results["topk-576-k8"]["ce_loss_clean"] == results["batchtopk-576-k8"]["ce_loss_clean"]

    added = [json.loads(line) for line in metrics_file.read_text().splitlines()[len(lines_before) :]]
    assert [(row["step"], row["sae"]) for row in added] == [(8, label) for label in results]
    assert all(row["eval/fvu"] == results[row["sae"]]["fvu"] for row in added)
    assert "eval/ce_loss_recovered" in added[0] and "eval/l0_histogram" not in added[0]

    # the held-out contexts follow the store's in the corpus stream and are none of them
    store = ActivationStore(tiny_run.parent / "store")
    evaluated = held_out_contexts(store, smollm2.tokenizer, 4)
    stored = {tuple(store.context_tokens(i).tolist()) for i in range(store.n_contexts)}
    assert results["topk-576-k8"]["held_out"]["first_context"] == store.n_contexts == 32
    assert not stored & {tuple(context) for context in evaluated.tolist()}
    stream = iter_contexts(iter_documents(CorpusConfig()), smollm2.tokenizer, CONTEXT, prepend_bos=True)
    assert evaluated.tolist() == list(islice(stream, 32, 36))

    # the metrics fed from inside the spliced pass equal ones computed from a separate forward pass
    with torch.inference_mode():
        _, cache = smollm2.run_with_cache(evaluated, names_filter=[HOOK], stop_at_layer=16, return_cache_object=False)
        x = cache[HOOK][:, 1:].reshape(-1, 576)
        sae = load_sae(tiny_run / "saes" / "topk-576-k8")
        assert results["topk-576-k8"]["fvu"] == pytest.approx(M.fvu(x, sae(x).reconstruction).item(), rel=1e-4)


@pytest.mark.slow
def test_held_out_text_is_refused_when_the_corpus_no_longer_yields_the_store(smollm2, tiny_run, monkeypatch):
    store = ActivationStore(tiny_run.parent / "store")
    monkeypatch.setattr(store, "context_tokens", lambda index: torch.ones(CONTEXT, dtype=torch.long))
    with pytest.raises(SaelabError, match="no longer yields the contexts"):
        held_out_contexts(store, smollm2.tokenizer, 4)


@pytest.mark.slow
def test_cli_prints_the_table(smollm2, tiny_run, capsys, monkeypatch):
    monkeypatch.setattr("saelab.eval.evaluate.load_model", lambda spec, device: smollm2)  # the session's model
    assert main(["eval", "--quiet", f"run={tiny_run}", "saes=[topk-576-k8]", "n_tokens=31", "device=cpu"]) == 0
    out = capsys.readouterr().out
    assert "held-out tokens" in out and "CE rec." in out and "Δ loss" in out
    assert "topk-576-k8" in out and "batchtopk-576-k8" not in out


def test_missing_run_sae_or_store_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SaelabError, match="is not a training run"):
        evaluate(EvalConfig(run=str(tmp_path / "nothing")))
    run = tmp_path / "run"
    save_config(TrainConfig(store=str(tmp_path / "no-store"), out=str(run)), run / CONFIG_FILE)
    with pytest.raises(SaelabError, match="holds no SAE"):
        evaluate(EvalConfig(run=str(run)))
    (run / "saes" / "topk-4608-k32").mkdir(parents=True)
    (run / "saes" / "topk-4608-k32" / "cfg.json").write_text("{}")
    with pytest.raises(SaelabError, match="has no SAE 'gba'; it has: topk-4608-k32"):
        evaluate(EvalConfig(run=str(run), saes=["gba"]))
    with pytest.raises(SaelabError, match="activation store of .* cannot be read"):
        evaluate(EvalConfig(run=str(run)))
    assert main(["eval", f"run={tmp_path / 'nothing'}"]) == 2
    assert capsys.readouterr().err.startswith("saelab eval: error:")
    assert main(["eval", "n_tokens=0"]) == 2
    assert "n_tokens: must be positive" in capsys.readouterr().err


def test_eval_config_loads_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text("run: runs/mine\nsaes: [topk-4608-k32]\n")
    cfg = load_config(EvalConfig, path, ["n_tokens=1e3", "batch_size=4"])
    assert (cfg.run, cfg.saes, cfg.n_tokens, cfg.batch_size) == ("runs/mine", ["topk-4608-k32"], 1000, 4)
    assert EvalConfig().saes == [] and EvalConfig().n_tokens == 16_384
