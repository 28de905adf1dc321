"""PPO checkpoints: what a killed run resumes from, and the final policy folder.

A checkpoint `checkpoints/step_NNNNN/` holds the trainable weights (`trainable.safetensors`), the
optimiser and scheduler states and every process's random streams (`state.pt`), and `trainer_state.json`
(update, KL controller, engine, processes, and the fingerprint of the config it belongs to). Under an engine
that splits the trained state over processes (FSDP2, DeepSpeed ZeRO-2/3) the weights and optimiser are
also saved by every process through the engine (`engine/`: sharded, what a resume reads), and
`trainable.safetensors` holds the gathered trainable weights (what the evaluation of checkpoints reads).
Each is written to a temporary folder and renamed, so a checkpoint either exists whole or not at all.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from rlhf.models import cast_parameters, load_causal_lm
from rlhf.distributed import (SPLIT_ENGINES, engine, engine_checkpoints, full_weights, gather_rng_states,
                              set_rng_state, whole_copy)
from rlhf.ppo_models import PolicyAndValue, add_lora, merge_lora, rounding_generator
from rlhf.utils import UserError, atomic_dir, atomic_write_json, fsync_dir, fsync_tree, read_jsonl, warn

LOGS = ("metrics.jsonl", "samples.jsonl")


def trainable_state(model: PolicyAndValue) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, kl_ctl, update: int, fingerprint: str,
                    rng_states: list[dict[str, Any]], keep: int | None = None, stopped_kl: float | None = None) -> Path:
    """`ckpt_dir/step_NNNNN`: trainable weights, optimizer, scheduler, KL controller and the random streams of
    every process (`rlhf.distributed.gather_rng_states`), written atomically; then only the newest `keep`
    checkpoints are kept. `stopped_kl`: the rollout KL that ended the run here (`ppo.stop_kl`)."""
    path = Path(ckpt_dir) / f"step_{update:05d}"
    with atomic_dir(path) as tmp:
        write_checkpoint_files(tmp, trainable_state(model), optimizer.state_dict(), scheduler, kl_ctl, update,
                               fingerprint, rng_states, stopped_kl=stopped_kl)
    prune(ckpt_dir, keep)
    return path


def write_checkpoint_files(folder: Path, weights, optimizer_state, scheduler, kl_ctl, update: int, fingerprint: str,
                           rng_states: list[dict[str, Any]], engine_name: str = "single",
                           stopped_kl: float | None = None) -> None:
    save_file(weights, str(folder / "trainable.safetensors"))
    torch.save({"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": rng_states},
               folder / "state.pt")
    atomic_write_json(folder / "trainer_state.json", {
        "update": update, "kl_ctl": kl_ctl.state_dict(), "processes": len(rng_states), "engine": engine_name,
        "fingerprint": fingerprint, "stopped_kl": stopped_kl})


def prune(ckpt_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` checkpoints (all with None)."""
    if keep is not None:
        for old in sorted(Path(ckpt_dir).glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_run_checkpoint(accelerator, ckpt_dir: Path, model, optimizer, scheduler, kl_ctl, update: int,
                        fingerprint: str, keep: int | None = None, stopped_kl: float | None = None) -> Path:
    """The PPO stage's checkpoint after `update` updates; every process calls it. The main process writes it
    (`save_checkpoint`), or, under an engine that splits the trained state, every process writes its part
    through the engine into the same temporary folder, which the main process completes and renames."""
    path = Path(ckpt_dir) / f"step_{update:05d}"
    rng_states = gather_rng_states(accelerator)
    if not engine_checkpoints(accelerator):
        if accelerator.is_main_process:
            save_checkpoint(ckpt_dir, model, optimizer, scheduler, kl_ctl, update, fingerprint, rng_states, keep,
                            stopped_kl)
        accelerator.wait_for_everyone()
        return path
    tmp = path.with_name(f".{path.name}.tmp")  # the same name in every process
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "engine"))
    with full_weights(accelerator, model):
        # copies: the gathered weights live in the engine's buffers until the block ends
        weights = {k: v.clone() for k, v in trainable_state(model).items()} if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checkpoint_files(tmp, weights, None, scheduler, kl_ctl, update, fingerprint, rng_states,
                               engine(accelerator), stopped_kl)
        fsync_tree(tmp)
        shutil.rmtree(path, ignore_errors=True)
        tmp.rename(path)
        fsync_dir(path.parent)
        prune(ckpt_dir, keep)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, kl_ctl, process_index: int = 0,
                    num_processes: int = 1, accelerator=None) -> int:
    """Restore a checkpoint written by `save_checkpoint` or `save_run_checkpoint`, this process's random streams
    included; returns the number of updates done. Saved by another number of processes, the streams are not
    restored (with a warning): the run goes on, but no longer draws what an uninterrupted one would. A state
    split by an engine (FSDP2, ZeRO) is read back through the same engine on as many processes, or not at all."""
    state = json.loads((path / "trainer_state.json").read_text())
    saved_engine, now = state.get("engine", "single"), engine(accelerator) if accelerator is not None else "single"
    if {saved_engine, now} & set(SPLIT_ENGINES) and (saved_engine, state["processes"]) != (now, num_processes):
        raise UserError(f"checkpoint {path} was written by {saved_engine} on {state['processes']} processes; this "
                        f"launch is {now} on {num_processes}: launch it as before to resume, or rerun the stage "
                        f"with --force to start over")
    extra = torch.load(path / "state.pt", weights_only=True)
    if now in SPLIT_ENGINES:  # weights and optimiser through the engine, every process its part
        accelerator.load_state(str(path / "engine"))
    else:
        weights = load_file(str(path / "trainable.safetensors"))
        missing = set(trainable_state(model)) - set(weights)
        if missing:
            raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if len(extra["rng"]) == num_processes:
        set_rng_state(extra["rng"][process_index])
    elif process_index == 0:
        warn(f"checkpoint {path} was saved by {len(extra['rng'])} processes and is resumed by {num_processes}: "
             f"the random streams start afresh, so the run no longer draws what an uninterrupted one would")
    kl_ctl.load_state_dict(state["kl_ctl"])
    return int(state["update"])


def checkpoint_loads(path: Path) -> bool:
    """Whether a checkpoint's weight and optimiser files can be read back: their headers and sizes are those
    of complete files (a file cut short by a crash or a full disk fails here, not halfway through resuming)."""
    try:
        with safe_open(str(path / "trainable.safetensors"), "pt") as f:
            f.keys()
        torch.load(path / "state.pt", weights_only=True, mmap=True, map_location="cpu")
        return True
    except Exception:  # SafetensorError, OSError, pickle and zip errors: all mean "does not load"
        return False


def latest_checkpoint(ckpt_dir: Path, fingerprint: str) -> Path | None:
    """The newest complete checkpoint written with this config whose files load; a damaged one is skipped
    with a warning, for the one before it."""
    for path in sorted(ckpt_dir.glob("step_*"), reverse=True):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):  # missing, unreadable, or `path` is not a folder
            continue
        if (isinstance(state, dict) and state.get("fingerprint") == fingerprint
                and (path / "trainable.safetensors").is_file()):
            if checkpoint_loads(path):
                return path
            warn(f"checkpoint {path} is damaged (its files do not load): skipped")
    return None


def resume(out: Path, fingerprint: str, accelerator, model, optimizer, scheduler, kl_ctl, total: int) -> int:
    """The updates done, restored from the newest checkpoint of this config in `out/checkpoints`, with the logs
    cut back to it; 0 and a clean folder (logs, checkpoints, W&B run id gone) when there is none. Every process
    calls it."""
    process_index = accelerator.process_index
    ckpt = latest_checkpoint(out / "checkpoints", fingerprint)
    if ckpt is None:
        accelerator.wait_for_everyone()  # every process has looked before the main one cleans up
        if process_index == 0:
            for stale in (*LOGS, "wandb_run_id"):  # a start from scratch: a new W&B run too
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        accelerator.wait_for_everyone()
        return 0
    start = load_checkpoint(ckpt, model, optimizer, scheduler, kl_ctl, process_index, accelerator.num_processes,
                            accelerator)
    if process_index == 0:  # drop metrics and samples logged after the checkpoint (or after its stopping rollout)
        print(f"resuming PPO from {ckpt} (update {start}/{total})", file=sys.stderr)
        last = start + 1 if stopped_at(ckpt.parent, start) is not None else start
        for logged in LOGS:
            rows = [r for r in read_jsonl(out / logged) if r["step"] <= last] if (out / logged).exists() else []
            (out / logged).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return start


def stopped_at(ckpt_dir: Path, update: int) -> float | None:
    """The rollout KL that ended training after `update` updates (`ppo.stop_kl`), read from that checkpoint;
    None when the run did not stop there."""
    state = Path(ckpt_dir) / f"step_{update:05d}" / "trainer_state.json"
    return json.loads(state.read_text()).get("stopped_kl") if state.is_file() else None


def trained_updates(ppo_dir: Path, num_updates: int) -> int:
    """The updates that trained a finished PPO stage's final policy: its newest checkpoint's, which is written
    last (fewer than `num_updates` where `ppo.stop_kl` ended the run early)."""
    steps = [int(path.name.split("_")[1]) for path in (Path(ppo_dir) / "checkpoints").glob("step_*")]
    return max(steps, default=num_updates)


def save_final_policy(accelerator, cfg, model: PolicyAndValue, tokenizer, out: Path, dtype) -> None:
    """The stage's final policy as one plain HF folder (`save_policy`), whatever the engine; every process calls
    it. Sharded weights are gathered, and the main process copies them into a policy of its own to save."""
    policy = whole_copy(accelerator, model, model.policy, lambda: fresh_policy(cfg, dtype))
    if accelerator.is_main_process:
        save_policy(policy, tokenizer, out, cfg.ppo.merge_lora, rounding_generator(cfg.run.seed, "cpu"))
    accelerator.wait_for_everyone()


def save_policy(policy, tokenizer, out: Path, merge: bool, generator: torch.Generator) -> None:
    """A policy (LoRA merged when asked, see `merge_lora`; `generator` draws its roundings) as a plain HF
    causal-LM folder with its tokenizer and chat template."""
    with atomic_dir(out) as tmp:
        if hasattr(policy, "merge_and_unload") and merge:
            merged = merge_lora(copy.deepcopy(policy).cpu(), generator)
            merged.save_pretrained(tmp, safe_serialization=True)
        else:
            policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def fresh_policy(cfg, dtype):
    """The policy as the PPO stage builds it before training: the base weights (in `dtype` under LoRA, else
    fp32), with fresh LoRA adapters when the config trains them."""
    policy = load_causal_lm(cfg.model.policy, dtype if cfg.ppo.lora else torch.float32, cfg.model.trust_remote_code)
    return add_lora(policy, cfg.ppo) if cfg.ppo.lora else policy


def policy_from_checkpoint(cfg, ckpt: Path, dtype):
    """The policy of a PPO checkpoint as a plain causal LM in `dtype` (base weights + saved trainable weights,
    which are fp32: narrowed by stochastic rounding, see `merge_lora`)."""
    policy = load_causal_lm(cfg.model.policy, dtype if cfg.ppo.lora else torch.float32, cfg.model.trust_remote_code)
    if cfg.ppo.lora:
        policy = add_lora(policy, cfg.ppo)
    weights = {k[len("policy."):]: v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
               if k.startswith("policy.")}
    missing = {k for k, p in policy.named_parameters() if p.requires_grad} - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks policy weights (e.g. {sorted(missing)[0]})")
    policy.load_state_dict(weights, strict=False)
    rounding = rounding_generator(cfg.run.seed, "cpu")
    return merge_lora(policy, rounding) if cfg.ppo.lora else cast_parameters(policy, dtype, rounding)
