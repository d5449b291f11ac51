"""SAE variants (TopK, BatchTopK, g-SAE, GBA) and the SAELens on-disk format, on small random inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from saelab.config import config_to_dict
from saelab.errors import ConfigError, SaelabError
from saelab.sae import (
    GBASAE,
    BatchTopKSAE,
    GradientTopKSAE,
    JumpReLUSAE,
    SAEConfig,
    SparseAutoencoder,
    StandardSAE,
    TopKSAE,
    build_sae,
    load_sae,
    save_sae,
)
from saelab.sae.topk import THRESHOLD_DECAY

D_IN, D_SAE, K = 16, 64, 4
ARCHITECTURES = [
    "topk",
    "batchtopk",
    "gsae",
    "gba",
    "gba-tied",
    "gba-relu",
    "topk-layer_norm",
    "batchtopk-scaled",
    "gba-tied-scaled",
]
FAMILY = [
    "standard",
    "standard-layer_norm",
    "jumprelu",
    "gated",
    "matryoshka_batchtopk",
    "transcoder",
    "skip_transcoder",
]


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(architecture: str = "topk", seed: int = 0, **fields) -> SparseAutoencoder:
    """`gba-relu` is GBA with `activation: relu`; `-layer_norm` / `-scaled` set `input_norm` layer_norm / none;
    `gba-tied` is GBA in the paper's tied form (these sizes are the reconstruction regime: untied by default)."""
    if architecture == "gba-relu":
        architecture, fields = "gba", {"activation": "relu", **fields}
    for suffix, input_norm in (("-layer_norm", "layer_norm"), ("-scaled", "none")):
        if architecture.endswith(suffix):
            architecture, fields = architecture.removesuffix(suffix), {"input_norm": input_norm, **fields}
    if architecture == "gba-tied":
        architecture, fields = "gba", {"tied": True, **fields}
    cfg = SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K, n_groups=4, **fields)
    return build_sae(cfg, generator=rng(seed))


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=rng(seed))


def positive(*shape: int, seed: int) -> torch.Tensor:
    """Pre-activations that are all > 0, so every selection rule has more candidates than it keeps."""
    return torch.rand(*shape, generator=rng(seed)) + 0.1


def perturb(sae: SparseAutoencoder, seed: int) -> SparseAutoencoder:
    """Non-trivial biases and input scale, so tests see every term of the forward pass."""
    with torch.no_grad():
        sae.input_scale.fill_(0.37)
        sae.b_dec.copy_(randn(D_IN, seed=seed))
        if sae.b_enc.requires_grad:
            sae.b_enc.copy_(0.1 * randn(D_SAE, seed=seed + 1))
        else:  # GBA: inside [bias_min, bias_max]
            sae.b_enc.copy_(-0.5 * torch.rand(D_SAE, generator=rng(seed + 1)))
    return sae


# --- shared base ---------------------------------------------------------------------------------


def test_forward_is_the_documented_formula():
    sae = perturb(make("topk"), seed=1)
    x = randn(32, D_IN, seed=2)
    out = sae(x)
    s = 0.37
    u = (x * s - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert torch.allclose(out.pre_activations, u, atol=1e-6)
    assert torch.allclose(out.reconstruction, (out.latents @ sae.W_dec + sae.b_dec) / s, atol=1e-6)


@pytest.mark.parametrize("architecture", ["topk", "gba-scaled", "batchtopk"])
def test_encode_rows_is_encode_in_chunks_on_the_cpu_in_float32(architecture):
    sae = perturb(make(architecture), seed=3).eval()
    x = randn(37, D_IN, seed=4)
    with torch.no_grad():
        expected = sae.encode(x)
    chunked = sae.encode_rows(x.double(), chunk_rows=8)  # 5 chunks, the last short; another dtype in
    assert chunked.dtype == torch.float32 and chunked.device.type == "cpu" and not chunked.requires_grad
    torch.testing.assert_close(chunked, expected, rtol=1e-6, atol=1e-6)  # matmuls of 8 rows round as they round
    assert (expected != 0).any()
    assert sae.encode_rows(x[:0]).shape == (0, D_SAE)


def test_normalize_decoder_gives_unit_rows_in_the_same_directions():
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=rng(1)) * 5 + 0.1)
    directions = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    sae.normalize_decoder_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-6)
    assert torch.allclose(sae.W_dec, directions, atol=1e-6)


def test_remove_decoder_parallel_grad_leaves_only_the_orthogonal_part():
    sae = make("topk")
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=rng(1)) * 5 + 0.1)  # need not be unit norm
    grad = randn(D_SAE, D_IN, seed=2)
    sae.W_dec.grad = grad.clone()
    sae.remove_decoder_parallel_grad_()
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    assert torch.allclose((sae.W_dec.grad * rows).sum(1), torch.zeros(D_SAE), atol=1e-5)
    expected = grad - (grad * rows).sum(1, keepdim=True) * rows
    assert torch.allclose(sae.W_dec.grad, expected, atol=1e-6)


# --- TopK ----------------------------------------------------------------------------------------


def test_topk_keeps_exactly_k_nonnegative_values_per_row_as_a_reference_does():
    sae = make("topk")
    u = positive(32, D_SAE, seed=1)
    z = sae.select(u)
    assert ((z != 0).sum(-1) == K).all()
    expected = torch.zeros_like(u)
    for row in range(u.shape[0]):
        for i in sorted(range(D_SAE), key=lambda i: -u[row, i].item())[:K]:
            expected[row, i] = u[row, i]
    assert torch.equal(z, expected)

    mixed = randn(32, D_SAE, seed=2)
    z = sae.select(mixed)
    assert (z >= 0).all() and ((z != 0).sum(-1) <= K).all()
    assert torch.equal(z, sae.select(mixed.relu()))


# --- BatchTopK -----------------------------------------------------------------------------------


def test_batchtopk_keeps_the_batch_k_largest_values_of_the_whole_batch_in_training():
    sae = make("batchtopk").train()
    u = positive(8, D_SAE, seed=1)
    z = sae.select(u)
    assert int((z != 0).sum()) == 8 * K
    assert ((z != 0).sum(-1) != K).any(), "per-row counts vary: the budget is shared across the batch"
    cutoff = u.flatten().sort(descending=True).values[8 * K - 1]
    assert torch.equal(z, u * (u >= cutoff))


def test_batchtopk_threshold_is_the_bias_corrected_weighted_mean_of_the_smallest_kept_values():
    sae = make("batchtopk").train()
    assert torch.equal(sae.threshold, torch.zeros(D_SAE))
    observed = []
    for seed in range(5):
        u = randn(8, D_SAE, seed=seed)
        z = sae.select(u)
        observed.append(z[z > 0].min().item())
        # by hand: weights λ^(T−t) over the T observations so far, normalised to sum to 1
        weights = [THRESHOLD_DECAY ** (len(observed) - 1 - t) for t in range(len(observed))]
        expected = sum(w * m for w, m in zip(weights, observed, strict=True)) / sum(weights)
        assert torch.allclose(sae.threshold, torch.full((D_SAE,), expected), rtol=1e-5)
        assert sae.threshold_weight.item() == pytest.approx(1 - THRESHOLD_DECAY ** len(observed), rel=1e-5)
    before = sae.threshold.clone()
    sae.select(-positive(8, D_SAE, seed=9))  # nothing positive kept: θ stays
    assert torch.equal(sae.threshold, before)


def test_batchtopk_state_saved_before_the_threshold_weight_existed_still_loads():
    old = make("batchtopk").state_dict()
    old["threshold"] = torch.full((D_SAE,), 0.7)
    del old["threshold_weight"]
    sae = make("batchtopk")
    sae.load_state_dict(old)
    assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.7)) and sae.threshold_weight.item() == 1.0


def test_batchtopk_eval_mode_uses_the_threshold_and_leaves_it_alone():
    sae = make("batchtopk").eval()
    sae.threshold.fill_(0.5)
    u = randn(8, D_SAE, seed=1)
    z = sae.select(u)
    assert torch.equal(z, u * (u > 0.5))
    assert (z != 0).sum() != 8 * K
    assert torch.equal(sae.threshold, torch.full((D_SAE,), 0.5))


@pytest.mark.parametrize("l0", [None, 2.5, 9.0])
def test_batchtopk_fit_threshold_gives_the_asked_mean_l0_on_the_fitting_tokens(l0):
    sae = perturb(make("batchtopk"), seed=3).eval()
    x = randn(200, D_IN, seed=4) * 3 + 1
    theta = sae.fit_threshold(x, l0)
    u = sae.pre_activations(x)
    wanted = K if l0 is None else l0
    # the reference: count by hand the pre-activations above θ; the forward must fire exactly those
    assert int((u > theta).sum()) == round(wanted * len(x))
    assert torch.equal(sae(x).latents != 0, (u > theta) & (u > 0))
    assert torch.equal(sae.threshold, torch.full((D_SAE,), theta)) and sae.threshold_weight.item() == 1.0
    with pytest.raises(ValueError, match="l0"):
        sae.fit_threshold(x, D_SAE)


# --- g-SAE ---------------------------------------------------------------------------------------


def test_gsae_with_beta_zero_or_no_gradient_is_topk_bit_for_bit():
    topk = perturb(make("topk", seed=3), seed=4)
    x, g = randn(32, D_IN, seed=5), randn(32, D_IN, seed=6)
    reference = topk(x)
    for beta, gradient in [(0.0, g), (2.0, None)]:
        gsae = perturb(make("gsae", seed=3, beta=beta), seed=4)
        assert torch.equal(gsae.W_enc, topk.W_enc)
        out = gsae(x, gradient)
        assert torch.equal(out.latents, reference.latents)
        assert torch.equal(out.reconstruction, reference.reconstruction)
    gsae = make("gsae", seed=3, beta=2.0)
    u = randn(32, D_SAE, seed=7)
    assert torch.equal(gsae.select(u, torch.zeros(32, D_IN)), TopKSAE.select(gsae, u)), "zero gradient rows: TopK"
    assert not torch.equal(gsae.select(u, g), TopKSAE.select(gsae, u)), "a gradient changes the selection"


def test_gsae_with_large_beta_selects_by_activation_times_gradient_alignment():
    gsae = make("gsae", beta=1e6)
    u, g = randn(32, D_SAE, seed=1), randn(32, D_IN, seed=2)
    z = gsae.select(u, g)
    relu = u.relu()
    cosine = (g @ gsae.W_dec.T) / (g.norm(dim=1, keepdim=True) * gsae.W_dec.norm(dim=1))
    chosen = (relu * cosine.abs()).topk(K, dim=-1).indices
    expected = torch.zeros_like(u).scatter(-1, chosen, relu.gather(-1, chosen))
    assert torch.equal(z, expected)
    assert not torch.equal(z, TopKSAE.select(gsae, u))


def test_gsae_score_at_beta_one_weighs_each_latent_by_one_plus_root_d_times_its_gradient_cosine():
    gsae = make("gsae", beta=1.0)
    u, g = positive(16, D_SAE, seed=1), 7.0 * randn(16, D_IN, seed=2)  # ‖g‖ is irrelevant: only its direction
    cosine = (g @ gsae.W_dec.T) / (g.norm(dim=1, keepdim=True) * gsae.W_dec.norm(dim=1))
    score = u * (1 + D_IN**0.5 * cosine.abs())
    chosen = score.topk(K, dim=-1).indices
    assert torch.equal(gsae.select(u, g), torch.zeros_like(u).scatter(-1, chosen, u.gather(-1, chosen)))
    changed = (gsae.select(u, g) != 0) & (TopKSAE.select(gsae, u) == 0)
    assert changed.sum(-1).float().mean() >= 1, "β = 1 reorders latents (a unit ĝ barely did)"


def test_gsae_values_are_the_activations_at_the_chosen_latents():
    gsae = make("gsae", beta=3.0)
    u, g = positive(32, D_SAE, seed=1), randn(32, D_IN, seed=2)
    z = gsae.select(u, g)
    assert ((z != 0).sum(-1) == K).all()
    assert torch.equal(z[z != 0], u[z != 0])


# --- GBA -----------------------------------------------------------------------------------------


def test_gba_groups_are_equal_random_and_carry_their_targets():
    sae = make("gba-tied", seed=1)
    assert torch.equal(torch.bincount(sae.group), torch.full((4,), D_SAE // 4))
    assert torch.equal(sae.target, torch.tensor(sae.cfg.group_targets())[sae.group])
    assert torch.equal(make("gba", seed=1).group, sae.group)
    assert not torch.equal(make("gba", seed=2).group, sae.group)
    assert not sae.b_enc.requires_grad
    sae(randn(8, D_IN, seed=3)).reconstruction.pow(2).sum().backward()
    assert sae.b_enc.grad is None and sae.W_dec.grad is not None and sae.output_scale.grad is not None
    assert "W_enc" not in dict(sae.named_parameters()), "tied: the encoder is the decoder"
    assert torch.equal(sae.W_enc, sae.W_dec.T)


def test_gba_paper_rule_lowers_an_overactive_latent_and_raises_a_dead_one():
    sae = make("gba", gamma=0.1, bias_min=-1.0, bias_max=0.0, update_tokens=100, bias_rule="paper")
    sae.b_enc.fill_(-0.5)
    u = randn(100, D_SAE, seed=1)
    busy, dead = int((sae.group == 0).nonzero()[0]), int((sae.group == 1).nonzero()[0])
    u[:, busy] = positive(100, seed=2)
    u[:, dead] = -positive(100, seed=3)
    dead_group = sae.group == 2  # a whole group that never fires
    u[:, dead_group] = -positive(100, int(dead_group.sum()), seed=4)
    sae.observe(u[:60])
    assert not sae.adaptation_due()
    sae.observe(u[60:])
    assert sae.adaptation_due()

    reach = u.max(0).values
    fired = (u > 0).any(0)
    sae.adapt_biases()
    metrics = sae.group_metrics()
    b = sae.b_enc
    assert b[busy].item() == pytest.approx(-0.5 - 0.1 * reach[busy].item(), abs=1e-6)
    same_group = (sae.group == sae.group[dead]) & fired
    assert b[dead].item() == pytest.approx(-0.5 + 0.1 * reach[same_group].mean().item(), abs=1e-6)
    up = 0.1 * reach[dead_group].abs().mean().item()
    assert torch.allclose(b[dead_group], torch.full((int(dead_group.sum()),), -0.5 + up), atol=1e-6)
    assert metrics["group2/freq"] == 0.0 and metrics["group0/target"] == sae.cfg.group_targets()[0]
    assert set(metrics) == {f"group{g}/{key}" for g in range(4) for key in ("freq", "target")}
    assert (sae.tokens_observed == 0).all() and int(sae.fires.sum()) == 0 and sae.max_pre_activation.isneginf().all()


def test_gba_balanced_rule_moves_each_bias_by_the_groups_reach_times_its_octave_miss():
    sae = make("gba", gamma=0.1, bias_min=-1.0, bias_max=0.0, update_tokens=400, target_high=0.3, target_low=0.05)
    assert sae.window.tolist() == [400] * 4, "every group's window: 400 tokens hold ≥ 10 expected firings"
    sae.b_enc.fill_(-0.5)
    u = randn(400, D_SAE, seed=1) - 1.0  # every latent fires now and then; a few never
    u[:, sae.group == 3] -= 10.0  # group 3 never fires
    u[:, sae.group == 0] += 3.0  # group 0 fires far too often
    sae.observe(u)
    before = sae.b_enc.clone()
    sae.adapt_biases()
    # by hand, latent by latent, in float64
    u64 = u.double()
    freq, reach = (u64 > 0).double().mean(0), u64.max(0).values
    for i in range(D_SAE):
        g = int(sae.group[i])
        members = sae.group == g
        fired = members & (freq > 0)
        r_bar = reach[fired].mean() if fired.any() else reach[members].abs().mean()
        target = sae.cfg.group_targets()[g]
        miss = 1.0 if freq[i] == 0 else max(-16.0, min(16.0, math.log2(target / freq[i].item())))
        expected = min(max(before[i].item() + 0.1 * r_bar.item() * miss, -1.0 * D_IN**0.5), 0.0)
        assert sae.b_enc[i].item() == pytest.approx(expected, abs=1e-5), i
    assert (sae.b_enc[sae.group == 3] > before[sae.group == 3]).all(), "a dead group is raised"
    assert (sae.b_enc[sae.group == 0] < before[sae.group == 0]).all(), "a group firing too often is lowered"


def test_gba_balanced_rule_scales_a_long_windows_step_by_the_batches_it_spans():
    short = make("gba", gamma=0.1, bias_min=-5.0, update_tokens=50, target_high=0.2, target_low=0.2)
    long = make("gba", gamma=0.1, bias_min=-5.0, update_tokens=25, target_high=0.2, target_low=0.2)
    assert short.window.tolist() == [50] * 4 and long.window.tolist() == [50] * 4  # 10 firings at 0.2: 50 tokens
    u = randn(50, D_SAE, seed=4)
    for sae in (short, long):
        sae.b_enc.fill_(-1.0)
        sae.observe(u)
        sae.adapt_biases()
    # the same window and data; the second spans two of its update_tokens, so it moves twice as far
    assert torch.allclose(long.b_enc + 1.0, 2 * (short.b_enc + 1.0), atol=1e-6) and (short.b_enc != -1.0).any()
    # …up to 16 of the paper's steps: a window of 50 batches moves at most 16 batches' worth
    capped = make("gba", gamma=0.1, bias_min=-50.0, update_tokens=1, target_high=0.2, target_low=0.2)
    capped.b_enc.fill_(-1.0)
    capped.observe(u)
    capped.adapt_biases()
    freq = (u > 0).double().mean(0)
    miss = torch.where(freq == 0, 1.0, torch.log2(0.2 / freq.clamp_min(1e-12))).float()
    step = (short.b_enc + 1.0) / miss  # γ·r̄_g, from the n_g = 1 update (every |miss| here is well below 16)
    assert torch.allclose(capped.b_enc + 1.0, step * (50 * miss).clamp(-16, 16), atol=1e-4)
    assert ((50 * miss).abs() > 16).any(), "some latents hit the cap"


def test_gba_biases_stay_within_bounds_through_many_random_updates():
    sae = make("gba", gamma=0.5, bias_min=-0.3, bias_max=0.1, update_tokens=64)
    generator = rng(1)
    lowest, highest = 0.0, 0.0
    for _ in range(200):
        shift = torch.rand((), generator=generator) * 10 - 5  # sometimes all fire, sometimes none
        spread = torch.rand(D_SAE, generator=generator) * 3
        sae.observe(shift + spread * torch.randn(64, D_SAE, generator=generator))
        sae.adapt_biases()
        low, high = sae.bias_bounds
        assert (sae.b_enc >= low).all() and (sae.b_enc <= high).all()
        lowest, highest = min(lowest, sae.b_enc.min().item()), max(highest, sae.b_enc.max().item())
    # the range is stated for unit-norm inputs and scaled to saelab's ‖x‖ ≈ √d_in
    assert sae.bias_bounds == pytest.approx((-0.3 * D_IN**0.5, 0.1 * D_IN**0.5))
    assert lowest == pytest.approx(sae.bias_bounds[0]) and highest == pytest.approx(sae.bias_bounds[1])


def test_gba_calibration_starts_each_group_at_its_target():
    sae = make("gba", bias_min=-100.0, target_high=0.3, target_low=0.03)
    sample = randn(4000, D_IN, seed=5) * 3 + 1
    sae.calibrate_biases(sample)
    fired = (sae.pre_activations(sample) > 0).float().mean(0)
    for group, target in enumerate(sae.cfg.group_targets()):
        measured = fired[sae.group == group]
        assert torch.allclose(measured, torch.full_like(measured, target), atol=2 / 4000), (group, measured)


@pytest.mark.parametrize("rule", ["paper", "balanced"])
def test_gba_with_frozen_weights_settles_every_group_near_its_target(rule):
    """The paper's rule: at or below each target (it only pushes down); balanced: within 1.5× either way."""
    cfg = dict(gamma=0.1, bias_min=-10.0, bias_max=0.0, target_high=0.2, target_low=0.02, update_tokens=2048)
    sae = make("gba", bias_rule=rule, **cfg)
    generator = rng(1)
    centres = torch.randn(8, D_IN, generator=generator) * 1.5
    metrics = {}
    for _ in range(40):
        which = torch.randint(0, 8, (2048,), generator=generator)
        x = centres[which] + 0.7 * torch.randn(2048, D_IN, generator=generator)
        sae.observe(sae.pre_activations(x))
        assert sae.adaptation_due()
        sae.adapt_biases()
        metrics = sae.group_metrics()
    for g, target in enumerate(sae.cfg.group_targets()):
        assert 0 < metrics[f"group{g}/freq"] <= 1.5 * target, (g, metrics)
        if rule == "balanced":
            assert metrics[f"group{g}/freq"] >= target / 1.5, (g, metrics)


def test_gba_rare_groups_adapt_over_windows_long_enough_to_see_them_fire():
    sae = make("gba", update_tokens=100, target_high=0.1, target_low=0.001)  # 4 groups: 0.1 … 0.001
    assert sae.window.tolist() == [math.ceil(10 / t) if t < 0.1 else 100 for t in sae.cfg.group_targets()]
    assert sae.window.tolist()[0] == 100 and sae.window.tolist()[-1] == 10_000
    sae.observe(randn(500, D_SAE, seed=1))
    before = sae.b_enc.clone()
    sae.adapt_biases()
    metrics = sae.group_metrics()
    assert set(metrics) == {"group0/freq", "group0/target", "group1/freq", "group1/target"}
    assert sae.tokens_observed.tolist() == [0, 0, 500, 500], "the rare groups keep counting"
    rare = sae.group >= 2
    assert torch.equal(sae.b_enc[rare], before[rare]) and not torch.equal(sae.b_enc[~rare], before[~rare])
    assert (sae.fires[rare] > 0).any() and (sae.fires[~rare] == 0).all()


def test_gba_state_dict_round_trip_keeps_its_buffers():
    sae = make("gba", seed=1, update_tokens=32)
    sae.observe(randn(32, D_SAE, seed=2))
    sae.adapt_biases()
    sae.observe(randn(20, D_SAE, seed=3))
    other = make("gba", seed=2)
    assert not torch.equal(other.group, sae.group)
    other.load_state_dict(sae.state_dict())
    for name in ("group", "target", "fires", "max_pre_activation", "tokens_observed", "b_enc"):
        assert torch.equal(getattr(other, name), getattr(sae, name)), name
    assert torch.equal(other.tokens_observed, sae.tokens_observed) and other.tokens_observed.max() > 20


def test_gba_jumprelu_gates_with_the_bias_but_outputs_the_whole_projection_times_its_scale():
    sae = perturb(make("gba-tied-scaled"), seed=1)  # the literal formula with one input scale s = 0.37
    with torch.no_grad():
        sae.output_scale.copy_(torch.rand(D_SAE, generator=rng(7)) + 0.5)
    x = randn(32, D_IN, seed=2)
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)  # tied: one unit vector per latent
    projection = (x * 0.37 - sae.b_dec) @ w.T  # w_i · (x·s − b_dec), no bias
    gate = projection + sae.b_enc > 0
    z = sae(x).latents
    assert torch.allclose(z, sae.output_scale * projection * gate, atol=1e-6) and gate.any()
    assert torch.allclose(sae(x).reconstruction, (z @ sae.W_dec + sae.b_dec) / 0.37, atol=1e-5)
    relu = perturb(make("gba-relu", tied=False, input_norm="none"), seed=1)
    untied = (x * 0.37 - relu.b_dec) @ relu.W_enc + relu.b_enc
    assert torch.allclose(relu(x).latents, untied.relu(), atol=1e-6)


@pytest.mark.parametrize("architecture", ["gba-tied", "gba", "gba-relu", "topk"])
def test_optimiser_groups_hold_every_trainable_parameter_once_and_speed_up_gba_output_scales(architecture):
    sae = make(architecture, **({"tied": False} if architecture == "gba-relu" else {}))
    groups = sae.parameter_groups()
    listed = [id(p) for group in groups for p in group["params"]]
    assert sorted(listed) == sorted(id(p) for p in sae.parameters() if p.requires_grad)
    scales = {id(p): group["lr_scale"] for group in groups for p in group["params"]}
    if architecture == "gba-tied":
        assert scales.pop(id(sae.output_scale)) == pytest.approx(D_IN**0.5)
    assert set(scales.values()) == {1.0}


def test_a_fixed_gba_output_scale_and_b_dec_leave_only_the_directions_to_train(tmp_path):
    assert {name for name, p in make("gba-tied", output_scale=0.02).named_parameters() if p.requires_grad} == {
        "W_dec",
        "b_dec",
    }
    sae = make("gba-tied", output_scale=0.02, train_b_dec=False)
    trainable = {name for name, p in sae.named_parameters() if p.requires_grad}
    assert trainable == {"W_dec"} and torch.equal(sae.output_scale, torch.full((D_SAE,), 0.02))
    assert [group["lr_scale"] for group in sae.parameter_groups()] == [1.0]
    perturb(sae, seed=3)
    save_sae(sae.eval(), tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.output_scale == 0.02 and not loaded.output_scale.requires_grad
    assert not loaded.b_dec.requires_grad
    x = randn(32, D_IN, seed=4)
    torch.testing.assert_close(loaded(x).latents, sae(x).latents)
    with pytest.raises(ConfigError, match="output_scale"):
        SAEConfig(architecture="gba", output_scale=0.0).validate()


def test_gba_takes_the_papers_tied_small_scale_form_only_where_its_ladder_outfires_d_in():
    """The analysis regime (the paper's toy: L0 ≈ 205 in d 42): tied, every a_i fixed at 0.01; the reconstruction
    regime (SmolLM2: L0 32 in d 576): untied, its own encoder; `tied` and `output_scale` override either."""
    toy = SAEConfig(architecture="gba", d_in=42, d_sae=2048, n_groups=10, target_high=0.5, target_low=1e-3)
    assert toy.ladder_l0() == pytest.approx(205, abs=1) and toy.gba_regime == "analysis"
    sae = build_sae(toy, rng(0))
    assert "W_enc" not in dict(sae.named_parameters()) and not sae.output_scale.requires_grad
    assert torch.equal(sae.output_scale, torch.full((2048,), 0.01))
    trained = build_sae(SAEConfig(**{**vars(toy), "output_scale": "trained"}), rng(0))
    assert trained.output_scale.requires_grad and float(trained.output_scale.detach()[0]) == pytest.approx(0.1)

    llm = SAEConfig(architecture="gba", d_in=576, d_sae=4608, target_l0=32)
    assert llm.ladder_l0() == pytest.approx(32) and llm.gba_regime == "reconstruction"
    sae = build_sae(llm, rng(0))
    assert "W_enc" in dict(sae.named_parameters()) and not hasattr(sae, "output_scale")
    tied = build_sae(SAEConfig(**{**vars(llm), "tied": True}), rng(0))
    assert "W_enc" not in dict(tied.named_parameters()) and tied.output_scale.requires_grad

    near = SAEConfig(architecture="gba", d_in=31, d_sae=4608, target_l0=32)
    assert near.gba_regime == "analysis" and SAEConfig(**{**vars(near), "d_in": 33}).gba_regime == "reconstruction"


def test_a_gba_folder_saved_before_the_jumprelu_form_loads_as_the_relu_sae_it_was(tmp_path):
    sae = trained_looking("gba-relu").eval()
    save_sae(sae, tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["saelab_config"]["activation"], cfg["metadata"]["saelab_config"]["bias_rule"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.activation == "relu" and cfg["architecture"] == "standard"
    x = randn(16, D_IN, seed=3)
    assert torch.allclose(loaded(x).reconstruction, sae(x).reconstruction, atol=1e-5)


# --- the SAELens format --------------------------------------------------------------------------


def trained_looking(architecture: str) -> SparseAutoencoder:
    sae = perturb(make(architecture, seed=1, hook_name="blocks.3.hook_resid_post", model_name="tiny"), seed=2)
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.3)
    if isinstance(sae, GBASAE):
        sae.observe(randn(50, D_SAE, seed=3))
    with torch.no_grad():
        for name, parameter in sae.named_parameters():
            if name in ("threshold", "r_mag", "b_mag", "W_skip"):  # the family's own parameters, non-trivial
                parameter.copy_(
                    0.2 * torch.rand(parameter.shape, generator=rng(7)) + (0.1 if name == "threshold" else -0.1)
                )
        if hasattr(sae, "target_scale"):
            sae.target_scale.fill_(2.3)
    return sae


def sae_lens_forward(
    weights: dict[str, torch.Tensor], architecture: str, x: torch.Tensor, k: int = K, normalize: str = "none"
):
    """SAELens's inference, written out: no input scale, b_dec subtracted from the input; with normalize
    "layer_norm" its run_time_activation_ln_in/_out around it."""
    mu, std = torch.zeros(()), torch.ones(())
    if normalize == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        x = (x - mu) / (std + 1e-5)
    u = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    if architecture == "topk":
        top = u.topk(k, dim=-1)
        z = torch.zeros_like(u).scatter(-1, top.indices, top.values.relu())
    elif architecture == "jumprelu":
        z = u.relu() * (u > weights["threshold"])
    else:
        z = u.relu()
    return z, (z @ weights["W_dec"] + weights["b_dec"]) * std + mu


@pytest.mark.parametrize("architecture", ARCHITECTURES + FAMILY)
def test_save_then_load_gives_the_same_sae(tmp_path, architecture):
    sae = trained_looking(architecture).eval()
    save_sae(sae, tmp_path / "sae")
    loaded = load_sae(tmp_path / "sae")
    # every key the variant reads comes back (saved configs hold only those: `SAEConfig.own_keys`)
    assert type(loaded) is type(sae) and config_to_dict(loaded.cfg) == config_to_dict(sae.cfg) and not loaded.training
    assert torch.equal(loaded.input_scale, sae.input_scale)
    for name, buffer in sae.named_buffers():
        assert torch.equal(loaded.get_buffer(name), buffer), name
    x, g = randn(64, D_IN, seed=4), randn(64, D_IN, seed=5)
    expected, got = sae(x, g), loaded(x, g)
    assert torch.equal(got.latents != 0, expected.latents != 0)
    assert torch.allclose(got.latents, expected.latents, atol=1e-5)
    assert torch.allclose(got.reconstruction, expected.reconstruction, atol=1e-5)
    assert list(tmp_path.iterdir()) == [tmp_path / "sae"], "no temporary folder left behind"


@pytest.mark.parametrize(
    "architecture, saved_as",
    [
        ("topk", "topk"),
        ("gsae", "topk"),
        ("gba", "jumprelu"),
        ("gba-scaled", "jumprelu"),
        ("gba-relu", "standard"),
        ("batchtopk", "jumprelu"),
        ("batchtopk-scaled", "jumprelu"),
        ("topk-layer_norm", "topk"),
    ],
)
def test_saved_folder_is_what_saelens_reads_and_reproduces_saelab(tmp_path, architecture, saved_as):
    sae = trained_looking(architecture).eval()
    save_sae(sae, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == saved_as
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D_IN, D_SAE, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is True and cfg["rescale_acts_by_decoder_norm"] is False
    assert cfg["normalize_activations"] == sae.cfg.input_norm and cfg["reshape_activations"] == "none"
    assert cfg.get("k") == (K if saved_as == "topk" else None)
    meta = cfg["metadata"]
    assert (meta["hook_name"], meta["model_name"]) == ("blocks.3.hook_resid_post", "tiny")
    assert meta["saelab_architecture"] == sae.cfg.architecture
    assert meta["saelab_input_scale"] == pytest.approx(0.37)

    weights = safetensors.torch.load_file(tmp_path / "sae" / "sae_weights.safetensors")
    names = {"W_enc", "W_dec", "b_enc", "b_dec"} | ({"threshold"} if saved_as == "jumprelu" else set())
    assert set(weights) == names
    assert weights["W_enc"].shape == (D_IN, D_SAE) and weights["W_dec"].shape == (D_SAE, D_IN)
    x = randn(64, D_IN, seed=4)
    z, reconstruction = sae_lens_forward(weights, saved_as, x, normalize=cfg["normalize_activations"])
    out = sae(x)
    assert torch.equal(z != 0, out.latents != 0)
    assert torch.allclose(reconstruction, out.reconstruction, atol=1e-4)
    if sae.cfg.architecture != "gba":  # GBA's saved W_enc always differs: its unit rows times a (module docstring)
        folded = not torch.allclose(weights["W_enc"], sae.W_enc.detach())
        assert folded == (sae.cfg.input_norm == "none"), "the input scale is folded in unless tokens are normalised"


def write_sae_lens_folder(folder: Path, architecture: str, seed: int, **fields) -> dict[str, torch.Tensor]:
    """A folder as SAELens 6.54.12's save_model writes it (OFFLINE.md): no saelab fields."""
    weights = {
        "W_enc": randn(D_IN, D_SAE, seed=seed),
        "W_dec": randn(D_SAE, D_IN, seed=seed + 1),  # rows not unit norm
        "b_enc": 0.1 * randn(D_SAE, seed=seed + 2),
        "b_dec": randn(D_IN, seed=seed + 3),
    }
    if architecture == "jumprelu":
        weights["threshold"] = torch.rand(D_SAE, generator=rng(seed + 4))
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.54.12",
            "sae_lens_training_version": "6.54.12",
            "hook_name": "blocks.5.hook_resid_post",
            "model_name": "SmolLM2-135M",
        },
        "rescale_acts_by_decoder_norm": False,
        "architecture": architecture,
    } | fields
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(weights, folder / "sae_weights.safetensors")
    return weights


def test_a_topk_sae_written_by_saelens_loads_and_computes_saelens_formula(tmp_path):
    weights = write_sae_lens_folder(tmp_path / "sae", "topk", seed=1, k=K)
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, TopKSAE) and not isinstance(sae, GradientTopKSAE)
    assert (sae.cfg.k, sae.cfg.hook_name, sae.cfg.model_name) == (K, "blocks.5.hook_resid_post", "SmolLM2-135M")
    x = randn(64, D_IN, seed=9)
    u = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    top = u.topk(K, dim=-1)
    z = torch.zeros_like(u).scatter(-1, top.indices, top.values.relu())
    out = sae(x)
    assert torch.equal(out.latents, z)
    assert torch.equal(out.reconstruction, z @ weights["W_dec"] + weights["b_dec"])


def test_a_layer_norm_saelens_folder_runs_as_saelens_runs_it(tmp_path):
    weights = write_sae_lens_folder(tmp_path / "sae", "topk", seed=1, k=K, normalize_activations="layer_norm")
    sae = load_sae(tmp_path / "sae")
    assert sae.cfg.input_norm == "layer_norm"
    x = 3 * randn(64, D_IN, seed=9) + 0.7
    z, reconstruction = sae_lens_forward(weights, "topk", x, normalize="layer_norm")
    out = sae(x)
    assert torch.equal(out.latents != 0, z != 0)
    torch.testing.assert_close(out.latents, z)
    torch.testing.assert_close(out.reconstruction, reconstruction, rtol=1e-4, atol=1e-4)


def test_layer_norm_is_the_per_token_standardisation_written_out():
    sae = trained_looking("topk-layer_norm").eval()
    x = 3 * randn(64, D_IN, seed=6) + 1.5  # off-centre and not unit scale, so both halves of the map matter
    mu = x.mean(-1, keepdim=True)
    sigma = (x - mu).std(-1, keepdim=True) + 1e-5
    u = ((x - mu) / sigma - sae.b_dec) @ sae.W_enc + sae.b_enc
    top = u.topk(K, dim=-1)
    z = torch.zeros_like(u).scatter(-1, top.indices, top.values.relu())
    out = sae(x)
    torch.testing.assert_close(out.latents, z)
    torch.testing.assert_close(out.reconstruction, (z @ sae.W_dec + sae.b_dec) * sigma + mu)
    shifted = sae(5 * x - 2)  # a token's scale and offset leave its code unchanged and move x̂ with it
    torch.testing.assert_close(shifted.latents, out.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shifted.reconstruction, 5 * out.reconstruction - 2, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("architecture", ["batchtopk", "gba"])  # the two whose default is now layer_norm
def test_a_folder_saved_before_input_norm_loads_with_the_scale_it_was_trained_with(tmp_path, architecture):
    sae = trained_looking(f"{architecture}-scaled").eval()
    save_sae(sae, tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["metadata"]["saelab_config"]["input_norm"]  # as saelab wrote it before the field existed
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "sae")
    assert loaded.cfg.input_norm == "none" and SAEConfig(architecture=architecture).input_norm == "layer_norm"
    x = randn(64, D_IN, seed=4)
    torch.testing.assert_close(loaded(x).reconstruction, sae(x).reconstruction)


@pytest.mark.parametrize("architecture", ARCHITECTURES + FAMILY)
def test_a_folder_saved_with_every_variants_keys_loads_unchanged(tmp_path, architecture):
    """Before each variant declared its keys, saelab saved all of SAEConfig's, other variants' included (a
    user's `beta` on a GBA among them, ignored then as now): such a folder loads as the same SAE."""
    save_sae(trained_looking(architecture), tmp_path / "sae")
    today = load_sae(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    every_key = {field: getattr(SAEConfig(), field) for field in SAEConfig.__dataclass_fields__}
    every_key = json.loads(json.dumps(every_key | {"beta": 5.0, "l1_coefficient": 9.0}))  # as JSON holds them
    saved = cfg["metadata"]["saelab_config"]
    assert set(saved) < set(every_key), "today's folders hold the variant's own keys only"
    cfg["metadata"]["saelab_config"] = every_key | saved
    cfg_path.write_text(json.dumps(cfg))
    loaded = load_sae(tmp_path / "sae")
    assert type(loaded) is type(today) and config_to_dict(loaded.cfg) == config_to_dict(today.cfg)
    x = randn(64, D_IN, seed=5)
    assert torch.equal(loaded(x).reconstruction, today(x).reconstruction)


@pytest.mark.parametrize("architecture, cls", [("standard", StandardSAE), ("jumprelu", JumpReLUSAE)])
def test_relu_and_jumprelu_saes_written_by_saelens_load(tmp_path, architecture, cls):
    weights = write_sae_lens_folder(tmp_path / "sae", architecture, seed=1)
    sae = load_sae(tmp_path / "sae")
    assert isinstance(sae, cls)
    x = randn(64, D_IN, seed=9)
    z, reconstruction = sae_lens_forward(weights, architecture, x)
    assert torch.equal(sae(x).latents != 0, z != 0)
    assert torch.allclose(sae(x).reconstruction, reconstruction, atol=1e-5)


def test_a_saelens_sae_without_b_dec_on_the_input_loads_with_the_bias_folded(tmp_path):
    weights = write_sae_lens_folder(tmp_path / "sae", "jumprelu", seed=1, apply_b_dec_to_input=False)
    sae = load_sae(tmp_path / "sae")
    x = randn(64, D_IN, seed=9)
    u = x @ weights["W_enc"] + weights["b_enc"]
    z = u.relu() * (u > weights["threshold"])
    assert torch.allclose(sae(x).latents, z, atol=1e-5)
    assert torch.allclose(sae(x).reconstruction, z @ weights["W_dec"] + weights["b_dec"], atol=1e-5)


def test_saving_replaces_an_earlier_sae_but_never_a_folder_of_other_files(tmp_path):
    save_sae(trained_looking("topk"), tmp_path / "sae")
    newer = make("gba", seed=5)
    save_sae(newer, tmp_path / "sae")
    assert isinstance(load_sae(tmp_path / "sae"), GBASAE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(SaelabError, match="todo.txt"):
        save_sae(newer, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_a_failed_save_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(tensors, metadata=None):
        raise OSError("disk went away")

    monkeypatch.setattr(safetensors.torch, "save", broken)
    with pytest.raises(OSError, match="disk went away"):
        save_sae(make("topk"), tmp_path / "sae")
    assert list(tmp_path.iterdir()) == []


def corrupt(folder: Path, how: str) -> Path:
    """Break a saved SAE folder one way; returns the file the error must name."""
    cfg_path, weights_path = folder / "cfg.json", folder / "sae_weights.safetensors"
    if how == "no cfg.json":
        cfg_path.unlink()
        return cfg_path
    if how == "cfg.json not JSON":
        cfg_path.write_text("{not json")
        return cfg_path
    if how == "unknown architecture":
        cfg = json.loads(cfg_path.read_text())
        del cfg["metadata"]["saelab_config"]
        cfg["architecture"] = "matching_pursuit"
        cfg_path.write_text(json.dumps(cfg))
        return cfg_path
    if how == "bad saelab config":
        cfg = json.loads(cfg_path.read_text())
        cfg["metadata"]["saelab_config"]["k"] = -3
        cfg_path.write_text(json.dumps(cfg))
        return cfg_path
    if how == "no weights":
        weights_path.unlink()
        return weights_path
    if how == "weights truncated":
        weights_path.write_bytes(weights_path.read_bytes()[:100])
        return weights_path
    weights = safetensors.torch.load_file(weights_path)
    if how == "tensor missing":
        del weights["b_dec"]
    else:  # "shape mismatch"
        weights["W_enc"] = weights["W_enc"][:, :32].contiguous()
    safetensors.torch.save_file(weights, weights_path)
    return weights_path


@pytest.mark.parametrize(
    "how",
    [
        "no cfg.json",
        "cfg.json not JSON",
        "unknown architecture",
        "bad saelab config",
        "no weights",
        "weights truncated",
        "tensor missing",
        "shape mismatch",
    ],
)
def test_a_broken_folder_is_a_saelab_error_naming_the_file(tmp_path, how):
    save_sae(trained_looking("topk"), tmp_path / "sae")
    named = corrupt(tmp_path / "sae", how)
    with pytest.raises(SaelabError) as error:
        load_sae(tmp_path / "sae")
    assert str(named) in str(error.value)


def test_a_missing_folder_is_a_saelab_error(tmp_path):
    with pytest.raises(SaelabError, match="cfg.json"):
        load_sae(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "fields",
    [{}, {"k": D_SAE + 1}, {"k": 4, "normalize_activations": "expected_average_only_in"}, {"k": 4, "d_sae": "64"}],
    ids=["no k", "k above d_sae", "normalised activations", "d_sae not an integer"],
)
def test_a_saelens_folder_saelab_cannot_run_is_a_saelab_error_naming_cfg_json(tmp_path, fields):
    write_sae_lens_folder(tmp_path / "sae", "topk", seed=1, **fields)
    with pytest.raises(SaelabError) as error:
        load_sae(tmp_path / "sae")
    assert str(tmp_path / "sae" / "cfg.json") in str(error.value)


def test_gba_groups_are_as_equal_as_d_sae_allows():
    sae = build_sae(SAEConfig(architecture="gba", d_in=D_IN, d_sae=64, n_groups=10), generator=rng(4))
    sizes = torch.bincount(sae.group, minlength=10)
    assert sizes.sum() == 64 and sizes.max() - sizes.min() <= 1 and sizes.min() == 6
    targets = torch.tensor(sae.cfg.group_targets())
    assert torch.equal(sae.target, targets[sae.group].to(sae.target.dtype))
