"""Feature page load time in the dashboard, against its floor: reading the page from the feature store.

A synthetic 16k-latent feature store shaped like `saelab analyze`'s defaults (the pages of
`benchmarks/feature_store.py`: 20 top contexts and 4 × 5 sampled ones, 33-token windows, a 64-bin
histogram, 10 + 10 logit effects) is put in a runs folder as one SAE of a finished run. The
dashboard is driven by Streamlit's `AppTest`, which runs the app's scripts exactly as the server
does (sidebar, page, plotly figures, HTML) and collects what they send; the browser's own drawing
is not included. Timed, per random latent (medians):

    floor            store.feature(i): read one page from the open store (the dashboard keeps it open)
    page, same tab   the feature page's script run after the latent box changes (what browsing costs)
    page, new tab    the feature page's first run in a new session opened on that latent's URL

and once each: opening the store (its sha256 is checked against the file), paid once per process and
store; and a fresh Python process that imports the app's modules (torch, plotly, saelab) and serves
the feature page, paid once when the dashboard starts.

Then several users at once, on a real `saelab dashboard` server: each user is a real session over
Streamlit's websocket (`tools/streamlit_session.py`, what a browser tab opens; its drawing is not
included), browsing random latents in the feature page's latent box one after another with no pause
between pages (a worst case: people read a page before the next), timed from request to the page's
last element. One user alone; `--sessions` users at once; the same while one more user runs the
steering playground on SmolLM2 (the synthetic SAE gets untrained weights) again and again; and, for
comparison, `--sessions` users on a server with Streamlit's default garbage collection after every
script run, which `dashboards/.streamlit/config.toml` turns off.

    python benchmarks/dashboard.py [--latents 16384] [--loads 30] [--sessions 8]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
APP = HERE.parent / "dashboards" / "app.py"
sys.path.insert(0, str(HERE))  # benchmarks/feature_store.py: the synthetic pages
sys.path.insert(0, str(HERE.parent / "tools"))  # the dashboard server and its sessions

from feature_store import synthetic_pages  # noqa: E402
from screenshots import dashboard  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402
from streamlit_session import Session  # noqa: E402

from saelab.analysis.feature_store import FeatureStore, write_feature_store  # noqa: E402
from saelab.config import save_config  # noqa: E402
from saelab.run_layout import FEATURES_FILE  # noqa: E402
from saelab.sae.config import SAEConfig  # noqa: E402
from saelab.sae.registry import build_sae  # noqa: E402
from saelab.sae.saelens_format import save_sae  # noqa: E402
from saelab.train.config import TrainConfig  # noqa: E402

RUN, HOOK = "synthetic/train", "blocks.15.hook_resid_post"
POST_SCRIPT_GC = "STREAMLIT_RUNNER_POST_SCRIPT_GC"


def make_runs(root: Path, n_latents: int) -> str:
    """A finished run holding one SAE with a synthetic feature store; returns the SAE's label."""
    sae = SAEConfig(d_sae=n_latents, k=32, hook_name=HOOK)
    run = root / RUN
    save_config(TrainConfig(out=str(run), saes=[sae]), run / "config.yaml")
    (run / "metrics.jsonl").write_text("")
    (run / "summary.json").write_text("{}")
    untrained = build_sae(sae)  # weights for the steering playground
    save_sae(untrained, run / "saes" / sae.label)
    meta = {"sae": sae.label, "model": "smollm2-135m", "hook": HOOK, "d_sae": n_latents, "n_tokens": 204_800}
    meta["input_scale"] = float(untrained.input_scale)  # the store was "made from" these weights
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


def browse(base: str, label: str, latents: list[int], times: list[float]) -> None:
    """One user: the feature page, then each of `latents` typed into its latent box; page times into `times`."""
    with Session(base) as session:
        session.open("feature", run=RUN, sae=label, feature=latents[0])
        for latent in latents[1:]:
            page = session.interact({"latent": latent})
            if page.exceptions or f"Latent {latent} of {label}" not in page.texts("heading"):
                raise RuntimeError(f"latent {latent}'s page was not shown: {page.exceptions}")
            times.append(page.seconds)


def steer_until(base: str, label: str, done: threading.Event, times: list[float]) -> None:
    """One user pressing the steering playground's Run until `done`; each run's seconds into `times`."""
    with Session(base) as session:
        session.open("steering", run=RUN, sae=label, feature=3)
        while not done.is_set():
            page = session.interact(press="Run")
            if page.exceptions or not page.of_kind("dataframe"):
                raise RuntimeError(f"the playground failed: {page.exceptions}")
            times.append(page.seconds)


def concurrent_pages(base: str, label: str, n_latents: int, loads: int, sessions: int, steering: bool) -> tuple:
    """Page times of `sessions` users browsing at once (and one steering, when `steering`); and steering's."""
    rng = random.Random(sessions)
    pages: list[float] = []
    steered: list[float] = []
    done = threading.Event()
    users = [
        threading.Thread(target=browse, args=(base, label, rng.sample(range(n_latents), loads + 1), pages))
        for _ in range(sessions)
    ]
    steerer = threading.Thread(target=steer_until, args=(base, label, done, steered))
    if steering:
        steerer.start()
        while not steered:  # the model is loaded and the playground is running
            if not steerer.is_alive():
                raise RuntimeError("the steering user stopped before its first run")
            time.sleep(0.1)
    for user in users:
        user.start()
    for user in users:
        user.join()
    done.set()
    if steering:
        steerer.join()
    return pages, steered


def percentile(samples: list[float], q: float) -> float:
    return sorted(samples)[min(len(samples) - 1, int(q * len(samples)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=16_384)
    parser.add_argument("--loads", type=int, default=30, help="random latents per measurement (median reported)")
    parser.add_argument("--sessions", type=int, default=8, help="users browsing at once on a real server")
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

        start = time.perf_counter()
        store = FeatureStore(path)
        open_seconds = time.perf_counter() - start
        floor = []
        for latent in latents[1:]:
            start = time.perf_counter()
            store.feature(latent)
            floor.append(time.perf_counter() - start)
        store.close()

        same_tab = []
        for latent in latents[1 : args.loads + 1]:
            at.number_input[0].set_value(latent)
            start = time.perf_counter()
            at.run()
            same_tab.append(time.perf_counter() - start)
            check(at, latent)

        new_tab = [feature_page(label, latent)[1] for latent in latents[args.loads + 1 :]]

        with dashboard(root) as base:
            browse(base, label, latents[:2], [])  # the server's first page imports the app: not timed
            crowd = {
                "1 user": concurrent_pages(base, label, args.latents, args.loads, 1, steering=False),
                f"{args.sessions} users": concurrent_pages(base, label, args.latents, args.loads, args.sessions, False),
                f"{args.sessions} users + 1 steering": concurrent_pages(
                    base, label, args.latents, args.loads, args.sessions, steering=True
                ),
            }
        os.environ[POST_SCRIPT_GC] = "true"  # an environment variable outranks the app's config file
        with dashboard(root) as base:
            browse(base, label, latents[:2], [])
            pages = concurrent_pages(base, label, args.latents, args.loads, args.sessions, steering=False)
            crowd[f"{args.sessions} users, Streamlit's gc after each run"] = pages
        del os.environ[POST_SCRIPT_GC]

    mib = size / 2**20
    print(f"synthetic feature store: {args.latents:,} latents, {mib:,.1f} MiB, written in {write_seconds:.0f} s")
    print(f"{'feature page load (median of ' + str(args.loads) + ' random latents)':<62}{'ms':>9}{'max ms':>9}")
    rows = [
        ("  floor: store.feature(i) on the open store", floor),
        ("  feature page, same tab: another latent in the box", same_tab),
        ("  feature page, new tab: first run on the latent's URL", new_tab),
    ]
    for name, samples in rows:
        print(f"{name:<62}{ms(samples)}{max(samples) * 1e3:9.1f}")
    print(f"{'  once: open the store, checking its sha256':<62}{open_seconds * 1e3:9.1f}")
    print(f"{'  once: a fresh process imports the app and serves the page':<62}{fresh_seconds * 1e3:9.1f}")
    print(f"{'  page / floor (same tab, medians)':<62}{statistics.median(same_tab) / statistics.median(floor):9.1f}")
    print()
    print(f"real server, websocket sessions, {args.loads} pages each, no pause between pages (ms)")
    header = f"{'users browsing the feature page':<44}{'pages':>7}{'median':>9}{'p90':>9}{'max':>9}"
    print(f"{header}{'steering runs, s':>18}")
    for name, (pages, steered) in crowd.items():
        steering = f"{statistics.median(steered):.1f} × {len(steered)}" if steered else "—"
        row = f"  {name:<42}{len(pages):>7}{ms(pages)}{percentile(pages, 0.9) * 1e3:9.1f}{max(pages) * 1e3:9.1f}"
        print(f"{row}{steering:>18}")


if __name__ == "__main__":
    main()
