"""Experiment tracking: every metric goes to `<stage_dir>/metrics.jsonl`, and to W&B when enabled.

W&B mode (`tracking.wandb`): `auto` is online when WANDB_MODE says so or an API key is configured,
offline otherwise; `off` disables it. It never prompts, and a W&B failure falls back to the local
files with a warning instead of stopping the run. One W&B run per stage, grouped by `run.name`.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import time
import warnings
from pathlib import Path
from typing import Any

from rlhf.config import PipelineConfig
from rlhf.utils import atomic_write_text


def wandb_mode(setting: str) -> str:
    """Resolve `auto` to online/offline without ever asking the user."""
    if setting != "auto":
        return "disabled" if setting == "off" else setting
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        rc = netrc.netrc()
        if rc.authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        pass
    return "offline"


def _scalar(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    return value


class Tracker:
    """Log scalars and tables of one stage to metrics.jsonl / samples.jsonl and W&B."""

    def __init__(self, cfg: PipelineConfig, stage: str, stage_dir: Path, enabled: bool = True):
        self.stage_dir = Path(stage_dir)
        self.stage_dir.mkdir(parents=True, exist_ok=True)
        self.enabled = enabled  # False on non-main processes: nothing is written
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self.start = time.time()
        self.run = None
        mode = wandb_mode(cfg.tracking.wandb)
        if not enabled or mode == "disabled":
            return
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            run_id = self.wandb_run_id()
            self.run = wandb.init(
                project=cfg.tracking.project, entity=cfg.tracking.entity, group=cfg.run.name,
                name=f"{cfg.run.name}-{stage}", job_type=stage, config=cfg.to_dict(), mode=mode,
                dir=str(Path(cfg.run.output_dir)), reinit="finish_previous", id=run_id, resume="allow",
                settings=wandb.Settings(init_timeout=60, console="off"),
            )
        except Exception as e:  # never let tracking stop a run
            warnings.warn(f"W&B unavailable ({type(e).__name__}: {e}); logging to {self.metrics_path} only")
            self.run = None

    def wandb_run_id(self) -> str:
        """The W&B run of this stage folder: a resumed stage (PPO from a checkpoint) continues the run it
        started; a stage that starts afresh has a fresh folder, hence a new run."""
        path = self.stage_dir / "wandb_run_id"
        try:
            return path.read_text().strip()
        except FileNotFoundError:
            import uuid

            run_id = uuid.uuid4().hex[:16]
            atomic_write_text(path, run_id + "\n")
            return run_id

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self.start, 3)}
        row.update({k: _scalar(v) for k, v in metrics.items()})
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if k not in ("step", "time")}, step=step)

    def log_table(self, name: str, rows: list[dict[str, Any]], step: int) -> None:
        """Append rows (with `step`) to `<name>.jsonl`; in W&B each step gets its own table key."""
        if not self.enabled or not rows:
            return
        with open(self.stage_dir / f"{name}.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({"step": step, **{k: _scalar(v) for k, v in r.items()}}, ensure_ascii=False) + "\n")
        if self.run is not None:
            import wandb

            columns = list(rows[0].keys())
            table = wandb.Table(columns=columns, data=[[_scalar(r[c]) for c in columns] for r in rows])
            self.run.log({f"{name}/step_{step:05d}": table}, step=step)

    def log_summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = _scalar(v)

    def log_image(self, key: str, path: Path, step: int | None = None) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Image(str(path))}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
