"""The orchestrator: runs stages in order over one run directory, skipping those already done.

A finished stage writes `<run_dir>/<stage>/_done.json` holding a fingerprint of the config sections
it depends on, chained with the fingerprint of the stage before it. A rerun skips a stage whose
fingerprint is unchanged and reruns a changed stage and, through the chain, every stage after it.
Stage functions write their outputs atomically and the marker last, so a killed stage is never
trusted by a later one.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from rich.console import Console

from rlhf.config import PipelineConfig, save_config
from rlhf.preflight import preflight
from rlhf.utils import UserError, atomic_write_json, fingerprint

STAGES = ("prefs", "reward", "ppo", "eval")

# Config sections each stage reads, beyond those of the stages before it.
STAGE_INPUTS = {
    "prefs": ("model", "data", "prefs", "ppo.stop_tokens"),
    "reward": ("reward", "ppo.max_new_tokens", "ppo.temperature"),
    "ppo": ("ppo",),
    "eval": ("eval",),
}
MARKER = "_done.json"
console = Console(stderr=True)


def stage_fingerprints(cfg: PipelineConfig) -> dict[str, str]:
    d = cfg.to_dict()
    previous = fingerprint({"seed": cfg.run.seed})
    out = {}
    for stage in STAGES:
        inputs = {}
        for key in STAGE_INPUTS[stage]:
            section, _, field = key.partition(".")
            inputs[key] = d[section][field] if field else d[section]
        previous = fingerprint({"previous": previous, **inputs})
        out[stage] = previous
    return out


def read_marker(run_dir: Path, stage: str) -> dict | None:
    import json

    path = Path(run_dir) / stage / MARKER
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def is_done(cfg: PipelineConfig, run_dir: Path, stage: str) -> bool:
    marker = read_marker(run_dir, stage)
    return marker is not None and marker.get("fingerprint") == stage_fingerprints(cfg)[stage]


def require_done(cfg: PipelineConfig, run_dir: Path, stage: str, needed_by: str) -> Path:
    """The folder of an upstream stage, or a UserError that says what to run first."""
    if not is_done(cfg, run_dir, stage):
        marker = read_marker(run_dir, stage)
        why = "has not finished" if marker is None else "was run with a different config"
        raise UserError(f"the {needed_by} stage needs the {stage} stage, which {why} in {run_dir}: "
                        f"run `rlhf {stage} CONFIG` (or `rlhf run CONFIG`) first")
    return Path(run_dir) / stage


def stage_function(stage: str) -> Callable[[PipelineConfig, Path], Path]:
    if stage == "prefs":
        from reward_models.data import run_prefs as fn
    elif stage == "reward":
        from reward_models.train import run_reward as fn
    elif stage == "ppo":
        from rlhf.ppo import run_ppo as fn
    elif stage == "eval":
        from rlhf.evaluate import run_eval as fn
    else:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return fn


def run_pipeline(cfg: PipelineConfig, only: str | None = None, start: str | None = None,
                 force: bool = False) -> dict[str, Path]:
    """Run the stages (all, `only` one, or from `start` on) and return their output folders."""
    for name in (only, start):
        if name is not None and name not in STAGES:
            raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    selected = [only] if only else list(STAGES[STAGES.index(start):] if start else STAGES)
    preflight(cfg, selected)
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    prints = stage_fingerprints(cfg)
    for stage in STAGES[: STAGES.index(selected[0])]:
        require_done(cfg, run_dir, stage, selected[0])

    outputs: dict[str, Path] = {}
    for stage in selected:
        forced = force or (start is not None and stage == start)
        if is_done(cfg, run_dir, stage) and not forced:
            console.print(f"[green]✓[/green] {stage}: done with this config, skipped ({run_dir / stage})")
            outputs[stage] = run_dir / stage
            continue
        for later in STAGES[STAGES.index(stage):]:  # outputs after this stage are now stale
            (run_dir / later / MARKER).unlink(missing_ok=True)
        console.rule(f"[bold]{stage}")
        t0 = time.time()
        out = stage_function(stage)(cfg, run_dir)
        atomic_write_json(run_dir / stage / MARKER,
                          {"fingerprint": prints[stage], "seconds": round(time.time() - t0, 1),
                           "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        console.print(f"[green]✓[/green] {stage}: finished in {time.time() - t0:.0f}s → {out}")
        outputs[stage] = out
    return outputs
