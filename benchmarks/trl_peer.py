"""Peer benchmark: TRL 1.12.0 `trl.experimental.ppo.PPOTrainer` (the last TRL that ships a PPO trainer).

Runs `--updates` PPO updates of TRL's PPO trainer on CPU and prints one JSON line (the last stdout line) with
per-update wall times, so they can be compared side by side with this project's PPO loop.

Protocol
  * Four fp32 CPU models loaded from one local HF folder (`--model`): policy and frozen reference
    (AutoModelForCausalLM), reward and value models (AutoModelForSequenceClassification, num_labels=1, randomly
    initialised score head -- nothing learns a reward here). Policy and value are trained in full, no PEFT, no
    gradient checkpointing, no bf16 (TRL's config defaults bf16 to True: switched off).
  * Prompts: the first `batch * updates` lines of seeds/prompts/sentiment_train.jsonl (`{"prompt": ...}`),
    tokenized without chat template and left-truncated / left-padded to exactly 16 tokens.
  * One rollout = `--batch` prompts (per_device_train_batch_size), one mini-batch (num_mini_batches=1),
    gradient_accumulation_steps=1, `--epochs` PPO epochs (num_ppo_epochs), total_episodes = updates * batch.
  * Responses are exactly 32 tokens (response_length=32). TRL sets the policy's generation_config.eos_token_id to
    `stop_token_id` (None here, stop_token=None), so `generate` never stops early; in addition the pad and eos ids
    are put in the policy's generation_config.suppress_tokens (transformers merges the model's generation_config
    into the GenerationConfig TRL builds in train()), because TRL treats the first pad token inside a response as
    its end (sequence_lengths / padding masks). Checked by wrapping TRL's `batch_generation`: the JSON reports the
    number of generated columns and the TRL-style length (position of the first pad/eos, else 32) of every
    response.
  * No sample generations, no saving, report_to none; TRL still logs its metrics dict every update (its default).
  * Timing: per-update wall time = time between consecutive `on_step_end` callbacks (the first one measured from
    `on_train_begin`; update 1 includes warm-up and is excluded from the medians). TRL calls `gc.collect()` twice
    and `empty_cache()` (torch.cuda.empty_cache on CPU: a no-op) several times per update; both are wrapped and
    timed, and the medians are also given without the gc.collect time. Peak RSS is ru_maxrss of the process.

Virtual environment (kept apart from the project's, which pins other versions):
    python -m venv .peer-venv && .peer-venv/bin/pip install torch==2.13.0 trl==1.12.0 psutil
  (resolved here to transformers 5.24.0, accelerate 1.15.0, datasets 5.2.0; nothing else was needed.)

Usage:
    .peer-venv/bin/python benchmarks/trl_peer.py --model PATH --batch 8 --epochs 1 --updates 5 \
        [--json-out FILE] [--threads N]
"""

import argparse
import gc
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as trl_ppo  # noqa: E402

PROMPTS = Path(__file__).resolve().parents[1] / "seeds" / "prompts" / "sentiment_train.jsonl"
PROMPT_LEN, RESPONSE_LEN, SEED = 16, 32, 0


class Timers:
    """Wall-clock accounting of per-update time and of TRL's own gc.collect / empty_cache calls."""

    def __init__(self):
        self.gc = self.empty_cache = 0.0
        self.gc_calls = 0
        self.marks, self.gc_marks, self.ec_marks = [], [], []
        self.gen_columns, self.lengths = set(), []

    def timed(self, fn, attr):
        def wrapper(*a, **k):
            if attr == "gc":
                self.gc_calls += 1
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                setattr(self, attr, getattr(self, attr) + time.perf_counter() - t)
        return wrapper

    def mark(self):
        self.marks.append(time.perf_counter())
        self.gc_marks.append(self.gc)
        self.ec_marks.append(self.empty_cache)


class UpdateBoundary(TrainerCallback):
    def __init__(self, timers):
        self.timers = timers

    def on_train_begin(self, args, state, control, **kw):
        self.timers.mark()

    def on_step_end(self, args, state, control, **kw):
        self.timers.mark()


def install_hooks(timers, pad_id, eos_id):
    # TRL's module does `import gc` and `from ..utils import empty_cache`: replace only its references.
    trl_ppo.gc = types.SimpleNamespace(collect=timers.timed(gc.collect, "gc"))
    trl_ppo.empty_cache = timers.timed(trl_ppo.empty_cache, "empty_cache")
    batch_generation = trl_ppo.batch_generation

    def checked_batch_generation(model, queries, *a, **k):
        query_responses, logits = batch_generation(model, queries, *a, **k)
        responses = query_responses[:, queries.shape[1]:]
        timers.gen_columns.add(responses.shape[1])
        stops = (responses == pad_id) | (responses == eos_id)
        first = torch.where(stops.any(1), stops.int().argmax(1), torch.full_like(stops[:, 0], responses.shape[1],
                                                                                  dtype=torch.long))
        timers.lengths += first.tolist()
        return query_responses, logits

    trl_ppo.batch_generation = checked_batch_generation


def prompt_dataset(tokenizer, n):
    with open(PROMPTS) as f:
        texts = [json.loads(line)["prompt"] for _, line in zip(range(n), f)]
    tokenizer.padding_side = tokenizer.truncation_side = "left"
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=PROMPT_LEN)["input_ids"]
    assert all(len(x) == PROMPT_LEN for x in ids)
    return Dataset.from_dict({"input_ids": ids})


def median_after_first(xs):
    return statistics.median(xs[1:]) if len(xs) > 1 else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--json-out")
    p.add_argument("--threads", type=int)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.set_seed(SEED)

    tok = AutoTokenizer.from_pretrained(a.model)
    pad_id, eos_id = tok.pad_token_id, tok.eos_token_id
    load = dict(dtype=torch.float32, use_kernels=False)  # as rlhf's loader: no Hub kernels
    policy = AutoModelForCausalLM.from_pretrained(a.model, **load)
    ref = AutoModelForCausalLM.from_pretrained(a.model, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, **load)
    # Fixed-length responses: never sample pad/eos (TRL already removes eos_token_id, see module docstring).
    policy.generation_config.suppress_tokens = sorted({pad_id, eos_id})

    timers = Timers()
    install_hooks(timers, pad_id, eos_id)
    out_dir = tempfile.mkdtemp(prefix="trl_peer_")
    config = PPOConfig(
        output_dir=out_dir, seed=SEED, data_seed=SEED, bf16=False, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1, num_mini_batches=1,
        local_rollout_forward_batch_size=a.batch, num_ppo_epochs=a.epochs, total_episodes=a.updates * a.batch,
        response_length=RESPONSE_LEN, stop_token=None, stop_token_id=None, missing_eos_penalty=None,
        num_sample_generations=0, save_strategy="no", eval_strategy="no", report_to="none",
    )
    trainer = PPOTrainer(
        args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward, value_model=value,
        train_dataset=prompt_dataset(tok, a.updates * a.batch), callbacks=[UpdateBoundary(timers)],
    )
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)  # PPOTrainer creates output_dir; nothing is saved in it

    m = timers.marks
    per_update = [m[i + 1] - m[i] for i in range(len(m) - 1)]
    gc_s = [timers.gc_marks[i + 1] - timers.gc_marks[i] for i in range(len(m) - 1)]
    ec_s = [timers.ec_marks[i + 1] - timers.ec_marks[i] for i in range(len(m) - 1)]
    result = {
        "peer": "trl.experimental.ppo.PPOTrainer",
        "model": Path(a.model).name, "batch": a.batch, "epochs": a.epochs, "updates": a.updates,
        "prompt_length": PROMPT_LEN, "response_length": RESPONSE_LEN,
        "threads": torch.get_num_threads(),
        "per_update_seconds": [round(x, 4) for x in per_update],
        "median_excluding_first": median_after_first(per_update),
        "gc_seconds": [round(x, 4) for x in gc_s],
        "gc_calls_per_update": timers.gc_calls / a.updates,
        "empty_cache_seconds": [round(x, 5) for x in ec_s],
        "median_excluding_first_without_gc": median_after_first([t - g for t, g in zip(per_update, gc_s)]),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
        "generated_columns": sorted(timers.gen_columns),
        "response_lengths": {"min": min(timers.lengths), "max": max(timers.lengths), "n": len(timers.lengths)},
        "versions": {"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
    }
    line = json.dumps(result)
    if a.json_out:
        Path(a.json_out).write_text(line + "\n")
    sys.stdout.write(line + "\n")


if __name__ == "__main__":
    main()
