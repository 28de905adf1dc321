"""The `reward` stage: train a scalar reward model on preference pairs with TRL's RewardTrainer.

Writes `<run_dir>/reward/model/` (a plain `AutoModelForSequenceClassification` folder with its
tokenizer; `config.reward_mean` / `config.reward_std` hold the normalisation that puts the
reference policy's responses at mean 0) and `<run_dir>/reward/metrics.json` (held-out accuracy
against the labels and, for simulated pairs, against the noiseless gold order; Spearman
correlation of RM scores with gold scores).
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from reward_models.data import build_dataset, build_grouped_dataset, collate_groups, index_responses
from reward_models.loss import bradley_terry_loss, pair_metrics
from reward_models.model import score_texts
from rlhf.config import PipelineConfig
from rlhf.distributed import complete_engine, describe, join_process_group, whole_copy
from rlhf.generation import generate_texts, stop_token_ids
from rlhf.models import (cast_parameters, default_dtype, load_causal_lm, load_reward_model, load_tokenizer,
                         set_training_attention, stage_device)
from rlhf.prompts import encode_config_prompts, load_prompts
from rlhf.stages import require_done
from rlhf.tracking import Tracker
from rlhf.utils import TrainingFault, UserError, atomic_dir, atomic_write_json, check_weights, read_jsonl, set_seed


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 2:
        return float("nan")
    rx, ry = torch.tensor(ranks(x)), torch.tensor(ranks(y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = (rx.norm() * ry.norm()).item()
    return float((rx * ry).sum().item() / denom) if denom > 0 else float("nan")


def evaluate_pairs(model, tokenizer, pairs: list[dict[str, Any]], max_length: int, batch_size: int = 32) -> dict:
    """Held-out accuracy (vs labels, vs noiseless gold order) and Spearman(RM score, gold score)."""
    if not pairs:
        return {}
    prompts, texts, c_idx, r_idx = index_responses(pairs)
    scores = score_texts(model, tokenizer, prompts, texts, max_length, batch_size, False).cpu()
    chosen, rejected = scores[c_idx], scores[r_idx]
    metrics = {"accuracy": (chosen > rejected).float().mean().item(), "pairs": len(pairs)}
    if "chosen_gold" in pairs[0]:
        gold_c = torch.tensor([p["chosen_gold"] for p in pairs])
        gold_r = torch.tensor([p["rejected_gold"] for p in pairs])
        decided = gold_c != gold_r
        metrics["gold_accuracy"] = ((chosen > rejected) == (gold_c > gold_r))[decided].float().mean().item()
        metrics["spearman_gold"] = spearman(torch.cat([chosen, rejected]).tolist(), torch.cat([gold_c, gold_r]).tolist())
    return metrics


def forward_logs(tracker):
    """A TrainerCallback that forwards RewardTrainer's logs to our Tracker."""
    from transformers import TrainerCallback  # ~5 s to import (transformers' Trainer): only training needs it

    class ForwardLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                tracker.log({f"reward/{k}": v for k, v in logs.items() if isinstance(v, (int, float))},
                            step=state.global_step)

    return ForwardLogs()


def reference_responses(cfg: PipelineConfig, pairs: list[dict[str, Any]], simulated: bool) -> tuple[list, list[str]]:
    """(prompts, responses) of the reference policy for normalisation: the simulated samples when the
    pairs came from the policy, else fresh samples on training prompts."""
    if simulated:
        prompts, responses, _, _ = index_responses(pairs)
        return prompts[: max(cfg.reward.normalize_samples, 2)], responses[: max(cfg.reward.normalize_samples, 2)]
    tok = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    prompts = load_prompts(cfg.data.train_prompts, cfg.data.prompt_column, cfg.data.split,
                           limit=cfg.reward.normalize_samples)
    enc = encode_config_prompts(cfg, prompts, tok)
    device = stage_device(cfg)
    policy = load_causal_lm(cfg.model.policy, default_dtype(cfg.model.dtype, device),
                            cfg.model.trust_remote_code).to(device).eval()
    torch.manual_seed(cfg.run.seed)
    texts = generate_texts(policy, tok, enc.input_ids, cfg.ppo.max_new_tokens, cfg.ppo.temperature,
                           cfg.prefs.batch_size, stop_token_ids(tok, cfg.ppo.stop_tokens), progress="reference samples",
                           device=device)
    return enc.prompts, texts


def grouped_reward_trainer():
    """TRL's RewardTrainer over prompt groups (InstructGPT, Ouyang et al. 2022): each response is scored
    once per step and all of its prompt's labelled pairs enter the Bradley-Terry loss. K responses cost
    K forward passes instead of K(K-1), and each response takes one gradient step per epoch instead
    of K-1, which InstructGPT found to overfit. Loss, margin, centring and logged metrics are TRL's
    expressions, in `reward_models/loss.py`."""
    from trl import RewardTrainer  # ~5 s to import (transformers' Trainer): only training needs it

    class GroupedRewardTrainer(RewardTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # built by `build_grouped_dataset`, already tokenised and truncated

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if self.model.training else "eval"
            outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False)
            rewards = outputs.logits.squeeze(-1)
            chosen, rejected = rewards[inputs["chosen_index"]], rewards[inputs["rejected_index"]]
            loss = bradley_terry_loss(chosen, rejected, inputs.get("margin", 0.0), self.args.center_rewards_coefficient)
            if mode == "train":
                self._total_train_tokens += self.accelerator.gather_for_metrics(
                    inputs["attention_mask"].sum()).sum().item()
            metrics = self._metrics[mode]
            metrics["num_tokens"] = [self._total_train_tokens]
            for key, value in pair_metrics(rewards, chosen, rejected).items():
                metrics[key].append(self.accelerator.gather_for_metrics(value).mean().item())
            return (loss, outputs) if return_outputs else loss

    return GroupedRewardTrainer


def diverged_hint(rc) -> str:
    """The likely cause of a reward model whose loss, weights or scores went non-finite or exploded."""
    return f"reward.learning_rate={rc.learning_rate:g} too high?"


def checked_loss(trainer_cls, rc):
    """`trainer_cls` stopping with a TrainingFault at the first non-finite loss. The Trainer itself would
    carry on (it even filters NaN out of the logged loss) and train the rest of the run on NaN weights."""
    class CheckedLoss(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            loss = result[0] if return_outputs else result
            if self.model.training and not torch.isfinite(loss.detach()).all():
                raise TrainingFault(f"reward: loss is {loss.detach().float().mean().item()} at step "
                                    f"{self.state.global_step + 1}: {diverged_hint(rc)}")
            return result

    return CheckedLoss


def on_engine(trainer_cls):
    """`trainer_cls` on the engine of the launch, as the other stages run it: the Trainer makes its own Accelerator,
    completed here as `start_accelerator` completes theirs (`complete_engine`: FSDP2 also on CPU processes, and
    under ZeRO-3 models loaded afterwards stay whole)."""
    class OnEngine(trainer_cls):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            complete_engine(self.accelerator)
            self.is_fsdp_enabled = getattr(self.accelerator.state, "fsdp_plugin", None) is not None

    return OnEngine


@contextlib.contextmanager
def stage_precision(dtype: torch.dtype):
    """Inside the block, the launch's mixed precision is the stage's `dtype` (`model.dtype`), as PPO has it:
    transformers' training arguments read it from the launch (ACCELERATE_MIXED_PRECISION, set from the accelerate
    config's `mixed_precision`), e.g. bf16 autocast on a CPU without bf16 units."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if dtype == torch.bfloat16 else "no"
    try:
        yield
    finally:
        if launched is None:
            os.environ.pop("ACCELERATE_MIXED_PRECISION")
        else:
            os.environ["ACCELERATE_MIXED_PRECISION"] = launched


def initial_reward_model(cfg: PipelineConfig, tokenizer, device: str):
    """The reward model before training, fp32: the backbone (its first `reward.num_layers` layers) with a new score
    head drawn from torch's random stream."""
    rc = cfg.reward
    model = load_reward_model(rc.backbone or cfg.model.policy, torch.float32, cfg.model.trust_remote_code,
                              rc.num_layers)
    model.config.pad_token_id = tokenizer.pad_token_id
    set_training_attention(model, device)
    return model


def trained_model(trainer, cfg: PipelineConfig, tokenizer, device: str):
    """The trained model (LoRA adapters, when trained, not merged) whole in the main process, None in the others
    (every process calls it). Weights sharded by the engine (FSDP2, ZeRO-3) are gathered and copied into a model
    of the main process's own, built as training began (`whole_copy`)."""
    model = trainer.accelerator.unwrap_model(trainer.model)

    def build():
        plain = initial_reward_model(cfg, tokenizer, device)
        if cfg.reward.lora:
            from peft import get_peft_model  # peft: only LoRA reward models need it

            plain = get_peft_model(plain, model.peft_config["default"])
        return plain

    return whole_copy(trainer.accelerator, model, model, build)


def run_reward(cfg: PipelineConfig, run_dir: Path, out: Path) -> Path:
    """The reward stage: train, evaluate, normalise and save the reward model to `out/model` (published as
    `<run_dir>/reward/model`)."""
    from trl import RewardConfig, RewardTrainer  # ~5 s to import (transformers' Trainer): only training needs it

    console = Console(stderr=True)
    prefs_dir = require_done(cfg, run_dir, "prefs", "reward")
    train_pairs, test_pairs = read_jsonl(prefs_dir / "train.jsonl"), read_jsonl(prefs_dir / "test.jsonl")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rc = cfg.reward
    tokenizer = load_tokenizer(rc.backbone or cfg.model.policy, cfg.model.trust_remote_code, padding_side="right")
    device = stage_device(cfg)
    dtype = default_dtype(cfg.model.dtype, device)
    # fp32 master weights; bf16 (where `dtype` says so) through the trainer's autocast
    set_seed(cfg.run.seed)  # the new score head is initialised from the seed
    model = initial_reward_model(cfg, tokenizer, device)
    peft_config = None
    if rc.lora:
        from peft import LoraConfig  # ~4 s to import: only LoRA reward models need it

        peft_config = LoraConfig(task_type="SEQ_CLS", r=rc.lora_r, lora_alpha=2 * rc.lora_r,
                                 target_modules="all-linear", lora_dropout=0.0)
    if rc.group_by_prompt:
        train_ds = build_grouped_dataset(tokenizer, train_pairs, rc.max_length, rc.use_margin)
        trainer_cls, collator = checked_loss(grouped_reward_trainer(), rc), collate_groups(tokenizer.pad_token_id)
    else:
        train_ds = build_dataset(tokenizer, train_pairs, rc.max_length, rc.use_margin)
        trainer_cls, collator = checked_loss(RewardTrainer, rc), None
    # several processes (accelerate launch): each takes a share of every batch
    state = join_process_group(device == "cpu")
    is_main, per_process = state.is_main_process, rc.batch_size // state.num_processes
    if per_process * state.num_processes != rc.batch_size:
        raise UserError(f"reward.batch_size={rc.batch_size} must be divisible by the number of processes "
                        f"({state.num_processes})")
    tracker = Tracker(cfg, "reward", out, enabled=is_main)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        # the Trainer makes its own Accelerator from these arguments and the launch: DeepSpeed runs even with
        # `use_cpu` (accelerate reads the launch for it), FSDP on CPU processes only through `on_engine`
        with stage_precision(dtype):
            args = RewardConfig(
                output_dir=tmp, per_device_train_batch_size=per_process,
                gradient_accumulation_steps=rc.gradient_accumulation_steps, num_train_epochs=rc.epochs,
                learning_rate=rc.learning_rate, lr_scheduler_type="linear", warmup_steps=0.05, logging_steps=5,
                save_strategy="no", report_to="none", max_length=None,
                center_rewards_coefficient=rc.center_rewards_coefficient, disable_dropout=True, seed=cfg.run.seed,
                use_cpu=device == "cpu", bf16=dtype == torch.bfloat16, dataloader_num_workers=0,
                remove_unused_columns=False,
            )
            trainer = on_engine(trainer_cls)(model=model, args=args, train_dataset=train_ds,
                                             processing_class=tokenizer, data_collator=collator,
                                             peft_config=peft_config, callbacks=[forward_logs(tracker)])
        if is_main:
            console.print(describe(trainer.accelerator, "reward", dtype))
        trainer.train()
        model = trained_model(trainer, cfg, tokenizer, device)
    if not is_main:  # the first process holds the trained weights whole (`trained_model`): it evaluates and saves them
        return out / "model"
    if rc.lora:
        model = model.merge_and_unload()
    model.eval()
    trained = model
    check_weights(list(trained.parameters()), "reward: after training", diverged_hint(rc))
    # evaluate and normalise in the dtype consumers will score in (parameters only, as their loading does)
    model = cast_parameters(copy.deepcopy(trained), dtype)

    metrics = {"train_pairs": len(train_pairs)}
    metrics.update({f"test_{k}": v for k, v in evaluate_pairs(model, tokenizer, test_pairs, rc.max_length).items()})
    simulated = bool(train_pairs) and "chosen_gold" in train_pairs[0]
    prompts, responses = reference_responses(cfg, train_pairs, simulated)
    raw = score_texts(model, tokenizer, prompts, responses, rc.max_length, normalize=False)
    mean = raw.mean().item()
    std = raw.std().item() if rc.normalize_std and len(raw) > 1 else 1.0
    if not math.isfinite(mean) or not math.isfinite(std):
        raise TrainingFault(f"reward: the reward model's scores on {len(raw)} reference responses are not finite "
                            f"(mean {mean}, std {std}), so it cannot be normalised: {diverged_hint(rc)}")
    if std <= 0:
        raise TrainingFault(f"reward: the reward model gives all {len(raw)} reference responses the same score "
                            f"({mean:.4g}), so it cannot be normalised: it learned nothing (more pairs or epochs?)")
    trained.config.reward_mean, trained.config.reward_std = mean, std
    metrics.update(reference_raw_mean=mean, reference_raw_std=std, reference_samples=len(raw))

    with atomic_dir(out / "model") as tmp:
        trained.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    atomic_write_json(out / "metrics.json", metrics)
    tracker.log({f"reward/{k}": v for k, v in metrics.items()}, step=trainer.state.global_step)
    tracker.log_summary(metrics)
    tracker.finish()
    console.print("reward: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in metrics.items()))
    return out / "model"
