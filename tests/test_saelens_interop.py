"""Round trips with the real SAELens package, for every architecture saelab and SAELens share.

SAELens is not a saelab dependency: these tests run in the benchmark environment (`make bench-env`,
which `make test` builds and runs this file in) and are skipped where `sae_lens` is not installed.

- saved by saelab → `sae_lens.saes.sae.SAE.load_from_disk` → the same latents and reconstruction;
- saved by SAELens (`save_model` of its own class, random non-trivial weights) → `saelab.sae.load_sae`
  → the same latents and reconstruction.
"""

from __future__ import annotations

import pytest
import torch

from saelab.sae import SAEConfig, build_sae, load_sae, save_sae
from saelab.sae.base import SparseAutoencoder

sae_lens = pytest.importorskip("sae_lens")
from sae_lens.saes.sae import SAE  # noqa: E402

D_IN, D_OUT, D_SAE, K = 16, 12, 48, 6
# saelab architecture (with input_norm) → the SAELens architecture it is saved as
SHARED = {
    "topk": "topk",
    "topk-layer_norm": "topk",
    "gsae": "topk",
    "batchtopk": "jumprelu",
    "gba": "jumprelu",
    "standard": "standard",
    "standard-layer_norm": "standard",
    "jumprelu": "jumprelu",
    "gated": "gated",
    "matryoshka_batchtopk": "jumprelu",
    "transcoder": "transcoder",
    "skip_transcoder": "skip_transcoder",
}


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def saelab_sae(name: str) -> SparseAutoencoder:
    """A saelab SAE with random non-trivial weights, biases and scales."""
    architecture, _, norm = name.partition("-")
    fields = {"input_norm": norm} if norm else {}
    transcoder = "transcoder" in architecture
    cfg = SAEConfig(
        architecture=architecture,
        d_in=D_IN,
        d_sae=D_SAE,
        k=K,
        n_groups=4,
        d_out=D_OUT if transcoder else None,
        hook_name="blocks.2.hook_resid_mid" if transcoder else "blocks.2.hook_resid_post",
        hook_name_out="blocks.2.hook_mlp_out" if transcoder else "",
        model_name="tiny",
        **fields,
    )
    sae = build_sae(cfg, generator=rng(0))
    with torch.no_grad():
        sae.input_scale.fill_(0.4)
        for index, (name_, parameter) in enumerate(sae.named_parameters()):
            if name_ in ("W_enc", "W_dec"):
                continue
            noise = 0.2 * torch.randn(parameter.shape, generator=rng(10 + index))
            if name_ in ("threshold", "output_scale"):  # θ ≥ 0; GBA's a_i > 0 (the trainer keeps them so)
                noise = noise.abs() + 0.05
            if name_ == "b_enc" and architecture == "gba":
                noise = -noise.abs() - 0.05  # GBA's biases are ≤ 0
            parameter.copy_(noise)
        for name_, buffer in sae.named_buffers():
            if name_ == "threshold":
                buffer.fill_(0.3)
            if name_ == "target_scale":
                buffer.fill_(2.5)
    return sae.eval()


def inputs(seed: int) -> torch.Tensor:
    return torch.randn(64, D_IN, generator=rng(seed)) * 3


@pytest.mark.parametrize("name", list(SHARED))
def test_saved_by_saelab_loads_in_saelens_with_the_same_outputs(tmp_path, name):
    sae = saelab_sae(name)
    save_sae(sae, tmp_path / "sae")
    theirs = SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.architecture() == SHARED[name]
    x = inputs(1)
    ours = sae(x)
    with torch.no_grad():
        latents = theirs.encode(x)
        reconstruction = theirs(x)
    assert 0 < (ours.latents > 0).sum(-1).float().mean() < D_SAE
    assert torch.equal(latents > 0, ours.latents > 0)
    torch.testing.assert_close(latents, ours.latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reconstruction, ours.reconstruction, rtol=1e-4, atol=1e-4)


def saelens_sae(architecture: str, normalize: str) -> SAE:
    """SAELens's own inference class of `architecture`, random non-trivial weights."""
    transcoder = "transcoder" in architecture
    cfg = {
        "architecture": architecture,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": not transcoder,
        "normalize_activations": normalize,
        "metadata": {"hook_name": "blocks.2.hook_resid_post", "model_name": "tiny"},
    }
    if architecture == "topk":
        cfg["k"] = K
    if transcoder:
        cfg["d_out"] = D_OUT
        cfg["metadata"] |= {"hook_name": "blocks.2.hook_resid_mid", "hook_name_out": "blocks.2.hook_mlp_out"}
    sae = SAE.from_dict(cfg)
    with torch.no_grad():
        for index, (name, parameter) in enumerate(sae.named_parameters()):
            value = torch.randn(parameter.shape, generator=rng(20 + index)) * (0.3 if parameter.dim() < 2 else 1)
            parameter.copy_(value.abs() + 0.05 if name == "threshold" else value)
    return sae


@pytest.mark.parametrize(
    "architecture, normalize",
    [
        ("topk", "none"),
        ("topk", "layer_norm"),
        ("standard", "none"),
        ("standard", "layer_norm"),
        ("jumprelu", "none"),
        ("gated", "none"),
        ("transcoder", "none"),
        ("skip_transcoder", "none"),
    ],
)
def test_saved_by_saelens_loads_in_saelab_with_the_same_outputs(tmp_path, architecture, normalize):
    theirs = saelens_sae(architecture, normalize)
    theirs.save_model(tmp_path / "sae")
    ours = load_sae(tmp_path / "sae")
    assert ours.cfg.architecture == architecture and ours.cfg.input_norm == normalize
    x = inputs(2)
    with torch.no_grad():
        latents = theirs.encode(x)
        reconstruction = theirs(x)
    out = ours(x)
    assert 0 < (latents > 0).sum(-1).float().mean() < D_SAE
    assert torch.equal(latents > 0, out.latents > 0)
    torch.testing.assert_close(out.latents, latents, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.reconstruction, reconstruction, rtol=1e-4, atol=1e-4)
