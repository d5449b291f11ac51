"""The trainer's parts against simple references: losses, initialisation, dead latents, checkpoints, prefetching."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from saelab.errors import SaelabError
from saelab.sae import SAEConfig, build_sae
from saelab.train.checkpoint import complete_checkpoints, load_checkpoint, load_optimizer_state, save_checkpoint
from saelab.train.config import TrainConfig
from saelab.train.dead_latents import DeadLatentTracker, _LongestSilence
from saelab.train.initialization import geometric_median, input_scale
from saelab.train.loss import normalized_mse
from saelab.train.prefetch import Prefetcher
from saelab.train.sources import TensorSource
from saelab.train.step import read_metrics

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


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


@pytest.mark.parametrize("device", DEVICES)
def test_the_dead_latent_bound_never_misses_a_dead_latent(device):
    """`may_have_dead` is kept without waiting for the device; it may say yes with none dead, never no with one."""
    generator = torch.Generator().manual_seed(0)
    tracker = DeadLatentTracker(d_sae=50, dead_tokens=40, device=device)
    steps_with_dead = 0
    for _ in range(80):
        indices = torch.randint(0, 50, (8, 3), generator=generator)
        values = torch.rand(8, 3, generator=generator) - 0.3  # a slot with value ≤ 0 is no firing
        tracker.update(indices.to(device), values.to(device))
        any_dead = bool(tracker.dead.any())
        steps_with_dead += any_dead
        assert tracker.may_have_dead() or not any_dead
        if device == "cpu":  # there the bound is the exact maximum
            assert tracker.may_have_dead() == any_dead
    assert 0 < steps_with_dead < 80, "the run should pass through both states"


class DelayedCopies(_LongestSilence):
    """The GPU's asynchronous path on the CPU: each queued maximum arrives `lag` updates after it was queued."""

    def __init__(self, counters: torch.Tensor, lag: int) -> None:
        super().__init__(counters, exact=False)
        self.asynchronous, self.lag, self.updates = True, lag, 0

    def advance(self, tokens: int, counters: torch.Tensor) -> None:
        self.updates += 1
        super().advance(tokens, counters)

    def queue_maximum(self, counters: torch.Tensor):
        queued_at = self.updates
        return counters.max().clone(), lambda: self.updates >= queued_at + self.lag


@pytest.mark.parametrize("lag", [0, 1, 3])
def test_the_asynchronous_bound_stays_above_the_longest_silence_and_follows_it(lag):
    generator = torch.Generator().manual_seed(lag)
    counters = torch.zeros(30, dtype=torch.long)
    bound, history = DelayedCopies(counters, lag), []
    for _ in range(60):
        fired = torch.rand(30, generator=generator) < 0.3
        counters.copy_(torch.where(fired, 0, counters + 8))  # 8 tokens a batch, as DeadLatentTracker counts
        bound.advance(8, counters)
        history.append(int(counters.max()))
        # above the longest silence, and no staler than a maximum copied at most 2·lag + 1 updates ago
        recent = history[-(2 * lag + 2) :]
        assert history[-1] <= bound.value() <= max(recent) + 8 * (len(recent) - 1)


def test_read_metrics_reads_every_step_in_order():
    steps = [{"loss": torch.tensor(float(i)), "l0": torch.tensor(i * 2.0)} for i in range(3)]
    steps[1]["penalty"] = torch.tensor(7.0, dtype=torch.float64)
    assert read_metrics(steps) == [
        {"loss": 0.0, "l0": 0.0},
        {"loss": 1.0, "l0": 2.0, "penalty": 7.0},
        {"loss": 2.0, "l0": 4.0},
    ]
    assert read_metrics([]) == []


def test_the_prefetcher_keeps_the_order_and_passes_errors_on():
    with Prefetcher(iter(range(50)), lambda item: item * 2, depth=3) as prefetched:
        assert list(prefetched) == [2 * i for i in range(50)]

    def failing():
        yield 1
        raise ValueError("shard 3 is damaged")

    with Prefetcher(failing(), lambda item: item) as prefetched:
        assert next(prefetched) == 1
        with pytest.raises(ValueError, match="shard 3 is damaged"):
            next(prefetched)


def test_closing_the_prefetcher_stops_its_thread_while_the_queue_is_full():
    def endless():
        while True:
            yield torch.zeros(4)

    before = threading.active_count()
    prefetcher = Prefetcher(endless(), lambda item: item, depth=2)
    next(prefetcher)
    time.sleep(0.05)  # the thread fills the queue and waits for room
    prefetcher.close()
    assert threading.active_count() == before


def test_checkpoints_are_verified_and_pruned(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"weights": torch.randn(8), "step": step}, keep=2)
    kept = complete_checkpoints(tmp_path)
    assert [path.name for path in kept] == ["step-000000002.pt", "step-000000003.pt"]
    assert load_checkpoint(kept[-1])["step"] == 3
    kept[-1].write_bytes(kept[-1].read_bytes()[:-100])
    with pytest.raises(SaelabError, match="step-000000003.pt"):
        load_checkpoint(kept[-1])


def test_saved_moments_are_restored_in_their_parameters_layout():
    """A column-major W_enc moment (what older saelab saved) comes back row-major like W_enc, values kept:
    fused Adam on CUDA refuses moments whose strides differ from their parameter's."""
    sae = build_sae(SAEConfig(d_in=6, d_sae=10, k=2), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    sae.sparse_forward(torch.randn(5, 6)).reconstruction.square().sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    encoder = [name for name, _ in sae.named_parameters()].index("W_enc")
    old_layout = saved["state"][encoder]["exp_avg"].T.contiguous().T
    saved["state"][encoder]["exp_avg"] = old_layout
    assert old_layout.stride() != sae.W_enc.stride()
    restored = torch.optim.Adam(sae.parameters(), lr=1e-3)
    load_optimizer_state(restored, saved)
    moment = restored.state[sae.W_enc]["exp_avg"]
    assert moment.stride() == sae.W_enc.stride() and torch.equal(moment, old_layout)
    assert restored.state[sae.W_enc]["exp_avg_sq"].stride() == sae.W_enc.stride()


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


@pytest.mark.parametrize("slowdown", [0.5, 117.0])
def test_bf16_on_a_cpu_without_bf16_instructions_trains_in_float32_and_says_so(slowdown, monkeypatch, capsys, tmp_path):
    """The CPU's capability is simulated both ways (the probe's measured slowdown); CUDA and float32 never probe."""
    from saelab.kernels import cpu_bf16
    from saelab.train import trainer

    monkeypatch.setattr(cpu_bf16, "bf16_slowdown", lambda: slowdown)
    fast = slowdown < cpu_bf16.SLOW_RATIO
    cfg = TrainConfig(dtype="bfloat16")
    assert cfg.resolved_dtype("cpu") == ("bfloat16" if fast else "float32")
    assert TrainConfig(dtype="bfloat16", force_bf16=True).resolved_dtype("cpu") == "bfloat16"
    assert cfg.resolved_dtype("cuda:0") == "bfloat16" and TrainConfig(dtype="auto").resolved_dtype("cpu") == "float32"
    notice = cpu_bf16.slow_bf16_notice()
    assert f"took {slowdown:.0f}× as long as float32" in notice and "force_bf16: true" in notice

    used = []  # the encoder product's dtype of every step
    real_step = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", lambda *a, **k: used.append(a[7].matmul_dtype) or real_step(*a, **k))
    run = TrainConfig(
        out=str(tmp_path / "run"),
        saes=[SAEConfig(architecture="topk", d_in=16, d_sae=32, k=4)],
        n_tokens=512,
        batch_size=256,
        dtype="bfloat16",
        device="cpu",
        checkpoint_every_tokens=512,
    )
    trainer.train(run, source=TensorSource(torch.randn(512, 16, generator=torch.Generator().manual_seed(0))))
    assert used == [torch.bfloat16 if fast else None] * 2
    assert (notice in capsys.readouterr().err) == (not fast)


def test_the_step_breakdown_times_every_phase_and_adds_up_to_the_step():
    """`benchmarks/training_step.py --breakdown`: each phase's profiler range is reached in a real step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import training_step

    from saelab.kernels.phases import PHASES

    parts = dict(training_step.breakdown(training_step.Shape(32, 256, 8, 128), "cpu", steps=2))
    assert set(parts) == {name.removeprefix("step: ") for name in PHASES} | {"other", "step"}
    measured = {name: seconds for name, seconds in parts.items() if name not in ("other", "step")}
    assert all(seconds > 0 for seconds in measured.values()), measured
    assert 0 <= parts["other"] < parts["step"]  # the phases do not overlap: together they fit inside the step
