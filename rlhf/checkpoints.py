"""PPO checkpoints: what a killed run resumes from, and the final policy folder.

A checkpoint `checkpoints/step_NNNNN/` holds the trainable weights (`trainable.safetensors`), the
optimiser and scheduler states and every process's random streams (`state.pt`), and `trainer_state.json`
(update, KL controller, and the fingerprint of the config it belongs to). Each is written to a temporary folder and renamed,
so a checkpoint either exists whole or not at all.
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

from rlhf.models import load_causal_lm
from rlhf.distributed import set_rng_state
from rlhf.ppo_models import PolicyAndValue, add_lora
from rlhf.utils import atomic_dir, atomic_write_json, read_jsonl, warn

LOGS = ("metrics.jsonl", "samples.jsonl")


def trainable_state(model: PolicyAndValue) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(ckpt_dir: Path, model, optimizer, scheduler, kl_ctl, update: int, fingerprint: str,
                    rng_states: list[dict[str, Any]], keep: int | None = None) -> Path:
    """`ckpt_dir/step_NNNNN`: trainable weights, optimizer, scheduler, KL controller and the random streams of
    every process (`rlhf.distributed.gather_rng_states`), written atomically; then only the newest `keep`
    checkpoints are kept."""
    path = Path(ckpt_dir) / f"step_{update:05d}"
    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states},
                   tmp / "state.pt")
        atomic_write_json(tmp / "trainer_state.json", {
            "update": update, "kl_ctl": kl_ctl.state_dict(), "processes": len(rng_states), "fingerprint": fingerprint})
    if keep is not None:
        for old in sorted(Path(ckpt_dir).glob("step_*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler, kl_ctl, process_index: int = 0,
                    num_processes: int = 1) -> int:
    """Restore a checkpoint written by `save_checkpoint`, this process's random streams included; returns the
    number of updates done. Saved by another number of processes, the streams are not restored (with a warning):
    the run goes on, but no longer draws what an uninterrupted one would."""
    state = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
    model.load_state_dict(weights, strict=False)
    extra = torch.load(path / "state.pt", weights_only=True)
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


def resume(out: Path, fingerprint: str, model, optimizer, scheduler, kl_ctl, total: int, process_index: int = 0,
           num_processes: int = 1) -> int:
    """The updates done, restored from the newest checkpoint of this config in `out/checkpoints`, with the logs
    cut back to it; 0 and a clean folder (logs, checkpoints, W&B run id gone) when there is none."""
    ckpt = latest_checkpoint(out / "checkpoints", fingerprint)
    if ckpt is None:
        for stale in (*LOGS, "wandb_run_id"):  # a start from scratch: a new W&B run too
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
        return 0
    start = load_checkpoint(ckpt, model, optimizer, scheduler, kl_ctl, process_index, num_processes)
    if process_index == 0:  # drop metrics and samples logged after the checkpoint
        print(f"resuming PPO from {ckpt} (update {start}/{total})", file=sys.stderr)
        for logged in LOGS:
            rows = [r for r in read_jsonl(out / logged) if r["step"] <= start] if (out / logged).exists() else []
            (out / logged).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return start


def save_policy(model: PolicyAndValue, tokenizer, out: Path, merge_lora: bool) -> None:
    """The final policy as a plain HF causal-LM folder with its tokenizer and chat template."""
    policy = model.policy
    with atomic_dir(out) as tmp:
        if hasattr(policy, "merge_and_unload") and merge_lora:
            copy.deepcopy(policy).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
        else:
            policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def policy_from_checkpoint(cfg, ckpt: Path, dtype):
    """The policy of a PPO checkpoint as a plain causal LM (base weights + saved trainable weights)."""
    policy = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code)
    if cfg.ppo.lora:
        policy = add_lora(policy, cfg.ppo)
    weights = {k[len("policy."):]: v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
               if k.startswith("policy.")}
    missing = {k for k, p in policy.named_parameters() if p.requires_grad} - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {ckpt} lacks policy weights (e.g. {sorted(missing)[0]})")
    policy.load_state_dict(weights, strict=False)
    return policy.merge_and_unload() if cfg.ppo.lora else policy
