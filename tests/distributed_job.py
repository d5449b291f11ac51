"""Training jobs for the distributed tests, run by `torchrun` (one process per rank).

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_job.py PLAN.json

PLAN.json is a list of runs, trained one after the other by the same processes (one start-up for
all): `{"config": TrainConfig as a dict, "states": folder, "distribute_saes": bool}`. After each run,
every rank saves what it holds (each SAE's weights and buffers, its dead-latent counters) to
`states/rank-<r>.pt`, outside the run folder, so a test can compare the ranks with each other and
with a single process.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from saelab import distributed
from saelab.config import config_from_dict
from saelab.train import trainer
from saelab.train.config import TrainConfig


def main() -> None:
    held = {}
    run_steps = trainer._run_steps

    def run_steps_and_keep(out, cfg, source, states, *args, **kwargs):  # train() does not return the trackers
        run_steps(out, cfg, source, states, *args, **kwargs)
        held.update({state.sae.cfg.label: state.tracker.tokens_since_fired.clone() for state in states})

    trainer._run_steps = run_steps_and_keep
    for run in json.loads(Path(sys.argv[1]).read_text()):
        held.clear()
        cfg = config_from_dict(TrainConfig, run["config"])
        saes = trainer.train(cfg, progress=False, distribute_saes=run["distribute_saes"])
        state = {
            label: {"state_dict": sae.state_dict(), "tokens_since_fired": held.get(label)}
            for label, sae in saes.items()
        }
        Path(run["states"]).mkdir(parents=True, exist_ok=True)
        torch.save(state, Path(run["states"]) / f"rank-{distributed.rank()}.pt")
    distributed.shutdown(together=True)


if __name__ == "__main__":
    main()
