"""The `eval` stage: reference vs trained policy on held-out prompts.

Both models answer the same prompts with the same sampling settings and seed. Outputs in
`<run_dir>/eval/`:
- `generations.jsonl`: per prompt `prompt`, `ref_response`, `policy_response`, `ref_score`,
  `policy_score` (reward model), `ref_gold`, `policy_gold` (gold judge), `kl` (sum over the
  policy's response tokens of log π - log π_ref), `ref_length`, `policy_length`;
- `metrics.json`: the aggregates documented in `METRICS` below;
- `samples.jsonl`: the first 64 rows again, with `step`, as logged to W&B as a table;
- `checkpoints.jsonl` (with `eval.checkpoints: true`): the metrics of every kept PPO checkpoint
  and of the final policy, a curve of scores against KL;
- `report.html`, `curves.png`, `length.png` (see rlhf.report): metrics, plots of the PPO run, samples.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import torch

from rlhf.config import PipelineConfig
from rlhf.utils import TrainingFault, atomic_write_json, fault_context, warn, write_jsonl

METRICS = {
    "num_prompts": "held-out prompts evaluated",
    "policy_score": "mean normalised reward-model score of the policy's responses",
    "ref_score": "the same for the reference (about 0 by the RM's normalisation)",
    "policy_gold": "mean gold-judge score of the policy's responses",
    "ref_gold": "the same for the reference",
    "gold_gain": "policy_gold - ref_gold",
    "kl": "mean sequence KL(policy || reference) on the policy's responses, in nats (k1 estimate)",
    "win_rate_gold": "share of prompts where the policy's gold score beats the reference's (ties count 1/2)",
    "win_rate_gold_ci": "bootstrap 95% interval of win_rate_gold",
    "win_rate_rm": "the same by reward-model score",
    "win_rate_rm_ci": "bootstrap 95% interval of win_rate_rm",
    "policy_length": "mean response length in tokens (policy)",
    "ref_length": "mean response length in tokens (reference)",
    "policy_distinct_1": "distinct unigrams / unigrams over the policy's responses",
    "policy_distinct_2": "distinct bigrams / bigrams over the policy's responses",
    "ref_distinct_1": "the same for the reference",
    "ref_distinct_2": "the same for the reference",
    "policy_ppl_under_ref": "perplexity of the policy's responses under the reference model",
}


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def win_rate(a: list[float], b: list[float], samples: int, seed: int) -> tuple[float, list[float]]:
    """Share of a > b (ties 1/2) and its bootstrap 95% interval."""
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(wins)
    boot = sorted(sum(wins[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo, hi = boot[int(0.025 * (samples - 1))], boot[int(0.975 * (samples - 1))]
    return sum(wins) / n, [lo, hi]


@torch.no_grad()
def sequence_logprobs(model, query_responses, attention_mask, responses, response_mask, context_length: int,
                      temperature: float, batch_size: int) -> torch.Tensor:
    """Per-token logprobs (B, R) of the responses under `model`, masked after the stop token."""
    from rlhf.rollout import forward_logprobs

    logprobs, _ = forward_logprobs(None, model, query_responses, attention_mask, responses, context_length,
                                   temperature, batch_size, with_values=False)
    return logprobs * response_mask


def encode_eval_prompts(cfg: PipelineConfig, prompts: list[Any], tokenizer):
    from rlhf.prompts import encode_prompts

    return encode_prompts(prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.long_prompts,
                          cfg.model.use_chat_template, cfg.model.system_prompt)


def sample_batches(model, tokenizer, prompt_ids: list[list[int]], cfg: PipelineConfig, device, desc: str):
    """[(prompt ids, prompt mask, responses, response mask)] per batch; batch i is sampled with seed + i,
    so every model answers each prompt under the same random stream."""
    from tqdm.auto import tqdm

    from rlhf.generation import left_pad, sample, stop_token_ids

    ec = cfg.eval
    stop_ids = stop_token_ids(tokenizer, cfg.ppo.stop_tokens)
    out = []
    for start in tqdm(range(0, len(prompt_ids), ec.batch_size), desc=desc, unit="batch"):
        ids, mask = left_pad(prompt_ids[start:start + ec.batch_size], tokenizer.pad_token_id, device)
        torch.manual_seed(cfg.run.seed + start)
        out.append((ids, mask, *sample(model, ids, mask, ec.max_new_tokens, ec.temperature, stop_ids,
                                       tokenizer.pad_token_id, greedy=ec.greedy)))
    return out


def measure_policy(policy, reference, tokenizer, prompt_ids, cfg: PipelineConfig, device, desc: str) -> dict:
    """The policy's responses, their length, and their per-sequence logprob under policy and reference."""
    from rlhf.generation import decode_responses

    temp = 1.0 if cfg.eval.greedy else cfg.eval.temperature
    r: dict[str, list] = {"texts": [], "length": [], "kl": [], "ref_logprob": []}
    for ids, mask, responses, response_mask in sample_batches(policy, tokenizer, prompt_ids, cfg, device, desc):
        qr, am = torch.cat([ids, responses], 1), torch.cat([mask, response_mask.long()], 1)
        args = (qr, am, responses, response_mask, ids.shape[1], temp, cfg.eval.batch_size)
        lp, ref_lp = sequence_logprobs(policy, *args), sequence_logprobs(reference, *args)
        r["kl"] += (lp - ref_lp).sum(1).tolist()
        r["ref_logprob"] += ref_lp.sum(1).tolist()
        r["texts"] += decode_responses(tokenizer, responses, response_mask)
        r["length"] += response_mask.sum(1).tolist()
    return r


def summarize(cfg: PipelineConfig, ref: dict, pol: dict) -> dict[str, Any]:
    """The METRICS of one policy against the reference, from per-prompt scores."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics: dict[str, Any] = {
        "num_prompts": len(pol["texts"]), "policy_score": mean(pol["score"]), "ref_score": mean(ref["score"]),
        "kl": mean(pol["kl"]), "policy_length": mean(pol["length"]), "ref_length": mean(ref["length"]),
        "policy_distinct_1": distinct_n(pol["texts"], 1), "policy_distinct_2": distinct_n(pol["texts"], 2),
        "ref_distinct_1": distinct_n(ref["texts"], 1), "ref_distinct_2": distinct_n(ref["texts"], 2),
        "policy_ppl_under_ref": math.exp(-sum(pol["ref_logprob"]) / max(sum(pol["length"]), 1)),
    }
    n_boot, seed = cfg.eval.bootstrap_samples, cfg.run.seed
    metrics["win_rate_rm"], metrics["win_rate_rm_ci"] = win_rate(pol["score"], ref["score"], n_boot, seed)
    if pol.get("gold") is not None:
        metrics.update(policy_gold=mean(pol["gold"]), ref_gold=mean(ref["gold"]))
        metrics["gold_gain"] = metrics["policy_gold"] - metrics["ref_gold"]
        metrics["win_rate_gold"], metrics["win_rate_gold_ci"] = win_rate(pol["gold"], ref["gold"], n_boot, seed)
    return metrics


def evaluate_policies(cfg: PipelineConfig, policies: dict[str, Any], reward_dir: Path, prompts: list[Any],
                      device) -> dict[str, tuple[dict[str, Any], list[dict[str, Any]]]]:
    """Metrics and per-prompt rows of each policy against the reference, whose answers are sampled once.

    `policies` maps a name to a function that loads that policy (one is in memory at a time)."""
    from rlhf.generation import decode_responses
    from rlhf.models import default_dtype, load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.prompts import prompt_text
    from reward_models.judges import get_judge
    from reward_models.model import score_texts

    dtype = default_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    enc = encode_eval_prompts(cfg, prompts, tokenizer)
    reference = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).to(device).eval()
    ref: dict[str, Any] = {"texts": [], "length": []}
    for _, _, responses, response_mask in sample_batches(reference, tokenizer, enc.input_ids, cfg, device,
                                                         "reference"):
        ref["texts"] += decode_responses(tokenizer, responses, response_mask)
        ref["length"] += response_mask.sum(1).tolist()
    measured = {}
    for name, load in policies.items():
        policy = load(dtype).to(device).eval()
        measured[name] = measure_policy(policy, reference, tokenizer, enc.input_ids, cfg, device, name)
        del policy
    del reference

    rm = load_reward_model(str(reward_dir), dtype, cfg.model.trust_remote_code).to(device).eval()
    rm_tok = load_tokenizer(str(reward_dir), cfg.model.trust_remote_code, padding_side="right")
    judge = get_judge(cfg.prefs.judge) if cfg.prefs.judge else None
    for r in [ref, *measured.values()]:
        r["score"] = score_texts(rm, rm_tok, enc.prompts, r["texts"], cfg.reward.max_length).tolist()
        if not all(math.isfinite(s) for s in r["score"]):
            raise TrainingFault(f"the reward model in {reward_dir} gives non-finite scores; retrain it "
                                f"(rlhf reward CONFIG --force)")
        r["gold"] = judge(r["texts"]) if judge else None
    results = {}
    for name, pol in measured.items():
        rows = [{"prompt": prompt_text(enc.prompts[i]), "ref_response": ref["texts"][i],
                 "policy_response": pol["texts"][i], "ref_score": ref["score"][i], "policy_score": pol["score"][i],
                 "ref_gold": ref["gold"][i] if judge else None, "policy_gold": pol["gold"][i] if judge else None,
                 "kl": pol["kl"][i], "ref_length": ref["length"][i], "policy_length": pol["length"][i]}
                for i in range(len(enc.prompts))]
        results[name] = (summarize(cfg, ref, pol), rows)
    return results


def run_eval(cfg: PipelineConfig, run_dir: Path) -> Path:
    """The eval stage (see the module docstring)."""
    from rich.console import Console

    from rlhf.pipeline import require_done
    from rlhf.prompts import load_prompts
    from rlhf.tracking import Tracker

    reward_dir = require_done(cfg, run_dir, "reward", "eval") / "model"
    ppo_dir = require_done(cfg, run_dir, "ppo", "eval")
    out = Path(run_dir) / "eval"
    device = "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"
    source = cfg.eval.prompts or cfg.data.test_prompts
    split = cfg.data.test_split if cfg.eval.prompts is None else cfg.data.split
    prompts = load_prompts(source, cfg.data.prompt_column, split, cfg.eval.num_prompts)
    from rlhf.models import load_causal_lm
    from rlhf.ppo import checkpoint_loads, policy_from_checkpoint

    policies = {}
    if cfg.eval.checkpoints:
        for ckpt in sorted((ppo_dir / "checkpoints").glob("step_*")):
            if int(ckpt.name.split("_")[1]) == cfg.ppo.num_updates:
                continue  # the same weights as the final policy
            if not checkpoint_loads(ckpt):
                warn(f"checkpoint {ckpt} is damaged (its files do not load): not evaluated")
                continue
            policies[ckpt.name] = lambda dtype, ckpt=ckpt: policy_from_checkpoint(cfg, ckpt, dtype)
    policies["final"] = lambda dtype: load_causal_lm(str(ppo_dir / "policy"), dtype, cfg.model.trust_remote_code)
    with fault_context("eval"):
        results = evaluate_policies(cfg, policies, reward_dir, prompts, device)
    metrics, rows = results.pop("final")
    write_jsonl(out / "generations.jsonl", rows)
    atomic_write_json(out / "metrics.json", metrics)
    if results:  # the curve over checkpoints, then the final policy
        curve = [{"checkpoint": name, "step": int(name.split("_")[1]), **m} for name, (m, _) in results.items()]
        curve.append({"checkpoint": "final", "step": cfg.ppo.num_updates, **metrics})
        write_jsonl(out / "checkpoints.jsonl", curve)

    tracker = Tracker(cfg, "eval", out)
    tracker.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    # a table name other than "generations": Tracker.log_table appends to <name>.jsonl, which would
    # duplicate the rows of generations.jsonl
    tracker.log_table("samples", rows[:64], step=0)
    try:
        from rlhf.report import write_report

        report = write_report(Path(run_dir))
        for name in ("curves", "length"):
            if report.with_name(f"{name}.png").exists():
                tracker.log_image(f"eval/{name}", report.with_name(f"{name}.png"))
    except Exception as e:  # the metrics are written: a failed report must not fail the stage
        Console(stderr=True).print(f"[yellow]eval: report not written ({type(e).__name__}: {e})[/yellow]")
    tracker.log_summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.finish()
    Console(stderr=True).print("eval: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                    if isinstance(v, float)))
    return out
