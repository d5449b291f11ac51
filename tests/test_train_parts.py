"""The trainer's parts against simple references: losses, initialisation, dead latents, checkpoints."""

from __future__ import annotations

import pytest
import torch

from saelab.errors import SaelabError
from saelab.train.checkpoint import complete_checkpoints, load_checkpoint, save_checkpoint
from saelab.train.dead_latents import DeadLatentTracker
from saelab.train.initialization import geometric_median, input_scale
from saelab.train.loss import normalized_mse
from saelab.train.sources import TensorSource


def test_normalized_mse_matches_a_hand_computation():
    target = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    reconstruction = torch.tensor([[1.5, 2.0], [3.0, 5.0]])
    # errors: 0.25 and 1.0 → mean 0.625; mean (2, 4): deviations (1+4) and (1+4) → mean 5
    assert normalized_mse(reconstruction, target).item() == pytest.approx(0.625 / 5)


def test_input_scale_gives_mean_squared_norm_d_in():
    sample = torch.randn(500, 12) * 7.3 + 2.0
    scaled = sample * input_scale(sample)
    assert scaled.pow(2).sum(-1).mean().item() == pytest.approx(12, rel=1e-5)


def test_geometric_median_minimises_summed_distance():
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(300, 5, generator=generator)
    points[:20] += 50  # outliers drag the mean, not the median
    median = geometric_median(points)

    def cost(center: torch.Tensor) -> float:
        return float((points - center).norm(dim=-1).sum())

    assert cost(median) < cost(points.mean(0))
    for _ in range(20):
        nudge = torch.randn(5, generator=generator) * 0.05
        assert cost(median) <= cost(median + nudge) + 1e-4
    assert median.norm() < points.mean(0).norm() / 3


def test_dead_tracker_counts_tokens_since_firing():
    tracker = DeadLatentTracker(d_sae=4, dead_tokens=10)
    # sparse rows: token 0 fires latent 1 (latent 2 kept at 0: not a firing), token 1 fires latent 3
    indices, values = torch.tensor([[1, 2], [3, 0]]), torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    for _ in range(5):
        tracker.update(indices, values)
    assert tracker.tokens_since_fired.tolist() == [10, 0, 10, 0]
    assert tracker.dead.tolist() == [True, False, True, False] and tracker.dead_fraction() == 0.5
    tracker.update(torch.tensor([[0]]), torch.tensor([[3.0]]))
    assert tracker.tokens_since_fired.tolist() == [0, 1, 11, 1]


def test_checkpoints_are_verified_and_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"weights": torch.randn(8), "step": step}, keep=2)
    kept = complete_checkpoints(tmp_path)
    assert [path.name for path in kept] == ["step-000000002.pt", "step-000000003.pt"]
    assert load_checkpoint(kept[-1])["step"] == 3
    kept[-1].write_bytes(kept[-1].read_bytes()[:-100])
    with pytest.raises(SaelabError, match="step-000000003.pt"):
        load_checkpoint(kept[-1])


def test_a_checkpoint_without_its_checksum_does_not_count(tmp_path):
    path = save_checkpoint(tmp_path, 7, {"x": torch.ones(2)}, keep=3)
    path.with_suffix(".sha256").unlink()  # as if killed between the two writes
    assert complete_checkpoints(tmp_path) == []


def test_tensor_source_epochs_are_seeded_permutations():
    data = torch.randn(100, 3)
    source = TensorSource(data, gradients=data * 2)
    epoch = list(source.batches(10, seed=4, with_gradients=True))
    assert len(epoch) == source.n_batches(10) == 10
    seen = torch.cat([x for x, _ in epoch])
    assert torch.equal(seen[seen[:, 0].argsort()], data[data[:, 0].argsort()])
    assert all(torch.equal(g, x * 2) for x, g in epoch)
    tail = list(source.batches(10, seed=4, start_batch=7))
    assert all(torch.equal(a, b[0]) for (a, _), b in zip(tail, epoch[7:], strict=True))
    assert not torch.equal(next(source.batches(10, seed=5))[0], epoch[0][0])
