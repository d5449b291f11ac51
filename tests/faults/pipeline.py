"""The fault suite's pipeline configs as `key=value` overrides, so the subprocess CLI and the in-process
reference run exactly the same config."""

from __future__ import annotations

from pathlib import Path

HOOK = "blocks.1.hook_resid_post"


def harvest_args(model_dir: Path, out: Path, **extra: object) -> list[str]:
    """20 shards of 24 contexts of 32 tokens from the default corpus: ~15k rows of d_model 32."""
    values = dict(
        model=model_dir, hooks=f"[{HOOK}]", out=out, n_tokens=31 * 480, context_size=32, batch_size=4,
        shard_contexts=24, device="cpu",
    )  # fmt: skip
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


SAES = (
    "[{architecture: topk, d_sae: 128, k: 8}, {architecture: batchtopk, d_sae: 128, k: 8},"
    " {architecture: gba, d_sae: 128, target_l0: 8}]"
)


def train_args(store: Path, out: Path, **extra: object) -> list[str]:
    """TopK, BatchTopK and GBA, 300 steps of 256 rows (5 epochs of the store), a checkpoint every 20 steps."""
    values = dict(
        store=store, out=out, saes=SAES, n_tokens=256 * 300, batch_size=256, checkpoint_every_tokens=256 * 20,
        keep_checkpoints=2, init_sample_rows=4096, log_every_steps=10, device="cpu",
    )  # fmt: skip
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]


def analyze_args(run: Path, **extra: object) -> list[str]:
    values = dict(
        run=run, n_tokens=31 * 480, top_n=5, window_before=4, window_after=2, sample_size=16, per_band=2,
        batch_size=31 * 32, device="cpu",
    )  # fmt: skip
    values.update(extra)
    return [f"{key}={value}" for key, value in values.items()]
