"""The SAE family beyond TopK: standard (L1), JumpReLU, Gated, Matryoshka BatchTopK, transcoders.

Each variant's training step (`train_step`: the sparse kernels, the penalty, the loss) is held to a
plain-torch reference written from its paper's formula, on random float64 inputs with non-trivial
weights: the loss and the gradient of every parameter. JumpReLU's straight-through gradient is also
checked against its closed form, and Matryoshka's nested losses against a direct computation.
"""

from __future__ import annotations

import pytest
import torch

from saelab.errors import ConfigError
from saelab.kernels import selection
from saelab.kernels.sparse_ops import is_full
from saelab.sae import SAEConfig, build_sae
from saelab.sae.base import SparseAutoencoder
from saelab.sae.jumprelu import JumpReLUFunction, StepFunction
from saelab.train.config import TrainConfig
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.step import train_step

D_IN, D_OUT, D_SAE, K, BATCH = 12, 10, 64, 6, 48


def family_sae(architecture: str, **fields) -> SparseAutoencoder:
    """A float64 SAE with random non-zero biases, scales and (JumpReLU) thresholds."""
    transcoder = "transcoder" in architecture
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        d_out=D_OUT if transcoder else None,
        l1_coefficient=0.7,
        l0_coefficient=0.3,
        jumprelu_bandwidth=0.4,
        **fields,
    )
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.input_scale.fill_(0.7)
        sae.b_dec.copy_(torch.randn(cfg.output_width, generator=gen, dtype=torch.float64) * 0.3)
        sae.b_enc.copy_(torch.randn(D_SAE, generator=gen, dtype=torch.float64) * 0.2)
        sae.W_dec.mul_(torch.rand(D_SAE, 1, generator=gen, dtype=torch.float64) + 0.5)  # rows of unequal norms
        if sae.unit_norm_decoder:
            sae.normalize_decoder_()
        if transcoder:
            sae.target_scale.fill_(1.9)
        if architecture == "skip_transcoder":
            sae.W_skip.copy_(torch.randn(D_OUT, D_IN, generator=gen, dtype=torch.float64) * 0.1)
        if architecture == "jumprelu":
            sae.threshold.copy_(torch.rand(D_SAE, generator=gen, dtype=torch.float64) * 0.6 + 0.1)
        if architecture == "gated":
            sae.r_mag.copy_(torch.randn(D_SAE, generator=gen, dtype=torch.float64) * 0.3)
            sae.b_mag.copy_(torch.randn(D_SAE, generator=gen, dtype=torch.float64) * 0.2)
    return sae


def batch(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64) * 2
    return x, torch.randn(BATCH, D_OUT, generator=gen, dtype=torch.float64) * 0.5


def variance(y: torch.Tensor) -> torch.Tensor:
    return (y - y.mean(0)).pow(2).sum(-1).mean()


def fvu(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y_hat - y).pow(2).sum(-1).mean() / variance(y)


def reference_loss(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor, warmup: float) -> torch.Tensor:
    """The papers' losses in plain torch on the SAE's own parameters (no kernels, no saelab forward)."""
    arch, s = sae.cfg.architecture, sae.input_scale
    W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
    norms = W_dec.norm(dim=1)
    if arch in ("transcoder", "skip_transcoder"):
        t = sae.target_scale
        z = torch.relu(x * s @ W_enc + b_enc)
        y_hat = z @ W_dec + b_dec + (x * s @ sae.W_skip.T if arch == "skip_transcoder" else 0)
        penalty = sae.cfg.l1_coefficient * warmup * (z * norms).sum(-1).mean()
        return fvu(y_hat / t, y) + penalty / variance(y * t)
    centered = x * s - b_dec
    u = centered @ W_enc + b_enc
    if arch == "standard":
        z = torch.relu(u)
        penalty = sae.cfg.l1_coefficient * warmup * (z * norms).sum(-1).mean()
    elif arch == "jumprelu":
        theta = sae.threshold.expand_as(u)
        z = JumpReLUFunction.apply(u, theta, sae.cfg.jumprelu_bandwidth)
        l0 = StepFunction.apply(u.detach(), theta, 0.4).sum(-1)
        target = sae.cfg.target_l0  # Gemma Scope 2's quadratic penalty around it, when set
        penalty = sae.cfg.l0_coefficient * warmup * (l0 if target is None else 2 / target * (l0 - target) ** 2).mean()
    elif arch == "gated":
        magnitude = torch.relu(centered @ (W_enc * sae.r_mag.exp()) + sae.b_mag)
        z = (u > 0) * magnitude
        via_gate = torch.relu(u) @ W_dec.detach() + b_dec.detach()
        l1 = (torch.relu(u) * norms).sum(-1).mean()
        penalty = sae.cfg.l1_coefficient * warmup * l1 + (via_gate - x * s).pow(2).sum(-1).mean()
    x_hat = (z @ W_dec + b_dec) / s
    return fvu(x_hat, x) + penalty / variance(x * s)


def step_gradients(sae: SparseAutoencoder, x: torch.Tensor, y: torch.Tensor | None, warmup: float):
    """The loss and parameter gradients of one real `train_step` (lr 0: the weights stay)."""
    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    tracker = DeadLatentTracker(D_SAE, dead_tokens=10**9)
    metrics = train_step(sae, optimizer, x, None, tracker, 0.0, 0, target=y, penalty_scale=warmup)
    return metrics, {name: p.grad.clone() for name, p in sae.named_parameters() if p.grad is not None}


@pytest.fixture(params=["sparse", "dense"])
def selection_density(request, monkeypatch) -> str:
    """Run a test with AboveThreshold's kept pairs as padded sparse rows, and as full (dense) rows."""
    monkeypatch.setattr(selection, "DENSE_FRACTION", 1.0 if request.param == "sparse" else 0.0)
    return request.param


@pytest.mark.parametrize(
    "architecture,fields",
    [
        ("standard", {}),
        ("jumprelu", {}),
        ("jumprelu", {"target_l0": 7.0}),
        ("gated", {}),
        ("transcoder", {}),
        ("skip_transcoder", {}),
    ],
)
def test_a_training_step_has_the_papers_loss_and_gradients(architecture, fields, selection_density):
    x, y = batch()
    y = y if "transcoder" in architecture else None
    sae = family_sae(architecture, **fields)
    metrics, got = step_gradients(sae, x, y, warmup=0.6)

    reference = family_sae(architecture, **fields)
    loss = reference_loss(reference, x, x if y is None else y, warmup=0.6)
    params = {name: p for name, p in reference.named_parameters() if p.requires_grad}
    want = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    if reference.unit_norm_decoder:  # train_step drops the part along each unit row, which renormalising undoes
        W = reference.W_dec
        want["W_dec"] = want["W_dec"] - (want["W_dec"] * W).sum(1, keepdim=True) * W

    assert float(metrics["loss"]) == pytest.approx(loss.item(), rel=1e-9)
    assert 0 < float(metrics["l0"]) < D_SAE
    assert set(got) == set(want)
    for name in want:
        assert want[name].abs().max() > 0, f"{name}: the reference gives no gradient, so the test could not fail"
        torch.testing.assert_close(got[name], want[name], rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated", "transcoder", "skip_transcoder"])
def test_forward_is_the_reference_forward(architecture, selection_density):
    """`forward` (what eval and analysis run) reconstructs as the training step does."""
    x, _ = batch(3)
    sae = family_sae(architecture).eval()
    dense = sae(x)
    sparse = sae.sparse_forward(x)
    torch.testing.assert_close(sparse.reconstruction, dense.reconstruction, rtol=1e-9, atol=1e-9)
    assert 0 < (dense.latents > 0).sum(-1).double().mean() < D_SAE
    assert is_full(sparse.indices, D_SAE) == (selection_density == "dense")


def test_jumprelu_threshold_gradient_is_the_straight_through_formula():
    """∂/∂θ_i of Σ z (and of the L0) is −(θ_i/ε)·#{tokens with |u − θ_i| < ε/2} (and −(1/ε)·that count)."""
    gen = torch.Generator().manual_seed(4)
    u = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    theta = (torch.rand(8, generator=gen, dtype=torch.float64) * 0.5 + 0.2).requires_grad_()
    epsilon = 0.3
    z = JumpReLUFunction.apply(u, theta.expand_as(u), epsilon)
    (grad_z,) = torch.autograd.grad(z.sum(), theta)
    l0 = StepFunction.apply(u, theta.expand_as(u), epsilon)
    (grad_l0,) = torch.autograd.grad(l0.sum(), theta)

    near = ((u - theta.detach()).abs() < epsilon / 2).sum(0).double()
    assert near.min() > 0
    torch.testing.assert_close(grad_z, -(theta.detach() / epsilon) * near)
    torch.testing.assert_close(grad_l0, -near / epsilon)
    torch.testing.assert_close(z, u * (u > theta.detach()))


def test_jumprelu_sparse_step_keeps_every_pair_inside_the_estimator_window(selection_density):
    """Training selects u > θ − ε/2: pairs just below θ carry θ's gradient though their value is 0."""
    x, _ = batch(5)
    sae = family_sae("jumprelu")
    out = sae.sparse_forward(x)
    u = sae.pre_activations(x).detach()
    in_window = u > sae.threshold.detach() - sae.cfg.jumprelu_bandwidth / 2
    assert int(out.valid.sum()) == int(in_window.sum()) > int((u > sae.threshold.detach()).sum())


def test_matryoshka_nested_losses_are_each_prefix_reconstructing_alone():
    x, _ = batch(6)
    widths = [8, 24, D_SAE]
    sae = family_sae("matryoshka_batchtopk", matryoshka_widths=widths, input_norm="none")
    sae.train()
    out = sae.sparse_forward(x)
    # direct: the batch's top batch·k relu(u), then each prefix's latents alone through the decoder
    u = sae.pre_activations(x)
    z = torch.relu(u).flatten()
    kept = torch.zeros_like(z).scatter(0, z.topk(K * BATCH).indices, z.topk(K * BATCH).values).view_as(u)
    for width, nested in zip(widths[:-1], out.nested, strict=True):
        direct = (kept[:, :width] @ sae.W_dec[:width] + sae.b_dec) / sae.input_scale
        torch.testing.assert_close(nested, direct, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(direct, out.reconstruction)  # the prefix leaves latents out
    torch.testing.assert_close(out.reconstruction, (kept @ sae.W_dec + sae.b_dec) / sae.input_scale)

    optimizer = torch.optim.SGD(sae.parameters(), lr=0.0)
    tracker = DeadLatentTracker(D_SAE, dead_tokens=10**9)
    sae.threshold.zero_(), sae.threshold_weight.zero_()
    metrics = train_step(sae, optimizer, x, None, tracker, 0.0, 0)
    want = torch.stack([fvu(n, x) for n in out.nested] + [fvu(out.reconstruction, x)]).mean()
    assert float(metrics["loss"]) == pytest.approx(want.item(), rel=1e-9)
    assert float(metrics["fvu"]) == pytest.approx(fvu(out.reconstruction, x).item(), rel=1e-9)


def test_matryoshka_with_one_level_is_batchtopk():
    x, _ = batch(7)
    one_level = family_sae("matryoshka_batchtopk", matryoshka_widths=[D_SAE], input_norm="none")
    batchtopk = family_sae("batchtopk", input_norm="none")
    one_level.load_state_dict(batchtopk.state_dict())
    a, b = one_level.train().sparse_forward(x), batchtopk.train().sparse_forward(x)
    assert a.nested == []
    torch.testing.assert_close(a.reconstruction, b.reconstruction)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"architecture": "matryoshka_batchtopk", "matryoshka_widths": [32, 16, 64]}, "increase strictly"),
        ({"architecture": "matryoshka_batchtopk", "matryoshka_widths": [16, 32]}, "end at d_sae"),
        ({"architecture": "transcoder", "input_norm": "layer_norm"}, "input_norm: none"),
        ({"architecture": "jumprelu", "jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
        ({"architecture": "standard", "l1_coefficient": -1.0}, "l1_coefficient"),
    ],
)
def test_bad_family_configs_are_named(fields, message):
    with pytest.raises(Exception, match=message):
        SAEConfig(d_in=D_IN, d_sae=D_SAE, **fields).validate()


@pytest.mark.parametrize(
    "architecture, fast",
    [
        ("standard", {"b_enc"}),
        ("jumprelu", {"b_enc", "threshold"}),
        ("gated", {"b_enc", "r_mag", "b_mag"}),
        ("topk", set()),
    ],
)
def test_penalised_saes_train_their_per_latent_scalars_at_sqrt_d_in_times_the_lr(architecture, fast):
    sae = family_sae(architecture)
    names = {id(p): name for name, p in sae.named_parameters()}
    groups = {group["lr_scale"]: {names[id(p)] for p in group["params"]} for group in sae.parameter_groups()}
    assert groups.get(D_IN**0.5, set()) == fast
    assert groups[1.0] | groups.get(D_IN**0.5, set()) == {name for name, p in sae.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "sae, message",
    [
        (SAEConfig(architecture="transcoder"), "hook_name_out: a transcoder predicts another hook"),
        (SAEConfig(architecture="gsae", hook_name="blocks.3.hook_resid_mid"), "gsae reads the store's gradients"),
    ],
)
def test_a_sweep_that_cannot_be_fed_is_refused_by_name(sae, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(hook="blocks.3.hook_resid_post", saes=[sae]).validate()


def test_jumprelu_with_a_target_l0_starts_at_it():
    """`calibrate` puts each threshold at the quantile of its pre-activations that fires on T/d_sae of the
    sample, so the L0 starts at T, from unit decoder rows; without a target nothing moves (θ from 0.01)."""
    sample = torch.randn(4000, D_IN, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 0.5
    sae = build_sae(SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE, target_l0=5.0)).double()
    assert sae.W_dec.norm(dim=1).sub(1).abs().max() < 1e-6
    sae.calibrate(sample)
    fired = (sae.encode(sample) > 0).double()
    assert fired.sum(-1).mean() == pytest.approx(5.0, rel=0.02)
    assert fired.mean(0).sub(5.0 / D_SAE).abs().max() < 2 / 4000  # every latent at T/d_sae, within a row or two
    plain = build_sae(SAEConfig(architecture="jumprelu", d_in=D_IN, d_sae=D_SAE)).double()
    plain.calibrate(sample)
    assert torch.equal(plain.threshold, torch.full((D_SAE,), 0.01).double())  # built in float32, then cast
    assert plain.W_dec.norm(dim=1).sub(0.1).abs().max() < 1e-6
