"""The `ppo` stage: optimise the policy against the reward with PPO and a per-token KL penalty.

    rlhf ppo configs/default.yaml          # or: accelerate launch -m rlhf.cli ppo configs/default.yaml

Each update reads top to bottom: collect a rollout -> KL-shaped rewards and GAE advantages ->
PPO epochs over mini-batches -> log -> checkpoint. Outputs, published as `<run_dir>/ppo/` when the
stage finishes: `policy/` (a plain HF causal LM, LoRA merged), `checkpoints/step_NNNNN/` (the last
`keep_checkpoints`), `metrics.jsonl` and `samples.jsonl`. A killed run restarted with the same
command resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from rlhf import ppo_core
from rlhf.config import PipelineConfig, ppo_sizes
from rlhf.rollout import PolicyAndValue, Rollout, collect_rollout
from rlhf.stages import require_done, stage_identity
from reward_models.judges import parse_reward_spec
from rlhf.utils import (TrainingFault, UserError, atomic_dir, atomic_write_json, check_weights, fault_context,
                        read_jsonl, warn)


# ---------------------------------------------------------------------------------------------
# statistics across processes


def global_masked_whiten(values: torch.Tensor, mask: torch.Tensor, accelerator, shift_mean: bool = True):
    """`ppo_core.masked_whiten` with mean and variance taken over every process's batch."""
    mask = mask.float()
    values = torch.where(mask.bool(), values, 0.0)  # masked junk (inf/NaN) must not reach the sums
    stats = torch.stack([(values * mask).sum(), (values * values * mask).sum(), mask.sum()])
    stats = accelerator.reduce(stats, reduction="sum") if accelerator.num_processes > 1 else stats
    total, total_sq, n = stats
    mean = total / n
    var = (total_sq / n - mean**2) * n / (n - 1).clamp(min=1)  # unbiased, as masked_var
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def global_mean(value: torch.Tensor | float, accelerator) -> float:
    t = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device)
    return (accelerator.reduce(t, reduction="mean") if accelerator.num_processes > 1 else t).item()


# ---------------------------------------------------------------------------------------------
# the three steps of an update


def compute_advantages(rollout: Rollout, kl_coef: float, cfg, accelerator) -> Rollout:
    """KL-shaped per-token rewards, then GAE over response tokens and whitened advantages (details 4, 6)."""
    mask = rollout.response_mask
    rewards, kl = ppo_core.per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                             kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = global_masked_whiten(rewards, mask, accelerator, shift_mean=False)
    advantages, returns = ppo_core.compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    rollout.rewards, rollout.kl, rollout.returns = rewards, kl, returns
    rollout.advantages = global_masked_whiten(advantages, mask, accelerator)
    return rollout


def total_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all tensors together. float32 CPU tensors go through BLAS `dot`, which reads them on
    every core; `vector_norm` reduces on one core on the CPU (~2x slower over a SmolLM2 policy and critic)."""
    if tensors and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors):
        return torch.stack([torch.dot(t.reshape(-1), t.reshape(-1)) for t in tensors]).sum().sqrt()
    return torch.nn.utils.get_total_norm(tensors)


def clip_gradients(accelerator, parameters, max_norm: float) -> torch.Tensor:
    """The global gradient norm; gradients are scaled down to `max_norm` only when it is exceeded.
    torch's `clip_grad_norm_` multiplies every gradient by the clip factor even when that is 1: one
    more read and write of all gradients per step (2 GB for an fp32 SmolLM2 policy and critic)."""
    from accelerate.utils import DistributedType

    parameters = list(parameters)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
        return accelerator.clip_grad_norm_(parameters, max_norm)  # all of the model's, as FSDP matches them
    parameters = [p for p in parameters if p.grad is not None]
    accelerator.unscale_gradients()
    norm = total_norm([p.grad for p in parameters])
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def diverged_hint(pc) -> str:
    """The likely cause of a loss, gradient or weight gone non-finite or exploding in PPO."""
    return f"ppo.learning_rate={pc.learning_rate:g} too high?"


def ppo_update(model, optimizer, scheduler, rollout: Rollout, cfg, sizes, accelerator,
               train_policy: bool = True) -> dict[str, float]:
    """PPO epochs × mini-batches × gradient accumulation over one rollout (detail 7).

    A rollout collected with `keep_graph` brings the forward of the whole batch at the current weights:
    the first epoch's single micro-batch starts from it instead of computing it again."""
    stats: dict[str, list[float]] = {}
    qr, am, P = rollout.query_responses, rollout.attention_mask, rollout.queries.shape[1]
    B = qr.shape[0]
    first, rollout.first_forward = rollout.first_forward, None  # (logits or None, values), rows in rollout order
    if first is not None and sizes.micro_batch_size < B:
        raise ValueError(f"a kept rollout forward needs one micro-batch per epoch ({sizes.micro_batch_size} < {B} rows)")
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, device=qr.device)
        for start in range(0, B, sizes.local_mini_batch_size):
            where = f"PPO epoch {epoch + 1}, mini-batch {start // sizes.local_mini_batch_size + 1}"
            mini = order[start:start + sizes.local_mini_batch_size]
            for micro_start in range(0, len(mini), sizes.micro_batch_size):
                idx = mini[micro_start:micro_start + sizes.micro_batch_size]
                with accelerator.accumulate(model):
                    if first is None:
                        logits, values = model(qr[idx], am[idx], P)
                    else:  # all rows in one micro-batch, whose order does not change the loss
                        idx, (logits, values), first = torch.arange(B, device=qr.device), first, None
                        if logits is None:  # the old logprobs came from generation: the policy's forward is due
                            logits, _ = model(qr, am, P, with_values=False)
                    mask = rollout.response_mask[idx]
                    logprobs = ppo_core.logprobs_from_logits(logits, rollout.responses[idx], cfg.temperature)
                    pg_loss, pg_stats = ppo_core.policy_loss(logprobs, rollout.logprobs[idx],
                                                             rollout.advantages[idx], mask, cfg.cliprange)
                    vf_loss, vf_stats = ppo_core.value_loss(values, rollout.values[idx], rollout.returns[idx],
                                                            mask, cfg.cliprange_value)
                    loss = (pg_loss if train_policy else 0.0) + cfg.vf_coef * vf_loss
                    if not torch.isfinite(loss):
                        raise TrainingFault(f"loss is {loss.item()} (policy {pg_loss.item()}, value {vf_loss.item()}) "
                                            f"at {where}: {diverged_hint(cfg)}")
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        grad_norm = clip_gradients(accelerator, model.parameters(), cfg.max_grad_norm)
                        if not torch.isfinite(torch.as_tensor(grad_norm)):
                            raise TrainingFault(f"gradient norm is {float(grad_norm)} at {where}: {diverged_hint(cfg)}")
                        stats.setdefault("policy/grad_norm", []).append(float(grad_norm))
                    optimizer.step()
                    if accelerator.sync_gradients:  # one LR step per optimiser step, whatever the processes
                        scheduler.step()
                    optimizer.zero_grad()
                with torch.no_grad():
                    entropy = ppo_core.masked_mean(ppo_core.entropy_from_logits(logits.detach(), cfg.temperature), mask)
                for key, value in (("loss/policy", pg_loss), ("loss/value", vf_loss), ("policy/entropy", entropy),
                                   ("policy/approxkl", pg_stats["approxkl"]), ("policy/clipfrac", pg_stats["clipfrac"]),
                                   ("val/ratio", pg_stats["ratio"]), ("val/clipfrac", vf_stats["clipfrac"]),
                                   ("val/error", vf_stats["error"])):
                    stats.setdefault(key, []).append(value.item())
                del logits, values
    return {f"{k}_avg" if not k.startswith("val/error") else k: sum(v) / len(v) for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# models, rewards, checkpoints


def add_lora(policy, pc):
    """Wrap the policy with LoRA adapters on every linear layer (B starts at 0: policy == reference)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(policy, LoraConfig(task_type="CAUSAL_LM", r=pc.lora_r, lora_alpha=pc.lora_alpha,
                                             lora_dropout=0.0, target_modules="all-linear"))


def policy_from_checkpoint(cfg: PipelineConfig, ckpt: Path, dtype):
    """The policy of a PPO checkpoint as a plain causal LM (base weights + saved trainable weights)."""
    from safetensors.torch import load_file

    from rlhf.models import load_causal_lm

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


def build_models(cfg: PipelineConfig, reward_dir: Path, device, dtype):
    """(PolicyAndValue, frozen reference or None with LoRA, generation copy or None, tokenizer), as DESIGN
    detail 8 describes."""
    from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer, same_tokenizer, set_training_attention

    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    # Trained weights are fp32 (bf16 comes through autocast); LoRA's frozen base and the reference are
    # stored in `dtype` directly.
    policy = load_causal_lm(cfg.model.policy, dtype if cfg.ppo.lora else torch.float32, cfg.model.trust_remote_code)
    ref_policy = None
    if cfg.ppo.lora:
        policy = add_lora(policy, cfg.ppo)
    else:
        ref_policy = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).eval()
        ref_policy.requires_grad_(False)
    critic = None
    if cfg.ppo.value_model == "critic":
        rm_tokenizer = load_tokenizer(str(reward_dir), cfg.model.trust_remote_code)
        if same_tokenizer(rm_tokenizer, tokenizer):
            critic = load_reward_model(str(reward_dir), torch.float32, cfg.model.trust_remote_code)
        else:  # the RM reads another vocabulary: start the critic from the policy's own backbone
            critic = load_reward_model(cfg.model.policy, torch.float32, cfg.model.trust_remote_code,
                                       cfg.reward.num_layers)
    model = PolicyAndValue(policy, critic).to(device)  # records the attention the policy samples with
    for trained in (policy, critic):
        if trained is not None:
            set_training_attention(trained, device)
    model.policy.config.use_cache = True
    if ref_policy is not None:
        ref_policy.to(device)
    sampler = None
    if cfg.ppo.lora or dtype != torch.float32:
        # Generation runs from a plain copy in `dtype`, refreshed after every update: with LoRA the
        # adapters are merged into it, so sampling pays neither the adapter path nor fp32 casts.
        # It only runs under no_grad, yet its parameters keep requires_grad=True: `generate` feeds the LM head
        # a strided last-position slice, and with a frozen 3-D input/weight pair `matmul` copies the head
        # once per row (sampling measured ~25% slower on the CPU; see rollout.response_states).
        sampler = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).to(device).eval()
        sync_sampler(sampler, policy)
    return model, ref_policy, sampler, tokenizer


@torch.no_grad()
def sync_sampler(sampler, policy) -> None:
    """Copy the trained weights into the generation copy: W for full fine-tuning, W + BA for LoRA."""
    if not hasattr(policy, "get_base_model"):
        for target, source in zip(sampler.parameters(), policy.parameters()):
            target.copy_(source)
        return
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    for name, module in policy.named_modules():
        if isinstance(module, LoraLayer):
            target = sampler.get_submodule(name[len(prefix):] if name.startswith(prefix) else name)
            delta = module.get_delta_weight(module.active_adapter[0] if isinstance(module.active_adapter, list)
                                            else module.active_adapter)
            target.weight.copy_(module.base_layer.weight.float() + delta.float())


def build_score_fn(cfg: PipelineConfig, reward_dir: Path, device, dtype):
    """A function (prompts, texts) -> scores (B,) for the configured reward."""
    from reward_models.judges import get_judge
    from reward_models.model import load_scorer

    parts = []
    for name, weight in parse_reward_spec(cfg.ppo.reward):
        if name == "rm":
            parts.append((weight, load_scorer(reward_dir, cfg, device, dtype)))
        else:
            judge = get_judge(name)
            parts.append((weight, lambda p, t, judge=judge: torch.tensor(judge(t), dtype=torch.float32)))

    def score_fn(prompts, texts):
        return sum(w * fn(prompts, texts).float().to(device) for w, fn in parts)

    return score_fn


def trainable_state(model: PolicyAndValue) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.named_parameters() if v.requires_grad}


def save_checkpoint(path: Path, model, optimizer, scheduler, kl_ctl, update: int, fingerprint: str) -> None:
    """Trainable weights, optimizer, scheduler, KL controller and RNG states, written atomically."""
    from safetensors.torch import save_file

    with atomic_dir(path) as tmp:
        save_file(trainable_state(model), str(tmp / "trainable.safetensors"))
        rng = {"torch_rng": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # the GPU's stream: sampling on cuda
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), **rng},
                   tmp / "state.pt")
        atomic_write_json(tmp / "trainer_state.json", {
            "update": update, "kl_ctl": kl_ctl.state_dict(), "python_rng": repr(random.getstate()),
            "fingerprint": fingerprint})


def load_checkpoint(path: Path, model, optimizer, scheduler, kl_ctl) -> int:
    """Restore a checkpoint written by `save_checkpoint`; returns the number of updates done."""
    import ast

    from safetensors.torch import load_file

    state = json.loads((path / "trainer_state.json").read_text())
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(trainable_state(model)) - set(weights)
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
    model.load_state_dict(weights, strict=False)
    extra = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["torch_rng"])
    if "cuda_rng" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["cuda_rng"])
    random.setstate(ast.literal_eval(state["python_rng"]))
    kl_ctl.load_state_dict(state["kl_ctl"])
    return int(state["update"])


def checkpoint_loads(path: Path) -> bool:
    """Whether a checkpoint's weight and optimiser files can be read back: their headers and sizes are those
    of complete files (a file cut short by a crash or a full disk fails here, not halfway through resuming)."""
    from safetensors import safe_open

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


def save_policy(model: PolicyAndValue, tokenizer, out: Path, merge_lora: bool) -> None:
    """The final policy as a plain HF causal-LM folder with its tokenizer and chat template."""
    import copy

    policy = model.policy
    with atomic_dir(out) as tmp:
        if hasattr(policy, "merge_and_unload"):
            if merge_lora:
                copy.deepcopy(policy).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
            else:
                policy.save_pretrained(tmp, safe_serialization=True)
        else:
            policy.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def sample_rows(rollout: Rollout, n: int = 8) -> list[dict[str, Any]]:
    from rlhf.prompts import prompt_text

    kl_seq = rollout.kl.sum(1)
    return [{"query": prompt_text(rollout.prompts[i]), "response": rollout.response_texts[i],
             "score": rollout.scores[i].item(), "kl": kl_seq[i].item(),
             "gold": rollout.gold[i].item() if rollout.gold is not None else None,
             "reward": rollout.rewards[i].sum().item()} for i in range(min(n, len(rollout.prompts)))]


def rollout_metrics(rollout: Rollout, kl_coef: float, accelerator) -> dict[str, float]:
    mask = rollout.response_mask
    kl_seq = rollout.kl.sum(1)  # (B,)
    non_score = (rollout.rewards.sum(1) - rollout.scores)  # (B,) the -β·KL part
    m = {
        "objective/kl": kl_seq.mean(), "objective/scores": rollout.scores.mean(),
        "objective/non_score_reward": non_score.mean(), "objective/rlhf_reward": (rollout.scores + non_score).mean(),
        "objective/entropy": (-rollout.logprobs * mask).sum(1).mean(),
        "val/num_eos_tokens": rollout.has_stop.float().sum(), "val/response_length": mask.sum(1).float().mean(),
        "val/sequence_width": torch.tensor(float(rollout.responses.shape[1] + rollout.queries.shape[1])),
        "val/value_mean": ppo_core.masked_mean(rollout.values, mask),
        "val/advantage_mean": ppo_core.masked_mean(rollout.advantages, mask),
        "objective/kl_coef": torch.tensor(kl_coef),
    }
    if rollout.gold is not None:
        m["objective/gold"] = rollout.gold.float().mean()
    return {k: global_mean(v, accelerator) for k, v in m.items()}


# ---------------------------------------------------------------------------------------------
# the stage


def run_ppo(cfg: PipelineConfig, run_dir: Path, out: Path) -> Path:
    """The PPO stage (see the module docstring): reads `<run_dir>/reward/`, writes to `out`, and resumes from
    the newest checkpoint in `out/checkpoints` written for the same config and reward model."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    from rlhf.generation import stop_token_ids
    from rlhf.models import default_dtype, stage_device
    from rlhf.prompts import encode_config_prompts, load_prompts
    from rlhf.tracking import Tracker
    from rlhf.utils import set_seed
    from reward_models.judges import get_judge

    pc = cfg.ppo
    reward_dir = require_done(cfg, run_dir, "reward", "ppo") / "model"
    probe = stage_device(cfg)
    dtype = default_dtype(cfg.model.dtype, probe)
    accelerator = Accelerator(cpu=probe == "cpu", gradient_accumulation_steps=pc.gradient_accumulation_steps,
                              mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    sizes = ppo_sizes(pc, accelerator.num_processes)
    out = Path(out)
    fingerprint = stage_identity(cfg, run_dir, "ppo")
    set_seed(cfg.run.seed + accelerator.process_index)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)

    # 0. data, models, reward, optimiser
    model, ref_policy, sampler, tokenizer = build_models(cfg, reward_dir, accelerator.device, dtype)
    prompts = load_prompts(cfg.data.train_prompts, cfg.data.prompt_column, cfg.data.split, cfg.data.max_train_prompts)
    enc = encode_config_prompts(cfg, prompts, tokenizer)
    if len(enc.prompts) < pc.batch_size:
        raise UserError(f"{len(enc.prompts)} training prompts, fewer than ppo.batch_size={pc.batch_size}")
    score_fn = build_score_fn(cfg, reward_dir, accelerator.device, dtype)
    gold_fn = get_judge(cfg.prefs.judge) if cfg.prefs.judge else None
    stop_ids = stop_token_ids(tokenizer, pc.stop_tokens)
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel: one pass over all parameters instead of a loop of small ops (~5x faster on CPU)
    optimizer = torch.optim.AdamW(params, lr=pc.learning_rate, eps=1e-5, fused=True)
    scheduler = get_linear_schedule_with_warmup(optimizer, pc.warmup_steps, sizes.optimizer_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (ppo_core.AdaptiveKLController(pc.kl_coef, pc.target_kl, pc.kl_horizon) if pc.adaptive_kl
              else ppo_core.FixedKLController(pc.kl_coef))

    # resume from the newest checkpoint of this config, if any
    ckpt_dir = out / "checkpoints"
    start = 0
    ckpt = latest_checkpoint(ckpt_dir, fingerprint)
    if ckpt is not None:
        start = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, scheduler, kl_ctl)
        if sampler is not None:
            sync_sampler(sampler, accelerator.unwrap_model(model).policy)
        accelerator.print(f"resuming PPO from {ckpt} (update {start}/{pc.num_updates})")
    else:
        for stale in ("metrics.jsonl", "samples.jsonl", "wandb_run_id"):  # a start from scratch: a new W&B run too
            (out / stale).unlink(missing_ok=True)
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    tracker = Tracker(cfg, "ppo", out, enabled=accelerator.is_main_process)
    if ckpt is not None and accelerator.is_main_process:  # drop metrics and samples logged after the checkpoint
        for logged in ("metrics.jsonl", "samples.jsonl"):
            rows = [r for r in read_jsonl(out / logged) if r["step"] <= start] if (out / logged).exists() else []
            (out / logged).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    order_rng = torch.Generator().manual_seed(cfg.run.seed)
    epoch_orders = {}
    progress = tqdm(range(start, pc.num_updates), desc="PPO", initial=start, total=pc.num_updates,
                    disable=not accelerator.is_main_process)
    for update in progress:
        t0 = time.perf_counter()
        # 1. the prompts of this update: a fixed shuffle per pass over the data, this process's shard
        per_pass = len(enc.prompts) // pc.batch_size
        data_pass, slot = divmod(update, per_pass)
        if data_pass not in epoch_orders:
            epoch_orders[data_pass] = torch.randperm(len(enc.prompts), generator=order_rng.manual_seed(cfg.run.seed + data_pass))
        batch = epoch_orders[data_pass][slot * pc.batch_size:(slot + 1) * pc.batch_size]
        local = batch[accelerator.process_index * sizes.local_batch_size:][: sizes.local_batch_size].tolist()
        # 2. rollout, 3. advantages
        model.eval()
        with accelerator.autocast(), fault_context(f"ppo update {update + 1}"):
            rollout = collect_rollout(
                model, ref_policy, [enc.prompts[i] for i in local], [enc.input_ids[i] for i in local], tokenizer,
                score_fn, gold_fn, max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, stop_ids=stop_ids,
                micro_batch_size=sizes.micro_batch_size, missing_eos_penalty=pc.missing_eos_penalty,
                score_clip=pc.score_clip, sampler=sampler, min_new_tokens=pc.min_new_tokens,
                keep_graph=sizes.keeps_rollout_forward)
        rollout = compute_advantages(rollout, kl_ctl.value, pc, accelerator)
        # 4. PPO update (value only during critic warm-up)
        model.train()
        t_train = time.perf_counter()
        with fault_context(f"ppo update {update + 1}"):
            stats = ppo_update(model, optimizer, scheduler, rollout, pc, sizes, accelerator,
                               train_policy=update >= pc.critic_warmup_updates)
        # nothing is saved from diverged weights: checked after every update, the last included
        check_weights([p for p in model.parameters() if p.requires_grad], f"ppo update {update + 1}",
                      diverged_hint(pc), gather=accelerator.gather if accelerator.num_processes > 1 else None)
        if sampler is not None:
            sync_sampler(sampler, accelerator.unwrap_model(model).policy)
        model.eval()
        timings = {**rollout.timings, "train": time.perf_counter() - t_train}
        # 5. log, adapt β, checkpoint
        metrics = rollout_metrics(rollout, kl_ctl.value, accelerator)
        kl_ctl.update(metrics["objective/kl"], pc.batch_size)
        metrics.update({k: global_mean(v, accelerator) for k, v in stats.items()})
        metrics.update({f"time/{k}": v for k, v in timings.items()})
        metrics.update({"lr": scheduler.get_last_lr()[0], "episodes": (update + 1) * pc.batch_size,
                        "time/update": time.perf_counter() - t0,
                        "tokens_per_second": metrics["val/response_length"] * pc.batch_size / timings["generate"]})
        tracker.log(metrics, step=update + 1)
        progress.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.2f}",
                             gold=f"{metrics.get('objective/gold', float('nan')):.2f}")
        if (update + 1) % pc.sample_every == 0 or update == 0:
            tracker.log_table("samples", sample_rows(rollout), step=update + 1)
        if (update + 1) % pc.save_every == 0 or update + 1 == pc.num_updates:
            if accelerator.is_main_process:
                save_checkpoint(ckpt_dir / f"step_{update + 1:05d}", accelerator.unwrap_model(model), optimizer,
                                scheduler, kl_ctl, update + 1, fingerprint)
                for old in sorted(ckpt_dir.glob("step_*"))[: -pc.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        save_policy(accelerator.unwrap_model(model), tokenizer, out / "policy", pc.merge_lora)
    accelerator.wait_for_everyone()
    tracker.finish()
    return out / "policy"
