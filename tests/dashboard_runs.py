"""A runs folder for the dashboard tests and benchmark: one real, tiny, finished SmolLM2 run (trained,
evaluated, analysed), one still training, and one whose files are broken.

    root/tiny/activations     40 contexts of 32 tokens of SmolLM2's blocks.15.hook_resid_post
    root/tiny/train           topk-128-k8 and batchtopk-96-k8: metrics, summary, eval.json, features.sqlite
    root/tiny/training        the same run's config and its first logged steps only (no SAE saved yet)
    root/broken/train         a copy of tiny/train: topk's feature store corrupt, batchtopk's missing,
                              topk's eval.json not JSON
"""

from __future__ import annotations

import shutil
from pathlib import Path

from streamlit.testing.v1 import AppTest

HOOK = "blocks.15.hook_resid_post"
TOPK, BATCHTOPK = "topk-128-k8", "batchtopk-96-k8"


def make_dashboard_runs(root: Path, model) -> Path:
    from saelab.analysis.analyze import analyze
    from saelab.analysis.config import AnalyzeConfig
    from saelab.eval.config import EvalConfig
    from saelab.eval.evaluate import evaluate
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest
    from saelab.sae.config import SAEConfig
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import train

    store = root / "tiny" / "activations"
    harvest(
        HarvestConfig(out=str(store), n_tokens=31 * 40, context_size=32, device="cpu", shard_contexts=20),
        model=model,
        progress=False,
    )
    run = root / "tiny" / "train"
    saes = [SAEConfig(architecture="topk", d_sae=128, k=8), SAEConfig(architecture="batchtopk", d_sae=96, k=8)]
    cfg = TrainConfig(
        store=str(store), out=str(run), saes=saes, n_tokens=4096, batch_size=512, log_every_steps=1, device="cpu"
    )
    train(cfg, progress=False)
    evaluate(EvalConfig(run=str(run), n_tokens=2 * 31, batch_size=2, device="cpu"), model=model, progress=False)
    analyze(
        AnalyzeConfig(run=str(run), top_n=5, window_before=6, window_after=3, sample_size=20, per_band=3),
        model=model,
        progress=False,
    )

    training = root / "tiny" / "training"
    training.mkdir()
    shutil.copy(run / "config.yaml", training / "config.yaml")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (training / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n" + lines[6][:20])  # 3 steps, a torn line

    broken = root / "broken" / "train"
    shutil.copytree(run, broken, ignore=shutil.ignore_patterns("checkpoints", "wandb", ".lock"))
    (broken / "saes" / TOPK / "features.sqlite").write_bytes(b"this is not a database " * 200)
    (broken / "saes" / BATCHTOPK / "features.sqlite").unlink()
    (broken / "saes" / TOPK / "eval.json").write_text('{"fvu": 0.5,')
    return root


APP = Path(__file__).resolve().parents[1] / "dashboards" / "app.py"


def open_page(page: str | None = None, **query: object) -> AppTest:
    """The dashboard at `views/<page>.py` (or its first page) with URL query `query`, after one run;
    fails the test on any Streamlit exception. `SAELAB_RUNS` must already point at the runs folder."""
    # 300 s: the steering playground opens by sweeping six strengths of a latent, minutes on 2 busy cores
    at = AppTest.from_file(str(APP), default_timeout=300)
    at.query_params.update({key: str(value) for key, value in query.items()})
    at.run()
    if page is not None:
        at.switch_page(f"views/{page}.py").run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]


def texts(elements) -> str:  # noqa: ANN001 (Streamlit element sequences have no public type)
    return "\n".join(str(e.value) for e in elements)


def fill_steering_form(at: AppTest, prompt: str, rows: list[tuple[int, str, float]], **fields: object) -> AppTest:
    """Fill the steering playground's form and press Run; `rows` are (latent, mode, value).

    `fields`: scale (default False), max_new (default 3), hook and positions (default: the page's).
    """
    at.number_input(key="steer_rows").set_value(len(rows)).run()
    at.text_area(key="steer_prompt").set_value(prompt)
    for i, (latent, mode, value) in enumerate(rows):
        at.number_input(key=f"steer_latent_{i}").set_value(latent)
        at.selectbox(key=f"steer_mode_{i}").set_value(mode)
        at.number_input(key=f"steer_value_{i}").set_value(value)
    at.checkbox(key="steer_scale").set_value(fields.get("scale", False))
    if "hook" in fields:
        at.text_input(key="steer_hook").set_value(fields["hook"])
    if "positions" in fields:
        at.selectbox(key="steer_positions").set_value(fields["positions"])
    at.number_input(key="steer_max_new").set_value(fields.get("max_new", 3))
    next(b for b in at.button if b.label == "Run").click().run()
    assert_clean(at)
    return at
