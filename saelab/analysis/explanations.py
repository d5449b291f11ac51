"""The explanations file beside a feature store: one JSON line per explained or scored latent, appended.

    {"latent": 12, "explanation": "closing parentheses", "explainer": "smollm2-135m"}
    {"latent": 12, "scores": {"detection": 0.7, "detection_shuffled": 0.5, …}, "n_detection": 12,
     "scorer": "smollm2-135m"}

`saelab explain` appends a line (flushed and synced) as each latent is done, so a killed run loses at
most the latent in hand and resumes from the file; a torn last line is ignored. The feature store
itself is written once and checksummed, so explanations live beside it rather than inside it; the
dashboard reads both, and shows an explain run's progress as the file grows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Explanation:
    latent: int
    text: str = ""
    explainer: str = ""
    scores: dict[str, float] = field(default_factory=dict)
    scorer: str = ""
    n_detection: int | None = None  # detection calls behind the scores (files before it was kept: None)


def read_explanations(path: str | Path) -> dict[int, Explanation]:
    """Every latent's explanation and scores in the file (empty when there is none yet)."""
    found: dict[int, Explanation] = {}
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        try:
            record = json.loads(line)
            latent = int(record["latent"])
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a kill
        entry = found.setdefault(latent, Explanation(latent))
        if "explanation" in record:
            entry.text, entry.explainer = str(record["explanation"]), str(record.get("explainer", ""))
        if "scores" in record:
            entry.scores, entry.scorer = dict(record["scores"]), str(record.get("scorer", ""))
            calls = record.get("n_detection")
            entry.n_detection = calls if isinstance(calls, int) and calls > 0 else None
    return found


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line and make it durable before returning."""
    with open(path, "a", encoding="utf-8") as file:
        file.write(json.dumps(record) + "\n")
        file.flush()
        os.fsync(file.fileno())


def search(explanations: dict[int, Explanation], query: str) -> list[Explanation]:
    """The explanations holding every word of `query` (case-insensitive), by latent."""
    words = query.lower().split()
    return [e for _, e in sorted(explanations.items()) if e.text and all(w in e.text.lower() for w in words)]
