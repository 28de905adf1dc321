"""The `ppo` stage: optimise the policy against the reward with PPO and a per-token KL penalty.

    rlhf ppo configs/default.yaml
    accelerate launch --config_file configs/accelerate/ddp.yaml -m rlhf.cli ppo configs/default.yaml

`run_ppo` reads top to bottom: collect a rollout (rlhf.rollout) -> KL-shaped rewards and GAE advantages
-> PPO epochs over mini-batches -> log -> checkpoint (rlhf.checkpoints). The math is in rlhf.ppo_core,
the models in rlhf.ppo_models. Outputs, published as `<run_dir>/ppo/` when the stage finishes:
`policy/` (a plain HF causal LM, LoRA merged; with `ppo.land_kl`, moved to that KL: rlhf.landing),
`checkpoints/step_NNNNN/` (the last `keep_checkpoints`), `metrics.jsonl`, `samples.jsonl` and, with
`ppo.land_kl`, `landing.json`. A killed run restarted with the same command resumes from its last
checkpoint.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf import ppo_core
from rlhf.checkpoints import resume, save_final_policy, save_run_checkpoint, stopped_at
from rlhf.config import PipelineConfig, PPOConfig, PPOSizes, ppo_sizes
from rlhf.distributed import (broadcast_trained_weights, configure_deepspeed, describe, full_weights,
                              gather_over_processes, global_mean, local_tensor, shards_weights, single_process_warning,
                              start_accelerator, sum_over_processes)
from rlhf.generation import stop_token_ids
from rlhf.landing import land_policy
from rlhf.models import default_dtype, stage_device
from rlhf.ppo_models import build_models, rounding_generator, sync_sampler
from rlhf.prompts import EncodedPrompts, encode_config_prompts, load_prompts, prompt_text
from rlhf.rollout import KeptForward, Rollout, collect_rollout
from rlhf.stages import require_done, stage_identity
from rlhf.tracking import Tracker
from rlhf.utils import TrainingFault, UserError, check_weights, fault_context, set_seed, warn
from reward_models.judges import get_judge, reward_function


def run_ppo(cfg: PipelineConfig, run_dir: Path, out: Path) -> Path:
    """The PPO stage (see the module docstring): reads `<run_dir>/reward/`, writes to `out`, and resumes from
    the newest checkpoint in `out/checkpoints` written for the same config and reward model."""
    pc, out = cfg.ppo, Path(out)
    reward_dir = require_done(cfg, run_dir, "reward", "ppo") / "model"
    accelerator, dtype = start_processes(cfg, "ppo")
    sizes = ppo_sizes(pc, accelerator.num_processes)

    # 0. data, models, reward, optimiser; resume from the newest checkpoint of this config, if any
    models = build_models(cfg, reward_dir, accelerator.device, dtype, sharded=shards_weights(accelerator))
    enc = training_prompts(cfg, models.tokenizer)
    score_fn = reward_function(cfg, reward_dir, accelerator.device, dtype)
    gold_fn = get_judge(cfg.prefs.judge) if cfg.prefs.judge else None
    rollout_options = rollout_settings(pc, sizes, stop_token_ids(models.tokenizer, pc.stop_tokens))
    optimizer, scheduler = make_optimizer(models.model, pc, sizes)
    configure_deepspeed(accelerator, sizes.micro_batch_size, pc.max_grad_norm)
    broadcast_trained_weights(accelerator, models.model)
    model, optimizer = accelerator.prepare(models.model, optimizer)
    trained = accelerator.unwrap_model(model)  # PolicyAndValue (its weights sharded under FSDP2 / ZeRO-3)
    kl_ctl = kl_controller(pc)
    fingerprint = stage_identity(cfg, run_dir, "ppo")
    start = resume(out, fingerprint, accelerator, trained, optimizer, scheduler, kl_ctl, pc.num_updates)
    end = start if stopped_at(out / "checkpoints", start) is not None else pc.num_updates  # ended by ppo.stop_kl
    tracker = Tracker(cfg, "ppo", out, enabled=accelerator.is_main_process)
    schedule = PromptSchedule(len(enc.prompts), pc.batch_size // pc.samples_per_prompt, ppo_seed(cfg),
                              pc.samples_per_prompt)

    for update in tqdm(range(start, end), desc="PPO", initial=start, total=pc.num_updates,
                       disable=not accelerator.is_main_process):
        t0, where = time.perf_counter(), f"ppo update {update + 1}"
        if models.sampler is not None:  # generation samples from the weights being trained
            with full_weights(accelerator, trained, trained.policy):  # FSDP2 / ZeRO-3: gathered from the shards
                rounding = rounding_generator(ppo_seed(cfg), accelerator.device, update)
                sync_sampler(models.sampler, trained.policy, rounding)
        # 1. this process's prompts, 2. rollout, 3. advantages
        local = schedule.batch(update)[accelerator.process_index * sizes.local_batch_size:][:sizes.local_batch_size]
        with accelerator.autocast(), fault_context(where):
            rollout, kept = collect_rollout(model, models.reference, [enc.prompts[i] for i in local],
                                            [enc.input_ids[i] for i in local], models.tokenizer, score_fn, gold_fn,
                                            sampler=models.sampler, **rollout_options)
        rollout = compute_advantages(rollout, kl_ctl.value, pc, reduce=sum_over_processes(accelerator))
        # ppo.stop_kl: a rollout that has reached it ends training, its policy the final one
        kl = global_mean(rollout.kl.sum(1).mean(), accelerator) if pc.stop_kl is not None else None
        if kl is not None and kl >= pc.stop_kl and update > pc.critic_warmup_updates:
            log_stop(rollout, kl, update, pc, kl_ctl, accelerator, tracker)
            save_run_checkpoint(accelerator, out / "checkpoints", trained, optimizer, scheduler, kl_ctl, update,
                                fingerprint, keep=pc.keep_checkpoints, stopped_kl=kl)
            break
        lr_scale = min(1.0, max(0.0, 1.0 - kl / pc.stop_kl)) if pc.stop_kl_brake else 1.0  # k1 may read < 0
        # 4. PPO update (value only during the critic's warm-up)
        t_train = time.perf_counter()
        with fault_context(where):
            stats = ppo_update(model, optimizer, scheduler, rollout, pc, sizes, accelerator,
                               train_policy=update >= pc.critic_warmup_updates, first_forward=kept, lr_scale=lr_scale)
        # 5. log, adapt β, checkpoint
        timings = {**rollout.timings, "train": time.perf_counter() - t_train, "update": t0}
        metrics = update_metrics(rollout, stats, timings, kl_ctl.value, scheduler.get_last_lr()[0] * lr_scale, update,
                                 pc, accelerator)
        kl_ctl.update(metrics["objective/kl"], pc.batch_size)
        tracker.log(metrics, step=update + 1)
        if (update + 1) % pc.sample_every == 0 or update == 0:
            tracker.log_table("samples", sample_rows(rollout), step=update + 1)
        if (update + 1) % pc.save_every == 0 or update + 1 == pc.num_updates:
            save_run_checkpoint(accelerator, out / "checkpoints", trained, optimizer, scheduler, kl_ctl, update + 1,
                                fingerprint, keep=pc.keep_checkpoints)

    save_final_policy(accelerator, cfg, trained, models.tokenizer, out / "policy", dtype)
    if pc.land_kl is not None:  # 6. move the saved policy to ppo.land_kl nats from the reference (rlhf.landing)
        if accelerator.is_main_process:
            with fault_context("ppo landing"):
                landing = land_policy(cfg, out / "policy", enc.input_ids, models.tokenizer, accelerator.device, dtype,
                                      ppo_seed(cfg))
            tracker.log_summary({"land/alpha": landing["alpha"], "land/kl_trained": landing["steps"][0]["kl"],
                                 "land/kl_expected": landing["kl_expected"]})
            capped = " (capped)" if landing["capped"] else ""
            print(f"ppo: landed at alpha={landing['alpha']:.3f}{capped}: exact KL on {landing['prompts']} training "
                  f"prompts {landing['steps'][0]['kl']:.2f} nats as trained, {landing['kl_expected']:.2f} expected "
                  f"(target {pc.land_kl:g})", file=sys.stderr)
        accelerator.wait_for_everyone()
    tracker.finish()
    return out / "policy"


# ---------------------------------------------------------------------------------------------
# the stage's setup


def ppo_seed(cfg: PipelineConfig) -> int:
    """The PPO stage's seed: `ppo.seed`, or `run.seed` when unset."""
    return cfg.run.seed if cfg.ppo.seed is None else cfg.ppo.seed


def start_processes(cfg: PipelineConfig, stage: str):
    """(Accelerator, dtype) of this process, seeded: the device the config asks for, bf16 autocast where
    `model.dtype` resolves to bf16, each process its own random stream (seed + process index). The main
    process says how the stage runs (engine, processes, machines) and warns of a launch that started one
    process where several were likely meant."""
    device = stage_device(cfg)
    dtype = default_dtype(cfg.model.dtype, device)
    accelerator = start_accelerator(device == "cpu", gradient_accumulation_steps=cfg.ppo.gradient_accumulation_steps,
                                    mixed_precision="bf16" if dtype == torch.bfloat16 else "no")
    set_seed(ppo_seed(cfg) + accelerator.process_index)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    if accelerator.is_main_process:
        print(describe(accelerator, stage, dtype), file=sys.stderr)
        if (warning := single_process_warning(accelerator)) is not None:
            warn(warning)
    return accelerator, dtype


def training_prompts(cfg: PipelineConfig, tokenizer) -> EncodedPrompts:
    """The encoded training prompts, at least one batch of them."""
    prompts = load_prompts(cfg.data.train_prompts, cfg.data.prompt_column, cfg.data.split, cfg.data.max_train_prompts)
    enc = encode_config_prompts(cfg, prompts, tokenizer)
    per_update = cfg.ppo.batch_size // cfg.ppo.samples_per_prompt
    if len(enc.prompts) < per_update:
        raise UserError(f"{len(enc.prompts)} training prompts, fewer than the {per_update} of one update "
                        f"(ppo.batch_size={cfg.ppo.batch_size} / ppo.samples_per_prompt={cfg.ppo.samples_per_prompt})")
    return enc


def make_optimizer(model, pc: PPOConfig, sizes: PPOSizes):
    """AdamW over the trainable weights and its linear schedule (warm-up, then decay to 0 at the last step)."""
    from transformers import get_linear_schedule_with_warmup  # transformers: only the training stages need it

    # the fused kernel: one pass over all parameters instead of a loop of small ops (~5x faster on CPU)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=pc.learning_rate,
                                  eps=1e-5, fused=True)
    return optimizer, get_linear_schedule_with_warmup(optimizer, pc.warmup_steps, sizes.optimizer_steps)


def kl_controller(pc: PPOConfig):
    if pc.adaptive_kl:
        return ppo_core.AdaptiveKLController(pc.kl_coef, pc.target_kl, pc.kl_horizon)
    return ppo_core.FixedKLController(pc.kl_coef)


def rollout_settings(pc: PPOConfig, sizes: PPOSizes, stop_ids: list[int]) -> dict[str, Any]:
    """The keyword arguments of `collect_rollout` that the config fixes for the whole run."""
    return dict(max_new_tokens=pc.max_new_tokens, temperature=pc.temperature, stop_ids=stop_ids,
                micro_batch_size=sizes.micro_batch_size, missing_eos_penalty=pc.missing_eos_penalty,
                score_clip=pc.score_clip, min_new_tokens=pc.min_new_tokens, keep_forward=sizes.keeps_rollout_forward,
                keep_ref_distribution=pc.kl_loss_coef > 0)


class PromptSchedule:
    """The prompts of each update: a fixed shuffle per pass over the data, drawn from the seed and the pass
    number alone, so a resumed run sees the prompts an uninterrupted one would. `batch_size` prompts per update,
    each `repeats` times in a row (the answers sampled per prompt)."""

    def __init__(self, num_prompts: int, batch_size: int, seed: int, repeats: int = 1):
        self.num_prompts, self.batch_size, self.seed, self.repeats = num_prompts, batch_size, seed, repeats
        self.per_pass = num_prompts // batch_size
        self.orders: dict[int, torch.Tensor] = {}

    def batch(self, update: int) -> list[int]:
        data_pass, slot = divmod(update, self.per_pass)
        if data_pass not in self.orders:
            generator = torch.Generator().manual_seed(self.seed + data_pass)
            self.orders[data_pass] = torch.randperm(self.num_prompts, generator=generator)
        prompts = self.orders[data_pass][slot * self.batch_size:(slot + 1) * self.batch_size]
        return prompts.repeat_interleave(self.repeats).tolist()


# ---------------------------------------------------------------------------------------------
# the steps of an update


def compute_advantages(rollout: Rollout, kl_coef: float, cfg, reduce=None) -> Rollout:
    """KL-shaped per-token rewards, then GAE over response tokens and whitened advantages (details 4, 6).
    Without a value function (`value_model: none`), each answer's advantage is its return (score - β·KL) less
    the mean return of its prompt's other answers, the same at all its tokens (RLOO).
    `reduce`: a sum over processes, so that whitening sees every process's batch (rlhf.distributed)."""
    mask = rollout.response_mask
    rewards, kl = ppo_core.per_token_rewards(rollout.scores, rollout.logprobs, rollout.ref_logprobs, mask,
                                             kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = ppo_core.masked_whiten(rewards, mask, shift_mean=False, reduce=reduce)
    if rollout.values is None:
        loo = ppo_core.leave_one_out_advantages(ppo_core.masked_sum(rewards, mask, dim=1), cfg.samples_per_prompt)
        advantages, returns = ppo_core.zero_masked(loo.unsqueeze(1).expand_as(rewards), mask), None
    else:
        advantages, returns = ppo_core.compute_gae(rewards, rollout.values, mask, cfg.gamma, cfg.lam)
    rollout.rewards, rollout.kl, rollout.returns = rewards, kl, returns
    rollout.advantages = ppo_core.masked_whiten(advantages, mask, reduce=reduce)
    return rollout


def scale_lr(optimizer, scheduler, scale: float) -> None:
    """Set each parameter group's learning rate to the schedule's times `scale` (1: the schedule's own)."""
    if scale != 1.0:
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr * scale


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
    from accelerate.utils import DistributedType  # accelerate: see rlhf.distributed.start_accelerator

    parameters = list(parameters)
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.XLA):
        # all of the model's, as FSDP matches them; DeepSpeed clipped inside its step and reports the norm
        norm = accelerator.clip_grad_norm_(parameters, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a replicated DTensor
    parameters = [p for p in parameters if p.grad is not None]
    accelerator.unscale_gradients()
    norm = total_norm([p.grad for p in parameters])
    if norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm


def diverged_hint(pc) -> str:
    """The likely cause of a loss, gradient or weight gone non-finite or exploding in PPO."""
    return f"ppo.learning_rate={pc.learning_rate:g} too high?"


def ppo_update(model, optimizer, scheduler, rollout: Rollout, cfg, sizes, accelerator, train_policy: bool = True,
               first_forward: KeptForward | None = None, lr_scale: float = 1.0) -> dict[str, float]:
    """PPO epochs × mini-batches × gradient accumulation over one rollout (detail 7), then a check of the
    weights (nothing is saved from diverged ones); the model is left in eval mode, as it samples.

    `first_forward`: the rollout's forward over the whole batch at the current weights (`collect_rollout(
    keep_forward=True)`); the first epoch's single micro-batch starts from it instead of computing it again.
    `lr_scale`: a factor on the schedule's learning rate for this update (`ppo.stop_kl_brake`)."""
    model.train()
    scale_lr(optimizer, scheduler, lr_scale)
    stats: dict[str, list[float]] = {}
    B = rollout.queries.shape[0]
    if first_forward is not None and sizes.micro_batch_size < B:
        raise ValueError(f"a kept rollout forward needs one micro-batch per epoch ({sizes.micro_batch_size} < {B} rows)")
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, device=rollout.queries.device)
        for start in range(0, B, sizes.local_mini_batch_size):
            where = f"PPO epoch {epoch + 1}, mini-batch {start // sizes.local_mini_batch_size + 1}"
            mini = order[start:start + sizes.local_mini_batch_size]
            for micro_start in range(0, len(mini), sizes.micro_batch_size):
                idx = mini[micro_start:micro_start + sizes.micro_batch_size]
                with accelerator.accumulate(model):
                    if first_forward is None:
                        logits, values = model(*rollout.seqs.rows(idx))
                    else:  # all rows in one micro-batch, whose order does not change the loss
                        idx, logits, values = torch.arange(B, device=idx.device), first_forward.logits, first_forward.values
                        first_forward = None  # released with its graph after this step
                        if logits is None:  # the old logprobs came from generation: the policy's forward is due
                            logits, _ = model(*rollout.seqs, what="logits")
                    mask = rollout.response_mask[idx]
                    logprobs = ppo_core.logprobs_from_logits(logits, rollout.responses.ids[idx], cfg.temperature)
                    pg_loss, pg_stats = ppo_core.policy_loss(logprobs, rollout.logprobs[idx],
                                                             rollout.advantages[idx], mask, cfg.cliprange)
                    if values is not None:
                        vf_loss, vf_stats = ppo_core.value_loss(values, rollout.values[idx], rollout.returns[idx],
                                                                mask, cfg.cliprange_value)
                    else:  # no value function (RLOO baselines)
                        vf_loss, vf_stats = torch.zeros((), device=logprobs.device), {}
                    if cfg.kl_loss_coef > 0:  # exact KL at every response position, all tokens of the vocabulary
                        exact_kl = ppo_core.masked_mean(ppo_core.exact_kl_from_logits(
                            logits, rollout.ref_distribution[idx], cfg.temperature), mask)
                        policy_term = pg_loss + cfg.kl_loss_coef * exact_kl
                        stats.setdefault("policy/exact_kl", []).append(exact_kl.item())
                    else:
                        policy_term = pg_loss
                    entropy = None
                    if cfg.entropy_coef > 0 and train_policy:  # entropy bonus over the vocabulary at each position
                        entropy = ppo_core.masked_mean(ppo_core.entropy_from_logits(logits, cfg.temperature), mask)
                        policy_term = policy_term - cfg.entropy_coef * entropy
                    loss = (policy_term if train_policy else 0.0) + cfg.vf_coef * vf_loss
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
                        scale_lr(optimizer, scheduler, lr_scale)
                    optimizer.zero_grad()
                if entropy is None:
                    with torch.no_grad():
                        entropy = ppo_core.masked_mean(ppo_core.entropy_from_logits(logits.detach(), cfg.temperature),
                                                       mask)
                for key, value in (("loss/policy", pg_loss), ("policy/entropy", entropy),
                                   ("policy/approxkl", pg_stats["approxkl"]), ("policy/clipfrac", pg_stats["clipfrac"]),
                                   ("val/ratio", pg_stats["ratio"])):
                    stats.setdefault(key, []).append(value.item())
                if vf_stats:
                    for key, value in (("loss/value", vf_loss), ("val/clipfrac", vf_stats["clipfrac"]),
                                       ("val/error", vf_stats["error"])):
                        stats.setdefault(key, []).append(value.item())
                del logits, values
    check_weights([local_tensor(p) for p in model.parameters() if p.requires_grad], None, diverged_hint(cfg),
                  gather=gather_over_processes(accelerator))
    model.eval()
    return {f"{k}_avg" if not k.startswith("val/error") else k: sum(v) / len(v) for k, v in stats.items()}


# ---------------------------------------------------------------------------------------------
# what an update logs


def sample_rows(rollout: Rollout, n: int = 8) -> list[dict[str, Any]]:
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
        "objective/entropy": ppo_core.masked_sum(-rollout.logprobs, mask, dim=1).mean(),
        "val/num_eos_tokens": rollout.responses.has_stop.float().sum(),
        "val/response_length": rollout.responses.lengths.float().mean(),
        "val/sequence_width": torch.tensor(float(rollout.seqs.input_ids.shape[1])),
        "val/advantage_mean": ppo_core.masked_mean(rollout.advantages, mask),
        "objective/kl_coef": torch.tensor(kl_coef),
    }
    if rollout.values is not None:
        m["val/value_mean"] = ppo_core.masked_mean(rollout.values, mask)
    if rollout.gold is not None:
        m["objective/gold"] = rollout.gold.float().mean()
    return {k: global_mean(v, accelerator) for k, v in m.items()}


def log_stop(rollout: Rollout, kl: float, update: int, pc: PPOConfig, kl_ctl, accelerator, tracker: Tracker) -> None:
    """The row of a rollout whose KL has reached `ppo.stop_kl` (step `update + 1`): its figures, `stopped: 1`
    and no training; the policy that sampled it, trained for `update` updates, is the final one."""
    tracker.log({**rollout_metrics(rollout, kl_ctl.value, accelerator), "stopped": 1,
                 "episodes": (update + 1) * pc.batch_size}, step=update + 1)
    if accelerator.is_main_process:
        print(f"PPO stops after {update} updates: the rollout's KL to the reference, {kl:.2f} nats, reached "
              f"ppo.stop_kl={pc.stop_kl}", file=sys.stderr)


def update_metrics(rollout: Rollout, stats: dict[str, float], timings: dict[str, float], kl_coef: float, lr: float,
                   update: int, pc: PPOConfig, accelerator) -> dict[str, float]:
    """The row of `metrics.jsonl` for one update, averaged over processes; `timings` holds the seconds of each
    phase and, as "update", the `perf_counter` at the update's start."""
    metrics = rollout_metrics(rollout, kl_coef, accelerator)
    metrics.update({k: global_mean(v, accelerator) for k, v in stats.items()})
    metrics.update({f"time/{k}": v for k, v in timings.items() if k != "update"})
    metrics.update({"lr": lr, "episodes": (update + 1) * pc.batch_size, "dist/num_processes": accelerator.num_processes,
                    "time/update": time.perf_counter() - timings["update"],
                    "tokens_per_second": metrics["val/response_length"] * pc.batch_size / timings["generate"]})
    return metrics
