"""Training metrics: a `metrics.jsonl` line per SAE per logged step, mirrored to wandb when enabled."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from saelab.atomic import DiskFullError, atomic_write_text, is_disk_full, size_text
from saelab.run_layout import METRICS_FILE
from saelab.train.config import WandbConfig


class MetricsLog:
    """Append-only JSONL; on resume the lines after the checkpoint's step are dropped, so none repeat."""

    def __init__(self, run: Path, wandb_cfg: WandbConfig, config: dict[str, Any], resume_step: int | None) -> None:
        self.path = run / METRICS_FILE
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.wandb = _start_wandb(run, wandb_cfg, config) if wandb_cfg.enabled else None

    def _truncate_after(self, step: int | None) -> None:
        if step is None or not self.path.exists():
            atomic_write_text(self.path, "")
            return
        kept = [line for line in self.path.read_text().splitlines() if _step(line) <= step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, records: list[dict[str, Any]]) -> None:
        """records: one dict per SAE with at least `step` and `sae`."""
        text = "".join(json.dumps(record) + "\n" for record in records)
        try:
            self.file.write(text)
            self.file.flush()
        except OSError as error:
            if is_disk_full(error):
                raise DiskFullError(self.path, f"{size_text(len(text.encode()))} needed to append") from error
            raise
        if self.wandb is not None and records:
            flat = {
                f"{r['sae']}/{key}": value for r in records for key, value in r.items() if key not in ("sae", "step")
            }
            self.wandb.log(flat, step=records[0]["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _step(line: str) -> float:
    """The step a metrics line logs; a line torn by a kill or a full disk (it is dropped) counts as past any step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


def _start_wandb(run: Path, cfg: WandbConfig, config: dict[str, Any]) -> Any:
    import wandb

    run_id_file = run / "wandb-run-id"
    run_id = run_id_file.read_text().strip() if run_id_file.exists() else uuid.uuid4().hex[:12]
    atomic_write_text(run_id_file, run_id)
    return wandb.init(
        project=cfg.project, dir=str(run), mode=cfg.mode, id=run_id, resume="allow", config=config, name=run.name
    )
