"""The orchestrator: runs stages in order over one run directory, skipping those already done.

A stage is done when its `_done.json` holds the current fingerprint (rlhf.stages: the settings and
file contents it reads, chained with the stages before it; a setting added since it ran, at the value
that computes what it computed, does not count) and the stages before it are still the executions it
read. A stage that is not done runs in a work folder of its own,
`<run_dir>/.partial/<stage>...`; only when it has finished does that folder, marker included, replace
`<run_dir>/<stage>` in one rename, and `config.yaml` is written. A stage that fails or is killed leaves
the run directory as it was. PPO's work folder is named by what its checkpoints belong to, so a killed
PPO run resumes from it, and the work of another config is kept apart until a PPO run finishes.

One process at a time writes a run directory: the main process holds an exclusive lock on the folder
(`flock`, released when the process ends, however it ends), and a second `rlhf` command on the same
folder stops with one line naming the process that holds it, before it touches anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from rich.console import Console

from reward_models.prefs import run_prefs
from reward_models.train import run_reward
from rlhf.config import PipelineConfig, save_config
from rlhf.distributed import join_process_group, launched_processes
from rlhf.models import stage_device
from rlhf.evaluate import run_eval
from rlhf.ppo import run_ppo
from rlhf.preflight import preflight
from rlhf.stages import STAGES, marker_for, require_done, stage_identity, why_not_done, write_marker
from rlhf.utils import UserError, fsync_dir, warn

PARTIAL = ".partial"
MAIN_ONLY = ("prefs", "eval")  # stages that train nothing: with several processes, the main one runs them
console = Console(stderr=True)


STAGE_FUNCTIONS: dict[str, Callable[[PipelineConfig, Path, Path], Path]] = {
    "prefs": run_prefs, "reward": run_reward, "ppo": run_ppo, "eval": run_eval}


def stage_function(stage: str) -> Callable[[PipelineConfig, Path, Path], Path]:
    """`run_<stage>(cfg, run_dir, out)`: reads earlier stages' outputs from `run_dir`, writes its own to `out`."""
    if stage not in STAGE_FUNCTIONS:
        raise UserError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    return STAGE_FUNCTIONS[stage]


def work_dir(cfg: PipelineConfig, run_dir: Path, stage: str) -> Path:
    """Where a stage writes until it has finished. PPO's is named by its config and upstream outputs, so
    its checkpoints are resumed by the same work only."""
    name = f"ppo-{stage_identity(cfg, run_dir, stage)}" if stage == "ppo" else stage
    return Path(run_dir) / PARTIAL / name


def recover(run_dir: Path) -> None:
    """Finish or undo a replacement that a kill interrupted between its two renames."""
    partial = Path(run_dir) / PARTIAL
    for stage in STAGES:
        old = partial / f"{stage}.old"
        if old.exists():
            if (Path(run_dir) / stage).exists():
                shutil.rmtree(old)
            else:
                os.replace(old, Path(run_dir) / stage)


def lock_holder(folder: Path) -> str | None:
    """`pid N: its command line` of the process holding an flock on `folder`, from /proc/locks (Linux)."""
    st = os.stat(folder)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        locks = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in locks:
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
            try:
                command = Path(f"/proc/{fields[4]}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except OSError:
                command = ""
            return f"pid {fields[4]}" + (f": {command}" if command else "")
    return None


def hold_run_dir(run_dir: Path, stack: contextlib.ExitStack) -> None:
    """Lock `run_dir` for this process until `stack` closes; UserError when another process holds it."""
    fd = os.open(run_dir, os.O_RDONLY)
    stack.callback(os.close, fd)  # closing the descriptor releases the lock, as the end of the process does
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock_holder(run_dir)
        raise UserError(f"run directory {run_dir} is in use by another rlhf process"
                        f"{f' ({holder})' if holder else ''}: wait for it to finish or stop it (two processes "
                        f"writing one run directory would mix their results), or give this run another "
                        f"run.output_dir") from None
    except OSError as e:  # a file system without flock (some network mounts): run, unguarded
        warn(f"cannot lock run directory {run_dir} ({e.strerror or e}): a second rlhf command on it would not be "
             f"stopped")


def publish(work: Path, run_dir: Path, stage: str) -> None:
    """Replace `<run_dir>/<stage>` by the finished work folder."""
    final, old = Path(run_dir) / stage, Path(run_dir) / PARTIAL / f"{stage}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(work, final)
    fsync_dir(run_dir)
    shutil.rmtree(old, ignore_errors=True)
    if stage == "ppo":  # the unfinished PPO work of other configs is superseded
        for other in (Path(run_dir) / PARTIAL).glob("ppo-*"):
            shutil.rmtree(other, ignore_errors=True)


def is_main_process() -> bool:
    """Rank 0 of a `torchrun` / `accelerate launch` job (or a single process): it alone does the bookkeeping."""
    return int(os.environ.get("RANK", "0")) == 0


def start_process_group(cfg: PipelineConfig) -> None:
    """Join the launch's process group before the first stage, when there are several processes (`torchrun`,
    `accelerate launch`): the processes wait for each other between stages. The long timeout lets the others
    wait while the main process alone builds the preference pairs or evaluates (`MAIN_ONLY`)."""
    if launched_processes() > 1:
        join_process_group(stage_device(cfg) == "cpu")


def barrier() -> None:
    """Wait for every process (a single process: no-op)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_pipeline(cfg: PipelineConfig, only: str | None = None, start: str | None = None,
                 force: bool = False) -> dict[str, Path]:
    """Run the stages (all, `only` one, or from `start` on) and return their output folders.

    `force` recomputes the selected stages, `start` recomputes that stage; neither resumes work written
    before this call. Stages after a recomputed one rerun, since they read its outputs."""
    for name in (only, start):
        if name is not None and name not in STAGES:
            raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    selected = [only] if only else list(STAGES[STAGES.index(start):] if start else STAGES)
    run_dir = Path(cfg.run.output_dir)
    with contextlib.ExitStack() as lock:
        locked = run_dir.is_dir() and is_main_process()
        if locked:  # before anything reads or repairs the folder
            hold_run_dir(run_dir, lock)
            recover(run_dir)
        for stage in STAGES[: STAGES.index(selected[0])]:  # before the up-front checks, which may load a tokenizer
            require_done(cfg, run_dir, stage, selected[0])
        preflight(cfg, selected)  # everything the selected stages will read, before any expensive work
        start_process_group(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        if is_main_process() and not locked:
            hold_run_dir(run_dir, lock)
        return run_stages(cfg, run_dir, selected, force, start)


def run_stages(cfg: PipelineConfig, run_dir: Path, selected: list[str], force: bool,
               start: str | None) -> dict[str, Path]:
    """Run the selected stages in order, each unless it is done (see run_pipeline)."""
    outputs: dict[str, Path] = {}
    for stage in selected:
        forced = force or (start is not None and stage == start)
        why = why_not_done(cfg, run_dir, stage)
        if why is None and not forced:
            console.print(f"[green]✓[/green] {stage}: done with this config, skipped ({run_dir / stage})")
            outputs[stage] = run_dir / stage
            continue
        console.rule(f"[bold]{stage}")
        console.print(f"[dim]{stage}: {'forced' if forced and why is None else why}[/dim]")
        work = work_dir(cfg, run_dir, stage)
        if is_main_process() and (forced or stage != "ppo" or not work.exists()):  # only PPO resumes
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir(parents=True)
        barrier()
        t0 = time.time()
        if stage in MAIN_ONLY and not is_main_process():
            out = work  # the main process runs it; the others wait at the barrier below
        else:
            out = Path(stage_function(stage)(cfg, run_dir, work))
        if is_main_process():
            write_marker(work, marker_for(cfg, run_dir, stage, time.time() - t0))
            publish(work, run_dir, stage)
            save_config(cfg, run_dir / "config.yaml")  # the config of the stages that are done
        barrier()
        outputs[stage] = run_dir / stage / out.relative_to(work)
        console.print(f"[green]✓[/green] {stage}: finished in {time.time() - t0:.0f}s → {outputs[stage]}")
    return outputs
