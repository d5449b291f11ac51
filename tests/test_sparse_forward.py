"""Every SAE variant's `sparse_forward` (the kernels; what training runs) equals its dense `forward`.

float64 on random inputs, with non-trivial biases and input scale; tiled and untiled. Gradients of
every trainable parameter are compared too, as training is where the sparse path is used.
"""

from __future__ import annotations

import pytest
import torch

from saelab.sae import SAEConfig, base, build_sae
from saelab.sae.base import SparseAutoencoder
from saelab.train.loss import auxk_loss, normalized_mse

D_IN, D_SAE, K, BATCH = 12, 96, 5, 40


def float64_sae(architecture: str, **fields) -> SparseAutoencoder:
    """`gba-relu` is GBA with `activation: relu` (plain `gba` is its default JumpReLU); `-layer_norm` /
    `-scaled` set `input_norm` layer_norm / none (batchtopk's and gba's default is layer_norm, the others' none)."""
    if architecture == "gba-relu":
        architecture, fields = "gba", {"activation": "relu", **fields}
    for suffix, input_norm in (("-layer_norm", "layer_norm"), ("-scaled", "none")):
        if architecture.endswith(suffix):
            architecture, fields = architecture.removesuffix(suffix), {"input_norm": input_norm, **fields}
    cfg = SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=K, n_groups=4, **{"beta": 3.0, **fields})
    sae = build_sae(cfg, generator=torch.Generator().manual_seed(0)).double()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        sae.input_scale.fill_(0.6)
        sae.b_dec.copy_(torch.randn(D_IN, generator=gen, dtype=torch.float64) * 0.3)
        b_enc = torch.randn(D_SAE, generator=gen, dtype=torch.float64) * 0.2
        sae.b_enc.copy_(-b_enc.abs() - 0.1 if architecture == "gba" else b_enc)  # GBA's biases are ≤ 0
        if architecture == "batchtopk":
            sae.threshold.fill_(0.4)
    return sae


def inputs(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D_IN, generator=gen, dtype=torch.float64), torch.randn(
        BATCH, D_IN, generator=gen, dtype=torch.float64
    )


def gradients(sae: SparseAutoencoder, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    params = {name: p for name, p in sae.named_parameters() if p.requires_grad}
    return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))


@pytest.mark.parametrize("tile", [None, 40])
@pytest.mark.parametrize(
    "architecture,training",
    [
        ("topk", True),
        ("batchtopk", True),
        ("batchtopk", False),
        ("batchtopk-scaled", True),
        ("topk-layer_norm", True),
        ("gsae", True),
        ("gba", True),
        ("gba-scaled", True),
        ("gba-relu", True),
    ],
)
def test_sparse_forward_equals_dense_forward_and_its_gradients(architecture, training, tile):
    x, gradient = inputs()
    dense_sae, sparse_sae = float64_sae(architecture), float64_sae(architecture)
    dense_sae.train(training), sparse_sae.train(training)
    dense = dense_sae(x, gradient)
    sparse = sparse_sae.sparse_forward(x, gradient, tile=tile)
    torch.testing.assert_close(sparse.reconstruction, dense.reconstruction, rtol=1e-9, atol=1e-9)
    l0 = (dense.latents != 0).sum(-1).double().mean()
    assert (sparse.values > 0).sum(-1).double().mean() == l0 and 0 < l0 < D_SAE
    want = gradients(dense_sae, normalized_mse(dense.reconstruction, x))
    got = gradients(sparse_sae, normalized_mse(sparse.reconstruction, x))
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].abs().max() > 0, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-10, msg=name)
    if architecture.startswith("gba"):  # the sparse path observes u as it goes; the dense one is told to
        dense_sae.observe(dense.pre_activations.detach())
        assert sparse_sae.fires.sum() > 0
    for name, buffer in dense_sae.named_buffers():  # BatchTopK's θ, GBA's firing statistics
        torch.testing.assert_close(sparse_sae.get_buffer(name), buffer, msg=name)


def test_the_gradient_hook_changes_the_selection_in_the_sparse_path_too():
    x, gradient = inputs()
    sae = float64_sae("gsae", beta=50.0)
    with_gradient = sae.sparse_forward(x, gradient).indices.sort(-1).values
    without = sae.sparse_forward(x, None).indices.sort(-1).values
    assert not torch.equal(with_gradient, without)


@pytest.mark.parametrize("architecture", ["topk", "topk-layer_norm"])
@pytest.mark.parametrize("tile", [None, 24])
def test_sparse_auxk_equals_the_dense_auxk_loss_and_its_gradients(tile, architecture):
    x, _ = inputs()
    dead = torch.rand(D_SAE, generator=torch.Generator().manual_seed(4)) < 0.3
    dense_sae, sparse_sae = float64_sae(architecture), float64_sae(architecture)
    dense = dense_sae(x)
    residual = (x - dense.reconstruction).detach()
    dense_aux = auxk_loss(dense_sae, dense.pre_activations, residual, dead, k_aux=7, norm=dense_sae.token_norm(x))
    sparse = sparse_sae.sparse_forward(x, dead=dead, k_aux=7, tile=tile)
    sparse_aux = normalized_mse(sparse.aux_reconstruction, (x - sparse.reconstruction).detach())
    torch.testing.assert_close(sparse_aux, dense_aux)
    want, got = gradients(dense_sae, dense_aux), gradients(sparse_sae, sparse_aux)
    for name in ("W_enc", "b_enc", "W_dec"):
        assert want[name].abs().max() > 0
        torch.testing.assert_close(got[name], want[name], rtol=1e-7, atol=1e-10, msg=name)
    none_dead = float64_sae("topk").sparse_forward(x, dead=torch.zeros(D_SAE, dtype=torch.bool), k_aux=7)
    assert torch.count_nonzero(none_dead.aux_reconstruction) == 0


def test_the_reused_workspace_never_leaks_one_call_into_the_next():
    """sparse_forward reuses one buffer for u across calls (and tiles): other batch sizes, same answers."""
    sae = float64_sae("topk")
    x, _ = inputs()
    for rows, tile in ((40, None), (7, 24), (40, 24), (13, None)):
        got = sae.sparse_forward(x[:rows], tile=tile).reconstruction
        torch.testing.assert_close(got, sae(x[:rows]).reconstruction, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cuda_layout", [False, True])
@pytest.mark.parametrize("architecture", ["topk", "gba", "transcoder"])
def test_weight_gradients_arrive_in_their_parameters_layout(architecture, cuda_layout, monkeypatch):
    """On the CPU the weights are row-major (the CPU's fused Adam copies a transposed W_enc, and its
    gradient, there and back every step); on CUDA W_enc is column-major (`encoder_layout`, imposed here
    on the CPU). Gradients arrive in their weight's layout; GBA's tied W_enc is a view of W_decᵀ, whose
    gradient reaches W_dec row-major."""
    if cuda_layout:
        monkeypatch.setattr(base, "encoder_layout", lambda W_enc: W_enc.T.contiguous().T)
    fields = {"hook_name_out": "blocks.0.hook_mlp_out"} if architecture == "transcoder" else {}
    sae = float64_sae(architecture, **fields)  # laid out as it is built
    if cuda_layout and architecture != "gba":
        assert sae.W_enc.T.is_contiguous()
    x, _ = inputs()
    out = sae.sparse_forward(x)
    ((out.reconstruction - x) ** 2).sum().backward()
    weights = [sae.W_dec] + ([] if architecture == "gba" else [sae.W_enc])
    for weight in weights:
        assert (weight.is_contiguous() or cuda_layout) and weight.grad is not None
        assert weight.grad.stride() == weight.stride()


def test_a_column_major_encoder_trains_as_a_row_major_one(monkeypatch):
    """CUDA's W_enc layout, imposed on the CPU by `.to` (as a move to a GPU lays it out): three Adam steps
    give the weights the row-major SAE gets, and W_enc keeps its layout through them."""
    from saelab.train.dead_latents import DeadLatentTracker
    from saelab.train.step import train_step

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))

    def trained(sae: SparseAutoencoder) -> SparseAutoencoder:
        optimizer = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=True)
        tracker = DeadLatentTracker(48, dead_tokens=32)
        for _ in range(3):
            train_step(sae, optimizer, x, None, tracker, 1 / 32, 8)
        return sae

    row_major, column_major = (
        build_sae(SAEConfig(d_in=16, d_sae=48, k=4), generator=torch.Generator().manual_seed(0)) for _ in range(2)
    )
    monkeypatch.setattr(base, "encoder_layout", lambda W_enc: W_enc.T.contiguous().T)
    column_major = trained(column_major.to("cpu"))
    monkeypatch.undo()
    row_major = trained(row_major)
    assert row_major.W_enc.is_contiguous() and column_major.W_enc.T.is_contiguous()
    for name, weight in row_major.named_parameters():
        torch.testing.assert_close(dict(column_major.named_parameters())[name], weight, rtol=1e-5, atol=1e-6)
