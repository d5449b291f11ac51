"""Steering: positions and interventions against hand computations, and on the real model with a tiny real
SAE: no-op edits leave the logits alone, splicing equals the CE-loss code, adding a feature raises its token,
hooks never outlive their block, configs fail in one line, and `saelab steer` end to end."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from saelab.sae import TopKSAE
from saelab.sae.config import SAEConfig
from saelab.steer import AddDirection, SAEEdit, position_mask
from saelab.steer.interventions import POSITIONS


def random_sae(d_in: int = 16, d_sae: int = 64, k: int = 4, seed: int = 0, input_norm: str = "none") -> TopKSAE:
    """A TopK SAE with random weights, biases and input scale (none of them trivial)."""
    generator = torch.Generator().manual_seed(seed)
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, k=k, hook_name="blocks.0.hook_resid_post", input_norm=input_norm)
    sae = TopKSAE(cfg, generator)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=generator))
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=generator))
        sae.b_dec.copy_(torch.randn(d_in, generator=generator))
        sae.input_scale.fill_(0.37)
    return sae.eval()


# ---- positions and single interventions on random tensors ------------------------------------------


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("include_first", [False, True])
@pytest.mark.parametrize("prompt_length", [None, 1, 4, 9])
def test_position_mask_selects_the_documented_positions(positions, include_first, prompt_length):
    mask = position_mask(9, prompt_length, positions, include_first).tolist()
    boundary = 9 if prompt_length is None else prompt_length
    expected = [
        (include_first or t >= 1) and {"all": True, "prompt": t < boundary, "generated": t >= boundary}[positions]
        for t in range(9)
    ]
    assert mask == expected


@pytest.mark.parametrize("positions", POSITIONS)
def test_add_direction_edits_only_its_positions(positions):
    generator = torch.Generator().manual_seed(1)
    x = 3 + torch.randn(2, 7, 16, generator=generator)
    direction = torch.randn(16, generator=generator)
    out = AddDirection("h", direction=direction, coefficient=-2.5, positions=positions).apply(x, prompt_length=4)
    mask = position_mask(7, 4, positions)
    assert torch.equal(out[:, ~mask], x[:, ~mask])  # untouched, bit for bit
    torch.testing.assert_close(out[:, mask], x[:, mask] - 2.5 * direction)
    assert not torch.equal(out, x) and torch.equal(x, x.clone())  # x itself is not modified


@pytest.mark.parametrize("input_norm", ["none", "layer_norm"])
def test_sae_edit_equals_the_literal_formula(input_norm):
    sae = random_sae(input_norm=input_norm)
    generator = torch.Generator().manual_seed(2)
    x = 2 + torch.randn(3, 6, 16, generator=generator)
    rows = x[:, 1:].reshape(-1, 16)
    z, norm = sae.encode(rows), sae.token_norm(rows)
    assert (z > 0).sum(1).tolist() == [4] * len(rows)  # a real TopK encoding: every row has k latents
    edited = z.clone()
    edited[:, 5], edited[:, 9] = 1.75, 0.0
    # encode, set, decode (each token with its own scale), add the error term back
    literal = sae.decode(edited, norm) + (rows - sae.decode(z, norm))
    with torch.no_grad():
        out = SAEEdit("h", sae=sae, latents={5: 1.75, 9: 0.0}).apply(x)
        spliced = SAEEdit("h", sae=sae, keep_error=False).apply(x)
        same = SAEEdit("h", sae=sae, latents={}).apply(x)
    assert torch.equal(out[:, 0], x[:, 0]) and torch.equal(spliced[:, 0], x[:, 0])  # the BOS is left alone
    torch.testing.assert_close(out[:, 1:].reshape(-1, 16), literal, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(spliced[:, 1:].reshape(-1, 16), sae(rows).reconstruction)
    assert torch.equal(same, x)  # no latent changed: exactly x, not x̂ + (x − x̂) with its rounding
    assert (out - x).abs().max() > 0.1


def test_features_out_of_range_are_refused():
    from saelab.errors import SaelabError
    from saelab.steer import add_feature, clamp_feature

    sae = random_sae()
    with pytest.raises(SaelabError, match=r"latent 64 does not exist: topk-64-k4 has latents 0..63"):
        add_feature(sae, 64, 1.0)
    with pytest.raises(SaelabError, match=r"latent -1 does not exist"):
        clamp_feature(sae, -1, 1.0)


# ---- on the real model, with a tiny SAE trained on its activations ---------------------------------

HOOK = "blocks.26.hook_resid_post"
PROMPT = "import os\n\ndef main():\n    path ="


@pytest.fixture(scope="module")
def steer_run(smollm2, tmp_path_factory) -> Path:
    """24 contexts of SmolLM2's layer-26 residual stream, a TopK SAE (128 latents, k = 8) trained on them for
    128 steps, and its feature store. Layer 26 of 30: late enough that a latent's direct logit effect
    predicts what adding it does (at layer 15 a tiny SAE's logit effects predict little)."""
    from saelab.analysis.analyze import analyze
    from saelab.analysis.config import AnalyzeConfig
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import train

    root = tmp_path_factory.mktemp("steer")
    harvest(
        HarvestConfig(out=str(root / "store"), hooks=[HOOK], n_tokens=31 * 24, context_size=32, device="cpu"),
        model=smollm2,
        progress=False,
    )
    saes = [SAEConfig(architecture="topk", d_sae=128, k=8)]
    cfg = TrainConfig(
        store=str(root / "store"), out=str(root / "run"), saes=saes, n_tokens=32768, batch_size=256, device="cpu"
    )
    train(cfg, progress=False)
    small = {"top_n": 2, "window_before": 2, "window_after": 1, "n_bands": 2, "per_band": 1, "sample_size": 2}
    analyze(AnalyzeConfig(run=str(root / "run"), batch_size=31 * 8, **small), model=smollm2, progress=False)
    return root / "run"


@pytest.fixture(scope="module")
def sae(steer_run):
    from saelab.sae import load_sae

    return load_sae(steer_run / "saes" / "topk-128-k8")


@pytest.fixture(scope="module")
def store_latents(steer_run, sae) -> torch.Tensor:
    """The SAE's latents on every row of the run's store: `[rows, 128]`."""
    from saelab.harvest.store import ActivationStore

    store = ActivationStore(steer_run.parent / "store")
    with torch.no_grad():
        return sae.encode(store.rows(torch.arange(store.n_rows)))


@pytest.fixture(scope="module")
def tokens(smollm2) -> torch.Tensor:
    return smollm2.to_tokens(PROMPT)


def test_clamping_a_feature_to_its_current_value_leaves_the_logits_unchanged(smollm2, sae, tokens):
    from saelab.steer import ablate_feature, clamp_feature, steer

    n = tokens.shape[1]
    with torch.inference_mode():
        clean, cache = smollm2.run_with_cache(tokens, names_filter=[HOOK], return_cache_object=False)
        z = sae.encode(cache[HOOK][0])
        feature = int(z[n - 1].argmax())  # the strongest latent at the last position
        value = float(z[n - 1, feature])
        silent = int(torch.nonzero(z[1:].amax(0) == 0)[0])  # a latent that fires nowhere in the prompt
        # the last position alone: the prompt taken as n − 1 prompt tokens and one generated token
        with steer(smollm2, [clamp_feature(sae, feature, value, positions="generated")], prompt_length=n - 1):
            same = smollm2(tokens)
        with steer(smollm2, [clamp_feature(sae, feature, value + 2.0, positions="generated")], prompt_length=n - 1):
            moved = smollm2(tokens)
        with steer(smollm2, [ablate_feature(sae, silent)]):
            ablated = smollm2(tokens)
    assert value > 0
    assert (same - clean).abs().max() < 1e-4
    assert (ablated - clean).abs().max() < 1e-4
    assert (moved[0, -1] - clean[0, -1]).abs().max() > 1e-2  # the check can fail: a different value moves them
    assert (moved[0, :-1] - clean[0, :-1]).abs().max() < 1e-5  # and only at the position edited


def test_splicing_the_sae_with_its_error_is_the_clean_model_and_without_is_its_reconstruction(smollm2, sae, steer_run):
    from saelab.eval.ce_loss import next_token_loss_sum, spliced_loss_sum
    from saelab.harvest.store import ActivationStore
    from saelab.steer import splice_sae, steer

    store = ActivationStore(steer_run.parent / "store", verify=False)
    contexts = torch.stack([store.context_tokens(i) for i in (3, 17)]).long()  # [2, 32] of the corpus
    with torch.inference_mode():
        clean = smollm2(contexts)
        with steer(smollm2, [splice_sae(sae, keep_error=True)]) as steering:
            kept = smollm2(contexts)
        assert steering.outputs[HOOK].shape == (2, 32, 576)  # the hook did run
        with steer(smollm2, [splice_sae(sae)]):
            spliced = smollm2(contexts)
        reference = float(spliced_loss_sum(smollm2, contexts, HOOK, sae))
    assert (kept - clean).abs().max() < 1e-4
    assert float(next_token_loss_sum(spliced, contexts)) == pytest.approx(reference, rel=1e-5)
    assert (spliced - clean).abs().max() > 0.1  # the reconstruction is not the activation: the check is real


def test_interventions_compose_in_order_like_hand_written_hooks(smollm2, sae, tokens):
    from saelab.analysis.logit_effects import decoder_directions
    from saelab.steer import add_feature, clamp_feature, steer

    directions = decoder_directions(sae)
    early = "blocks.10.hook_resid_post"

    def reference_late(x: torch.Tensor, hook) -> torch.Tensor:  # add 3·d_5, then set latent 5 to 2.5, error kept
        out = x.clone()
        rows = out[0, 1:] + 3.0 * directions[5]
        z = sae.encode(rows)
        edited = z.clone()
        edited[:, 5] = 2.5
        out[0, 1:] = sae.decode(edited) + (rows - sae.decode(z))
        return out

    def reference_early(x: torch.Tensor, hook) -> torch.Tensor:  # add 1.5·d_5 on the prompt, BOS left alone
        out = x.clone()
        out[0, 1:] += 1.5 * directions[5]
        return out

    def run(interventions):
        with torch.inference_mode(), steer(smollm2, interventions):
            return smollm2(tokens)

    with torch.inference_mode(), smollm2.hooks(fwd_hooks=[(early, reference_early), (HOOK, reference_late)]):
        expected = smollm2(tokens)
    add, clamp = add_feature(sae, 5, 3.0), clamp_feature(sae, 5, 2.5)
    early_add = add_feature(sae, 5, 1.5, hook=early, positions="prompt")
    torch.testing.assert_close(run([add, clamp, early_add]), expected, atol=1e-3, rtol=0)
    assert (run([clamp, add, early_add]) - expected).abs().max() > 1e-2  # the other order is another edit


def test_adding_a_feature_raises_its_top_logit_token_monotonically(smollm2, sae, store_latents, tokens):
    from saelab.analysis.logit_effects import decoder_directions, final_norm_weight, logit_effects
    from saelab.steer import add_feature, steer

    weight, center = final_norm_weight(smollm2)
    effects = logit_effects(decoder_directions(sae), weight, smollm2.W_U, k=1, center=center)
    everything = (decoder_directions(sae) * weight) @ smollm2.W_U.detach()
    peaked = (effects.top_values[:, 0] - everything.mean(1)) / everything.std(1)
    maximum = store_latents.max(0).values
    peaked[maximum == 0] = -torch.inf  # a live latent
    feature = int(peaked.argmax())
    token = int(effects.top_ids[feature, 0])
    logprobs = []
    for coefficient in [0.0, 0.5, 1.0, 2.0, 4.0]:  # × the latent's max activation on the store
        with torch.inference_mode(), steer(smollm2, [add_feature(sae, feature, coefficient * float(maximum[feature]))]):
            logprobs.append(float(torch.log_softmax(smollm2(tokens)[0, -1], -1)[token]))
    assert all(a < b for a, b in zip(logprobs, logprobs[1:], strict=False)), (token, logprobs)
    assert logprobs[-1] - logprobs[0] > 3, (token, logprobs)


def test_hooks_are_gone_after_an_exception_in_the_block_or_in_a_hook(smollm2, sae, tokens):
    from saelab.errors import SaelabError
    from saelab.steer import add_feature, steer

    with torch.inference_mode():
        clean = smollm2(tokens)
    with pytest.raises(RuntimeError, match="inside the block"), torch.inference_mode():
        with steer(smollm2, [add_feature(sae, 5, 40.0), add_feature(sae, 5, 1.0, hook="blocks.3.hook_resid_pre")]):
            handles = {id(handle) for handles in smollm2.list_hooks().values() for handle in handles}
            assert len(handles) == 2  # attached while the block runs (list_hooks lists each under its aliases)
            assert (smollm2(tokens) - clean).abs().max() > 1
            raise RuntimeError("inside the block")
    assert smollm2.list_hooks() == {}
    wrong_width = AddDirection(HOOK, direction=torch.ones(7))
    with pytest.raises(SaelabError, match="carries vectors of size 576 but the steering direction has 7"):
        with torch.inference_mode(), steer(smollm2, [add_feature(sae, 5, 40.0), wrong_width]):
            smollm2(tokens)
    assert smollm2.list_hooks() == {}
    with pytest.raises(SaelabError, match=r"hook 'blocks.26.hook_resid_pots' is not a hook .*did you mean"):
        with steer(smollm2, [add_feature(sae, 5, 40.0), add_feature(sae, 5, 1.0, hook="blocks.26.hook_resid_pots")]):
            pass
    assert smollm2.list_hooks() == {}
    with torch.inference_mode():
        assert torch.equal(smollm2(tokens), clean)


def test_generation_matches_the_bridge_and_steers_only_generated_positions(smollm2, sae, tokens):
    from saelab.analysis.logit_effects import decoder_directions
    from saelab.steer import add_feature, generate, steer

    n = tokens.shape[1]
    greedy = generate(smollm2, tokens, max_new_tokens=3)
    bridge = smollm2.generate(tokens, max_new_tokens=3, do_sample=False, use_past_kv_cache=False, verbose=False)
    assert torch.equal(greedy, bridge) and greedy.shape == (1, n + 3)
    assert torch.equal(generate(smollm2, tokens, 3, do_sample=True, top_k=1, generator=torch.Generator()), greedy)
    sampled = [generate(smollm2, tokens, 3, do_sample=True, generator=torch.Generator().manual_seed(3)) for _ in "ab"]
    assert torch.equal(*sampled)

    direction = decoder_directions(sae)[5]

    def reference(x: torch.Tensor, hook) -> torch.Tensor:  # add 60·d_5 at the generated positions t ≥ n
        out = x.clone()
        out[:, n:] += 60.0 * direction
        return out

    with smollm2.hooks(fwd_hooks=[(HOOK, reference)]):
        expected = generate(smollm2, tokens, max_new_tokens=3)
    with steer(smollm2, [add_feature(sae, 5, 60.0, positions="generated")], prompt_length=n):
        steered = generate(smollm2, tokens, max_new_tokens=3)
    assert torch.equal(steered, expected)
    assert steered[0, n] == greedy[0, n]  # the first new token is predicted from the untouched prompt
    assert not torch.equal(steered, greedy)


# ---- experiments: config errors and `saelab steer` end to end ----------------------------------------


def test_steer_config_errors_name_the_key_and_the_fix(tmp_path):
    from saelab.analysis.feature_store import FeaturePage, write_feature_store
    from saelab.config import load_config
    from saelab.errors import ConfigError
    from saelab.steer import SteerConfig
    from saelab.steer.experiment import feature_scales

    path = tmp_path / "steer.yaml"
    path.write_text("features: [3]\nprompts: ['def f():']\ncoefficients: [0, 2]\n")
    cfg = load_config(SteerConfig, path, ["targets=[' open']", "positions=generated"])
    assert (cfg.features, cfg.prompts, cfg.coefficients, cfg.targets) == ([3], ["def f():"], [0.0, 2.0], [" open"])
    for overrides, message in [
        (["prompts=[]"], r"^prompts: empty; give at least one prompt, e\.g\. prompts: \['def read_file\(path\):'\]$"),
        (["features=[]"], r"^features: empty; list the SAE latents"),
        (["features=[3, -1]"], r"^features\[1\]: latent indices are ≥ 0, got -1$"),
        (["mode=steer"], r"^mode: 'steer' is not one of: add, clamp, ablate$"),
        (["positions=last"], r"^positions: 'last' is not one of: all, prompt, generated$"),
        (["coefficients=[]"], r"^coefficients: empty; mode add needs at least one"),
        (["name=../x"], r"^name: '\.\./x' must be a plain file name"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(SteerConfig, path, overrides)
    folder = tmp_path / "run" / "saes" / "topk-64-k4"
    with pytest.raises(ConfigError, match=r"^scale: max_activation reads .*features.sqlite, which does not exist; "):
        feature_scales(folder, [1], "max_activation")
    assert feature_scales(folder, [1, 4], "none") == {1: 1.0, 4: 1.0}

    sae = random_sae()  # input scale 0.37
    pages = [FeaturePage(i, 3, 0.1, 1.0, 2.5 * i, 0.1, [3], [], [], [], []) for i in range(64)]
    write_feature_store(folder / "features.sqlite", {"d_sae": 64, "input_scale": 0.37}, pages)
    assert feature_scales(folder, [1, 4], "max_activation", sae) == {1: 2.5, 4: 10.0}
    with pytest.raises(ConfigError, match=r"^features\[1\]: latent 0 never fired in .*pick a live latent or set"):
        feature_scales(folder, [1, 0], "max_activation", sae)
    write_feature_store(folder / "features.sqlite", {"d_sae": 64, "input_scale": 0.5}, pages)
    with pytest.raises(ConfigError, match=r"^scale: .* was made from another SAE \(d_sae 64, input scale 0.5\) than"):
        feature_scales(folder, [1], "max_activation", sae)


def test_bad_features_hooks_and_targets_fail_before_any_steering(smollm2, steer_run, monkeypatch, capsys):
    from saelab import cli
    from saelab.errors import ConfigError
    from saelab.steer import SteerConfig, run_steering

    base = {"run": str(steer_run), "sae": "topk-128-k8", "prompts": ["def f():"], "max_new_tokens": 1}
    for changes, message in [
        ({"features": [3, 128]}, r"^features\[1\]: latent 128 does not exist: topk-128-k8 has latents 0..127$"),
        ({"features": [3], "hook": "blocks.40.hook_resid_post"}, r"^hook: hook 'blocks.40.hook_resid_post' is not a"),
        ({"features": [3], "mode": "clamp", "hook": "blocks.3.hook_resid_post"}, r"^hook: mode clamp edits the SAE"),
        ({"features": [3], "targets": [" listdir"]}, r"^targets\[0\]: ' listdir' is 2 tokens \[' list', 'dir'\]; "),
    ]:
        with pytest.raises(ConfigError, match=message):
            run_steering(SteerConfig(**base, **changes), model=smollm2, progress=False)
    assert smollm2.list_hooks() == {} and not (steer_run / "steer").exists()

    monkeypatch.setattr("saelab.steer.experiment.load_model", lambda spec, device: smollm2)
    assert cli.main(["steer", f"run={steer_run}", "sae=topk-128-k8", "features=[999]", "prompts=[x]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["saelab steer: error: features[0]: latent 999 does not exist: topk-128-k8 has latents 0..127"]


def test_steer_cli_prints_the_table_and_writes_the_files(smollm2, sae, steer_run, store_latents, monkeypatch, capsys):
    from saelab import cli
    from saelab.config import load_config
    from saelab.steer import SteerConfig, add_feature, generate, steer

    monkeypatch.setattr("saelab.steer.experiment.load_model", lambda spec, device: smollm2)
    config = steer_run.parent / "steer.yaml"
    config.write_text(
        "sae: topk-128-k8\nfeatures: [5, 40]\ncoefficients: [0, 2]\nscale: max_activation\n"
        f"prompts: [{json.dumps(PROMPT)}]\ntargets: [' os', ':']\nmax_new_tokens: 3\nname: sweep\n"
    )
    assert cli.main(["steer", "--quiet", "--config", str(config), f"run={steer_run}"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "4 cells" in lines[0] and "sweep.jsonl" in lines[0]
    header = re.split(r"\s{2,}", lines[1].strip())
    assert header == ["feature", "coef", "prompt", "KL", "Δlogp os", "Δlogp :", "act", "generation"]
    table = [re.split(r"\s{2,}", line.strip(), maxsplit=7) for line in lines[2:]]
    assert [(row[0], row[1]) for row in table] == [("5", "0"), ("5", "2"), ("40", "0"), ("40", "2")]
    assert all(row[2] == "import os\\n\\ndef main…" for row in table)  # the prompt, on one line, cut
    assert table[0][3:7] == ["0.000", "+0.000", "+0.000", "0.00"]  # coefficient 0: nothing moves

    folder = steer_run / "steer"
    assert sorted(p.name for p in folder.iterdir()) == ["sweep.html", "sweep.jsonl", "sweep.yaml"]  # no temporaries
    rows = [json.loads(line) for line in (folder / "sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and load_config(SteerConfig, folder / "sweep.yaml").features == [5, 40]
    html = (folder / "sweep.html").read_text()
    assert "plotly" in html and "feature 40" in html and "log p(' os')" in html

    # every number of a steered cell, recomputed directly
    row = rows[1]
    maximum = float(store_latents[:, 5].max())
    assert row["scale"] == pytest.approx(maximum, rel=1e-6) and row["strength"] == pytest.approx(2 * maximum)
    tokens = smollm2.to_tokens(PROMPT)
    os_id, colon_id = (smollm2.tokenizer.encode(t, add_special_tokens=False)[0] for t in (" os", ":"))
    with torch.inference_mode():
        base = torch.log_softmax(smollm2(tokens)[0, -1], -1)
        with steer(smollm2, [add_feature(sae, 5, row["strength"])]) as steering:
            steered = torch.log_softmax(smollm2(tokens)[0, -1], -1)
            activation = float(sae.encode(steering.outputs[HOOK][0, -1:])[0, 5])
            continuation = generate(smollm2, tokens, 3)[0, tokens.shape[1] :].tolist()
    assert row["target_logprob"][" os"] == pytest.approx(float(steered[os_id]), abs=1e-5)
    assert row["delta_logprob"][":"] == pytest.approx(float(steered[colon_id] - base[colon_id]), abs=1e-5)
    assert row["kl"] == pytest.approx(float((steered.exp() * (steered - base)).sum()), abs=1e-5) and row["kl"] > 0
    assert row["activation_steered"] == pytest.approx(activation, abs=1e-5)
    assert row["activation_steered"] > row["activation_baseline"]
    assert row["generated_ids"] == continuation and row["generation"] == smollm2.tokenizer.decode(continuation)
    assert table[1][3:5] == [f"{row['kl']:.3f}", f"{row['delta_logprob'][' os']:+.3f}"]
    assert table[1][6] == f"{row['activation_steered']:.2f}"
    assert table[1][7] == json.dumps(row["generation"])[1:-1].strip()[:40]
    unsteered = rows[0]
    assert unsteered["kl"] == 0 and unsteered["generation"] == unsteered["baseline_generation"]
    assert unsteered["activation_steered"] == unsteered["activation_baseline"]


def test_steering_effect_equals_kl_and_logprob_rise_through_add_feature(smollm2, sae, tokens):
    """g-SAE's steering measure (benchmarks/paper_gsae.py, consistency.py) against the same edit made by
    saelab.steer's add_feature at every position but BOS, with KL from torch's kl_div."""
    import torch.nn.functional as F

    from saelab.analysis.logit_effects import decoder_directions, final_norm_weight, logit_effects
    from saelab.steer import add_feature, steer
    from saelab.steer.effect import PROMOTED_TOKENS, steering_effect

    other = smollm2.to_tokens("class Reader:\n    def read(self, path, mode):\n        return")
    contexts = torch.cat([tokens, other[:, : tokens.shape[1]]])
    latents, alpha = [3, 17, 64], 60.0  # strong enough to move the next-token distribution
    weight, center = final_norm_weight(smollm2)
    directions = decoder_directions(sae)
    promoted = logit_effects(directions[latents], weight, smollm2.W_U, k=PROMOTED_TOKENS, center=center).top_ids
    with torch.inference_mode():
        clean = torch.log_softmax(smollm2(contexts)[:, :-1].float(), -1)
        kls, rises = [], []
        for latent, top in zip(latents, promoted, strict=True):
            edit = add_feature(sae, latent, alpha / float(directions[latent].norm()), positions="all")
            with steer(smollm2, [edit]):
                steered = torch.log_softmax(smollm2(contexts)[:, :-1].float(), -1)
            kls.append(F.kl_div(clean, steered, log_target=True, reduction="none").sum(-1).mean())
            rises.append((steered[..., top] - clean[..., top]).mean())
        kl, rise = steering_effect(smollm2, sae, HOOK, contexts, latents, alpha)
    assert kl == pytest.approx(float(torch.stack(kls).mean()), rel=1e-3)
    assert rise == pytest.approx(float(torch.stack(rises).mean()), rel=1e-3, abs=1e-4)
    assert kl > 1e-3 and rise > 0  # the edit moved the model, toward the promoted tokens


# ---- how hard to steer: the largest strength within a KL budget ------------------------------------------


def test_the_strength_chosen_is_the_largest_whose_kl_stays_within_the_budget():
    from saelab.steer.strength import largest_within_budget

    def rows(*kls: float) -> list[dict]:
        return [{"coefficient": c, "kl": kl} for c, kl in zip((0.0, 0.5, 1.0, 2.0, 4.0), kls, strict=True)]

    assert largest_within_budget(rows(0, 0.1, 0.6, 1.5, 9), 1.0)["coefficient"] == 1.0
    assert largest_within_budget(rows(0, 0.1, 0.6, 0.9, 1.0), 1.0)["coefficient"] == 4.0  # at the budget: kept
    # KL that dips back under the budget past a break does not count: the text broke on the way
    assert largest_within_budget(rows(0, 0.1, 3.0, 0.5, 0.2), 1.0)["coefficient"] == 0.5
    assert largest_within_budget(rows(0, 0.1, float("nan"), 0.5, 0.2), 1.0)["coefficient"] == 0.5
    assert largest_within_budget(rows(0, 2.0, 3.0, 4.0, 5.0), 1.0) is None  # coefficient 0 is no steering
    assert largest_within_budget(list(reversed(rows(0, 0.1, 0.6, 1.5, 9))), 1.0)["coefficient"] == 1.0


def test_a_strength_sweep_is_saelab_steers_sweep_and_chooses_within_its_budget(smollm2, sae, steer_run):
    from saelab.steer import SteerConfig, run_steering
    from saelab.steer.strength import COEFFICIENTS, strength_sweep

    latent, budget = 5, 0.05
    tokens = smollm2.to_tokens(PROMPT)
    folder = steer_run / "saes" / "topk-128-k8"
    with torch.inference_mode():
        sweep = strength_sweep(smollm2, sae, folder, latent, PROMPT, tokens, budget=budget, max_new_tokens=3)
    assert [row["coefficient"] for row in sweep.rows] == list(COEFFICIENTS)
    kls = [row["kl"] for row in sweep.rows]
    assert kls[-1] > kls[0] > 0  # stronger moves the next token further
    # the same cells `saelab steer` measures
    cfg = SteerConfig(
        run=str(steer_run), sae="topk-128-k8", features=[latent], coefficients=list(COEFFICIENTS),
        scale="max_activation", prompts=[PROMPT], max_new_tokens=3, name="strength",
    )  # fmt: skip
    steered = run_steering(cfg, model=smollm2, progress=False).rows
    assert [row["kl"] for row in steered] == pytest.approx(kls, abs=1e-6)
    assert [row["generation"] for row in steered] == [row["generation"] for row in sweep.rows]
    assert sweep.scale == pytest.approx(steered[0]["scale"])
    # the choice: within the budget, and the next stronger one (if any) is not
    chosen = sweep.coefficient
    assert chosen is not None and sweep.chosen["kl"] <= budget, kls
    position = COEFFICIENTS.index(chosen)
    assert all(kl <= budget for kl in kls[: position + 1])
    assert position == len(COEFFICIENTS) - 1 or kls[position + 1] > budget
