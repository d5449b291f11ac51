"""`saelab compare` on planted truths: a permuted (and scaled) copy, independent SAEs, a planted split,
more than two SAEs, GBA's groups; the sparse matching against the dense one; bad input as one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_store import make_store

from saelab.eval.compare import compare_saes
from saelab.eval.matching import match, nearest, unit_rows
from saelab.sae import SAEConfig, build_sae, save_sae
from saelab.sae.base import SparseAutoencoder

D_IN, D_SAE = 32, 96
HOOK = "blocks.3.hook_resid_post"
REPORT_KEYS = {"mmcs_a_to_b", "mmcs_b_to_a", "hungarian_mean_cosine", "shared_fraction", "threshold", "pairs"}


def dictionary(seed: int, n: int = D_SAE, d: int = D_IN) -> torch.Tensor:
    return unit_rows(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)))


def relu_sae(directions: torch.Tensor, bias: float = -0.3, hook: str = HOOK, **fields) -> SparseAutoencoder:
    """A ReLU ('standard') SAE that encodes and decodes along `directions` [n, d]: latent i = relu(x·d_i + bias)."""
    cfg = SAEConfig(architecture="standard", d_in=directions.shape[1], d_sae=len(directions), hook_name=hook, **fields)
    sae = build_sae(cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_dec.copy_(directions)
        sae.W_enc.copy_(directions.T)
        sae.b_enc.fill_(bias)
        sae.b_dec.zero_()
    return sae


def permuted_scaled(sae: SparseAutoencoder, permutation: torch.Tensor, scale: torch.Tensor) -> SparseAutoencoder:
    """The same function with latent i moved to position permutation[i]…: latent j of the copy is latent
    order[j] of the original, its activation × scale[j] (encoder column and bias × scale, decoder row ÷ scale)."""
    copy = build_sae(sae.cfg, torch.Generator().manual_seed(1))
    with torch.no_grad():
        copy.W_enc.copy_(sae.W_enc[:, permutation] * scale)
        copy.b_enc.copy_(sae.b_enc[permutation] * scale)
        copy.W_dec.copy_(sae.W_dec[permutation] / scale[:, None])
        copy.b_dec.copy_(sae.b_dec)
    return copy


def sparse_rows(directions: torch.Tensor, active: int = 3):
    """A store `draw`: each row a sum of `active` random directions with weights in [1, 2]."""

    def draw(n_rows: int, generator: torch.Generator) -> torch.Tensor:
        chosen = torch.rand(n_rows, len(directions), generator=generator).argsort(dim=1)[:, :active]
        weights = torch.rand(n_rows, active, generator=generator) + 1
        return (weights[..., None] * directions[chosen]).sum(1)

    return draw


def saved(tmp_path: Path, **saes: SparseAutoencoder) -> list[Path]:
    return [save_sae(sae, tmp_path / name) for name, sae in saes.items()]


@pytest.fixture
def store(tmp_path):
    """A store of sparse combinations of `dictionary(0)`'s directions (3 shards, 1,200 rows)."""
    return make_store(
        tmp_path / "store", (80, 80, 80), hooks=(HOOK,), d_model=D_IN, draw=sparse_rows(dictionary(0))
    ).path


def test_a_permuted_scaled_copy_is_the_same_everywhere(tmp_path, store):
    original = relu_sae(dictionary(0))
    permutation = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(2))
    scale = torch.rand(D_SAE, generator=torch.Generator().manual_seed(3)) * 3 + 0.2
    a, b = saved(tmp_path, a=original, b=permuted_scaled(original, permutation, scale))

    report = compare_saes([a, b], store=store, progress=False).report

    assert REPORT_KEYS <= set(report)
    for key in (
        "mmcs_a_to_b",
        "mmcs_b_to_a",
        "hungarian_mean_cosine",
        "shared_fraction",
        "mean_activation_correlation",
    ):
        assert report[key] == pytest.approx(1.0, abs=1e-5), key
    pairs = torch.tensor([pair[:2] for pair in report["pairs"]])
    assert len(pairs) == report["saes"][0]["counted"] > 0.9 * D_SAE  # the latents that fired on the sample
    assert torch.equal(permutation[pairs[:, 1]], pairs[:, 0])  # the copy's latent j is the original's permutation[j]
    assert all(pair[4] == pytest.approx(1.0, abs=1e-5) for pair in report["pairs"])


def test_independent_random_saes_share_almost_nothing(tmp_path):
    a, b = saved(tmp_path, a=relu_sae(dictionary(0)), b=relu_sae(dictionary(1)))
    report = compare_saes([a, b], progress=False).report
    assert report["shared_fraction"] < 0.02
    assert report["hungarian_mean_cosine"] < 0.5 and report["mmcs_a_to_b"] < 0.7
    assert report["store"] is None and all(pair[4] is None for pair in report["pairs"])


def test_shared_needs_the_encoder_to_agree_too(tmp_path):
    """Same decoder, unrelated encoder: the decoders match perfectly, but no latent is shared."""
    a_sae = relu_sae(dictionary(0))
    b_sae = relu_sae(dictionary(0))
    with torch.no_grad():
        b_sae.W_enc.copy_(dictionary(1).T)
    report = compare_saes(saved(tmp_path, a=a_sae, b=b_sae), progress=False).report
    assert report["hungarian_mean_cosine"] == pytest.approx(1.0)
    assert report["encoder_hungarian_mean_cosine"] < 0.5 and report["shared_fraction"] < 0.02


def test_a_planted_split_is_found(tmp_path, store):
    """B holds A's directions but latent 5 is replaced by two at ±15° from it in a random plane."""
    narrow = dictionary(0)
    parent = narrow[5]
    orthogonal = unit_rows(
        torch.randn(1, D_IN, generator=torch.Generator().manual_seed(4))
        @ (torch.eye(D_IN) - parent[:, None] * parent[None, :])
    )[0]
    angle = torch.tensor(15.0).deg2rad()
    children = torch.stack([parent * angle.cos() + sign * orthogonal * angle.sin() for sign in (1, -1)])
    wide = torch.cat([narrow[:5], narrow[6:], children])
    a, b = saved(tmp_path, narrow=relu_sae(narrow), wide=relu_sae(wide))

    for with_store in (None, store):
        splits = compare_saes([b, a], store=with_store, progress=False).report["splits"]
        assert [(s["sae"], s["latent"]) for s in splits] == [("narrow", 5)]
        assert sorted(p[0] for p in splits[0]["partners"]) == [D_SAE - 1, D_SAE]
        assert all(p[1] == pytest.approx(float(angle.cos()), abs=1e-4) for p in splits[0]["partners"])
        if with_store is not None:  # each child fires mostly where the parent does
            assert all(p[2] > 0.75 for p in splits[0]["partners"])


def test_more_than_two_saes_give_pairwise_matrices(tmp_path):
    original = relu_sae(dictionary(0))
    permutation = torch.randperm(D_SAE, generator=torch.Generator().manual_seed(5))
    folders = saved(
        tmp_path, a=original, b=permuted_scaled(original, permutation, torch.ones(D_SAE)), c=relu_sae(dictionary(1))
    )
    pairwise = compare_saes(folders, progress=False).report["pairwise"]
    assert pairwise["labels"] == ["a", "b", "c"]
    assert pairwise["shared_fraction"][0][1] == pairwise["shared_fraction"][1][0] == pytest.approx(1.0)
    assert pairwise["shared_fraction"][0][2] < 0.05 and pairwise["hungarian_mean_cosine"][1][2] < 0.5
    assert pairwise["found_in_all_others"]["a"] < 0.05  # c shares nothing with a

    pairwise = compare_saes(folders[:2] + [folders[0]], progress=False).report["pairwise"]  # a, b, a again
    assert all(found == pytest.approx(1.0) for found in pairwise["found_in_all_others"].values())


def test_gba_copies_are_shared_in_every_group(tmp_path):
    cfg = SAEConfig(architecture="gba", d_in=D_IN, d_sae=D_SAE, n_groups=4, hook_name=HOOK, tied=True)
    gba = build_sae(cfg, torch.Generator().manual_seed(0))
    a, b = saved(tmp_path, a=gba, b=gba)
    report = compare_saes([a, b], progress=False).report
    assert report["saes"][0]["tied"] and report["shared_fraction"] == pytest.approx(1.0)
    assert report["shared_fraction_by_group"] == {str(g): pytest.approx(1.0) for g in range(4)}


@pytest.mark.parametrize("n_a,n_b", [(64, 64), (48, 80), (80, 48)])
def test_sparse_matching_with_every_candidate_is_the_dense_matching(n_a, n_b):
    a, b = dictionary(6, n_a), dictionary(7, n_b)
    dense = match(a, b, "dense")
    sparse = match(a, b, "sparse", nearest(a, b, n_b))
    assert torch.equal(dense.partner, sparse.partner)
    assert (dense.partner >= 0).sum() == min(n_a, n_b)


def test_sparse_matching_on_few_candidates_finds_a_noisy_permutation():
    a = dictionary(8, 400, 64)
    permutation = torch.randperm(400, generator=torch.Generator().manual_seed(9))
    b = unit_rows(a[permutation] + 0.6 * dictionary(10, 400, 64))  # cosine ≈ 0.86 with its original
    dense = match(a, b, "dense")
    sparse = match(a, b, "sparse", nearest(a, b, 8))
    assert torch.equal(dense.partner, sparse.partner)
    assert torch.equal(permutation[sparse.partner], torch.arange(400))
    assert sparse.peak_bytes < dense.peak_bytes


def test_sparse_matching_places_rows_whose_candidates_are_taken():
    """Every row of a has the same two candidates: the rest are matched densely among the free rows of b."""
    b = dictionary(11, 10)
    a = unit_rows(b[0] + b[1] + 0.01 * dictionary(12, 6))
    dense, sparse = match(a, b, "dense"), match(a, b, "sparse", nearest(a, b, 2))
    assert (sparse.partner >= 0).all() and len(set(sparse.partner.tolist())) == 6
    assert sparse.mean_cosine == pytest.approx(dense.mean_cosine, abs=1e-6)


def test_saelens_written_folder_compares_with_its_saelab_twin(tmp_path):
    """A folder in SAELens's own layout (no saelab metadata) reads as the same SAE."""
    sae = relu_sae(dictionary(0))
    folder = tmp_path / "saelens"
    folder.mkdir()
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "architecture": "standard", "apply_b_dec_to_input": True}
    cfg |= {"normalize_activations": "none", "dtype": "float32", "metadata": {"hook_name": HOOK}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    import safetensors.torch

    tensors = {name: getattr(sae, name).detach().contiguous() for name in ("W_enc", "W_dec", "b_enc", "b_dec")}
    safetensors.torch.save_file(tensors, folder / "sae_weights.safetensors")
    report = compare_saes([save_sae(sae, tmp_path / "saelab"), folder], progress=False).report
    assert report["shared_fraction"] == pytest.approx(1.0)


def test_cli_writes_the_report_and_the_histograms(tmp_path, store):
    original = relu_sae(dictionary(0))
    a, b = saved(tmp_path, a=original, b=relu_sae(dictionary(1)))
    out, html = tmp_path / "report.json", tmp_path / "report.html"
    result = subprocess.run(
        [sys.executable, "-m", "saelab", "compare", str(a), str(b), "--store", str(store), "--quiet"]
        + ["--out", str(out), "--html", str(html), "--tokens", "800"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "MMCS A→B" in result.stdout and "shared" in result.stdout
    report = json.loads(out.read_text())
    assert REPORT_KEYS <= set(report) and report["store"]["tokens"] == 800
    assert "plotly" in html.read_text()[:5000].lower()


def test_one_run_folder_gets_its_report_in_place(tmp_path):
    run = tmp_path / "run"
    saved(run / "saes", topk=relu_sae(dictionary(0)), other=relu_sae(dictionary(1)))
    result = subprocess.run(
        [sys.executable, "-m", "saelab", "compare", str(run), "--quiet"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads((run / "compare.json").read_text())["saes"][0]["label"] == "other"
    assert (run / "compare.html").is_file()


def test_bad_input_is_one_line(tmp_path, store, saelab_error):
    a, other_hook, other_width = saved(
        tmp_path,
        a=relu_sae(dictionary(0)),
        other_hook=relu_sae(dictionary(1), hook="blocks.4.hook_resid_post"),
        other_width=relu_sae(dictionary(1, d=D_IN + 1)),
    )
    assert "blocks.4.hook_resid_post" in saelab_error("compare", str(a), str(other_hook))
    assert "d_in" in saelab_error("compare", str(a), str(other_width))
    missing = tmp_path / "nothing-here"
    assert "not an SAE folder" in saelab_error("compare", str(a), str(missing))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cfg.json").write_text("{not json")
    assert "cannot read the SAE" in saelab_error("compare", str(a), str(broken))
    assert "at least two" in saelab_error("compare", str(a))
    other_store = make_store(tmp_path / "other-store", (4,), hooks=("blocks.9.hook_resid_post",), d_model=D_IN).path
    assert "blocks.9.hook_resid_post" in saelab_error("compare", str(a), str(a), "--store", str(other_store))
    assert "threshold" in saelab_error("compare", str(a), str(a), "--threshold", "1.5")
