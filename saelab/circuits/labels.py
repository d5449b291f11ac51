"""Short labels for a circuit's latents from what `saelab analyze` and `saelab explain` wrote beside each SAE:
its explanation when there is one, else the tokens it fires on most and the tokens its decoder row
pushes up (`saelab.analysis.feature_store`). A dictionary without a feature store gets no labels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from saelab.analysis.explanations import read_explanations
from saelab.analysis.feature_store import FeatureStore
from saelab.errors import SaelabError
from saelab.run_layout import EXPLANATIONS_FILE, FEATURES_FILE


def latent_label(store: FeatureStore, latent: int, shown: int = 3) -> str:
    """ "on 'x' 'y' · → 'a' 'b'": the most common tokens among its top contexts, its top logit tokens."""
    page = store.feature(latent)
    fired = Counter(w.tokens[w.highlight] for w in page.top_contexts if 0 <= w.highlight < len(w.tokens))
    on = " ".join(repr(token) for token, _ in fired.most_common(shown))
    up = " ".join(repr(effect.token) for effect in page.positive_logits[:shown])
    return f"on {on} · → {up}" if on else f"→ {up}"


def latent_labels(folders: dict[int, Path], wanted: dict[int, set[int]]) -> dict[tuple[int, int], str]:
    """{(site, latent): label} for the latents `wanted` of each site whose SAE folder (`folders`) has them."""
    labels = {}
    for site, latents in wanted.items():
        folder = folders.get(site)
        if folder is None:
            continue
        explained = read_explanations(folder / EXPLANATIONS_FILE)
        labels |= {(site, i): explained[i].text for i in latents if i in explained and explained[i].text}
        rest = [i for i in latents if (site, i) not in labels]
        if not rest or not (folder / FEATURES_FILE).is_file():
            continue
        try:
            with FeatureStore(folder / FEATURES_FILE) as store:
                labels |= {(site, i): latent_label(store, i) for i in rest}
        except SaelabError:  # a damaged or old store: the graph goes on with the latents' numbers
            continue
    return labels
