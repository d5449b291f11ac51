"""Feature page load time in the dashboard, against its floor: reading the page from the feature store.

A synthetic 16k-latent feature store shaped like `saelab analyze`'s defaults (the pages of
`benchmarks/feature_store.py`: 20 top contexts and 4 × 5 sampled ones, 33-token windows, a 64-bin
histogram, 10 + 10 logit effects) is put in a runs folder as one SAE of a finished run. The
dashboard is driven by Streamlit's `AppTest`, which runs the app's scripts exactly as the server
does (sidebar, page, plotly figures, HTML) and collects what they send; the browser's own drawing
is not included. Timed, per random latent (medians):

    floor            FeatureStore(path).feature(i): open the file, read one page
    page, same tab   the feature page's script run after the latent box changes (what browsing costs)
    page, new tab    the feature page's first run in a new session opened on that latent's URL

and once, a fresh Python process that imports the app's modules (torch, plotly, saelab) and serves
the feature page: paid once when the dashboard starts, not per page.

    python benchmarks/dashboard.py [--latents 16384] [--loads 30]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "dashboards" / "app.py"
sys.path.insert(0, str(HERE))  # benchmarks/feature_store.py: the synthetic pages

from feature_store import synthetic_pages  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from saelab.analysis.feature_store import FeatureStore, write_feature_store  # noqa: E402
from saelab.config import save_config  # noqa: E402
from saelab.run_layout import FEATURES_FILE  # noqa: E402
from saelab.sae.config import SAEConfig  # noqa: E402
from saelab.train.config import TrainConfig  # noqa: E402

RUN, HOOK = "synthetic/train", "blocks.15.hook_resid_post"


def make_runs(root: Path, n_latents: int) -> str:
    """A finished run holding one SAE with a synthetic feature store; returns the SAE's label."""
    sae = SAEConfig(d_sae=n_latents, k=32)
    run = root / RUN
    save_config(TrainConfig(out=str(run), saes=[sae]), run / "config.yaml")
    (run / "metrics.jsonl").write_text("")
    (run / "summary.json").write_text("{}")
    meta = {"sae": sae.label, "model": "smollm2-135m", "hook": HOOK, "d_sae": n_latents, "n_tokens": 204_800}
    write_feature_store(run / "saes" / sae.label / FEATURES_FILE, meta, synthetic_pages(n_latents))
    return sae.label


def feature_page(label: str, latent: int) -> tuple[AppTest, float]:
    """A new session on the feature page of `latent`; returns it and the seconds of the page's first run."""
    at = AppTest.from_file(str(APP), default_timeout=120)
    at.query_params.update({"run": RUN, "sae": label, "feature": str(latent)})
    at.run()  # the app's default page (Runs)
    at.switch_page("views/feature.py")
    start = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - start
    check(at, latent)
    return at, seconds


def check(at: AppTest, latent: int) -> None:
    if at.exception or at.error:
        raise RuntimeError(f"the page failed: {[e.value for e in [*at.exception, *at.error]]}")
    if not any(f"Latent {latent} of" in s.value for s in at.subheader) or "<tr>" not in at.html[0].value:
        raise RuntimeError(f"the page of latent {latent} was not shown")


def ms(samples: list[float]) -> str:
    return f"{statistics.median(samples) * 1e3:9.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=16_384)
    parser.add_argument("--loads", type=int, default=30, help="random latents per measurement (median reported)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "runs"
        start = time.perf_counter()
        label = make_runs(root, args.latents)
        write_seconds = time.perf_counter() - start
        path = root / RUN / "saes" / label / FEATURES_FILE
        size = path.stat().st_size
        os.environ["SAELAB_RUNS"] = str(root)
        latents = random.Random(0).sample(range(args.latents), 2 * args.loads + 1)

        start = time.perf_counter()
        fresh = f"import sys; sys.path.insert(0, {str(HERE)!r}); import dashboard; dashboard.feature_page({label!r}, 0)"
        subprocess.run([sys.executable, "-c", fresh], check=True, capture_output=True)
        fresh_seconds = time.perf_counter() - start
        at, _ = feature_page(label, latents[0])

        floor = []
        for latent in latents[1:]:
            start = time.perf_counter()
            with FeatureStore(path) as store:
                store.feature(latent)
            floor.append(time.perf_counter() - start)

        same_tab = []
        for latent in latents[1 : args.loads + 1]:
            at.number_input[0].set_value(latent)
            start = time.perf_counter()
            at.run()
            same_tab.append(time.perf_counter() - start)
            check(at, latent)

        new_tab = [feature_page(label, latent)[1] for latent in latents[args.loads + 1 :]]

    mib = size / 2**20
    print(f"synthetic feature store: {args.latents:,} latents, {mib:,.1f} MiB, written in {write_seconds:.0f} s")
    print(f"{'feature page load (median of ' + str(args.loads) + ' random latents)':<62}{'ms':>9}{'max ms':>9}")
    rows = [
        ("  floor: FeatureStore(path).feature(i)", floor),
        ("  feature page, same tab: another latent in the box", same_tab),
        ("  feature page, new tab: first run on the latent's URL", new_tab),
    ]
    for name, samples in rows:
        print(f"{name:<62}{ms(samples)}{max(samples) * 1e3:9.1f}")
    print(f"{'  once: a fresh process imports the app and serves the page':<62}{fresh_seconds * 1e3:9.1f}")
    print(f"{'  page / floor (same tab, medians)':<62}{statistics.median(same_tab) / statistics.median(floor):9.1f}")


if __name__ == "__main__":
    main()
