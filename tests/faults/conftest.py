"""The fault suite's shared pipeline: a tiny random Llama harvested, trained and analysed once, uninterrupted,
in this process; each fault test reruns a stage under a fault (as the real CLI where it kills) and compares.

Every stage's config is a list of `key=value` overrides, so the subprocess CLI and the in-process reference
run exactly the same config.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from pipeline import analyze_args, harvest_args, train_args

from saelab.config import load_config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread here as in the subprocesses (OMP_NUM_THREADS=1): the same kernels, the same bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = {key: os.environ.get(key) for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    yield
    torch.set_num_threads(threads)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def reference(tiny_model, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted pipeline: `store`, `run` (trained) and `analyzed` (a copy of `run`, analysed)."""
    from saelab.analysis.analyze import analyze
    from saelab.analysis.config import AnalyzeConfig
    from saelab.harvest.config import HarvestConfig
    from saelab.harvest.harvester import harvest
    from saelab.train.config import TrainConfig
    from saelab.train.trainer import train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("reference")
        store, run, analyzed = root / "store", root / "train", root / "analyzed"
        harvest(load_config(HarvestConfig, None, harvest_args(tiny_model_dir, store)), model=tiny_model, progress=False)
        train(load_config(TrainConfig, None, train_args(store, run)), resume=True, progress=False)
        shutil.copytree(run, analyzed)
        analyze(load_config(AnalyzeConfig, None, analyze_args(analyzed)), model=tiny_model, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {"store": store, "run": run, "analyzed": analyzed}
