"""The `eval` stage: reference vs trained policy on held-out prompts.

Both models answer the same prompts with the same sampling settings and seed. Outputs in
`<run_dir>/eval/`:
- `generations.jsonl`: per prompt `prompt`, `ref_response`, `policy_response`, `ref_score`,
  `policy_score` (reward model), `ref_gold`, `policy_gold` (gold judge), `kl` (the policy's KL to the
  reference along its answer: the full-vocabulary KL at each response position, summed), `kl_sampled` (the
  sum over the answer's tokens of log π - log π_ref, the k1 estimate of the same), `ref_length`,
  `policy_length`;
- `metrics.json`: the aggregates documented in `METRICS` below;
- `samples.jsonl`: the first 64 rows again, with `step`, as logged to W&B as a table;
- `checkpoints.jsonl` (with `eval.checkpoints: true`): the metrics of every kept PPO checkpoint
  and of the final policy, a curve of scores against KL;
- `frontier.jsonl` (with `eval.best_of_n`): would best-of-n sampling from the reference have done as
  well? One row per n, `{"method": "best_of_n", "n", "kl", "score", "gold"}` (KL analytical, scores of
  the reward model's picks), and one per PPO policy, `{"method": "ppo", "step", "kl", "score", "gold"}`
  (the final policy and, with `eval.checkpoints: true`, every kept checkpoint: PPO's path);
- `best_of_n.jsonl`: per prompt, the largest n's reference samples (`responses`, `scores`, `golds`),
  the first of them the reference's answer in generations.jsonl; the picks can be redone from it;
- `report.html`, `curves.png`, `length.png`, `frontier.png` (see rlhf.report): metrics, plots of the
  PPO run and of the frontier, samples.

Best-of-n: each prompt gets max(n) - 1 more reference samples in one batched pass (their own random
stream, so the reference and policy answers do not change); with the reference's eval answer that
makes max(n) samples, split into disjoint groups of n for each n, the reward model picks the best of
each group, and the picks' scores are averaged over groups and prompts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from tqdm.auto import tqdm

from rlhf.checkpoints import checkpoint_loads, policy_from_checkpoint, trained_updates
from rlhf.config import PipelineConfig, config_yaml
from rlhf.eval_math import (METRICS, best_of_n_frontier, best_of_n_kl, best_of_n_log_n_at_kl,  # noqa: F401
                             best_of_n_picks, best_of_n_point, bon_gold_at_kl, bon_metrics, distinct_n, standard_error,
                             win_rate)
from rlhf.generation import Responses, decode_responses, left_pad, sample, stop_token_ids
from rlhf.models import cast_parameters, default_dtype, load_causal_lm, load_tokenizer, stage_device
from rlhf.ppo_core import exact_kl_from_logits, logprobs_from_logits, zero_masked
from rlhf.ppo_models import Sequences, response_forward, rounding_generator
from rlhf.prompts import encode_config_prompts, load_prompts, prompt_text
from rlhf.report import write_report
from rlhf.stages import require_done
from rlhf.tracking import Tracker
from rlhf.utils import TrainingFault, atomic_write_json, fault_context, warn, write_jsonl
from reward_models.judges import get_judge
from reward_models.model import load_scorer

BON_SEED_OFFSET = 1_000_003  # seed of the best-of-n samples' random stream, apart from the eval answers'


def answer_logprobs(policy, reference, seqs: Sequences, responses: Responses, temperature: float,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-token logprobs (B, R) of the responses under the policy, the same under the reference, exact KL
    (B, R) of the policy to the reference at each response position), all 0 after the stop token.

    The exact KL sums π (log π − log π_ref) over the whole vocabulary at each position, both at the sampling
    temperature. Its masked sum over an answer is an unbiased estimate of the sequence KL, like the sampled
    (k1) sum of log π − log π_ref over the answer's tokens, with a smaller variance: the k1 sum also carries
    the luck of each sampled token. `batch_size` rows per forward, at most 16: the two (b, R, V) float32
    distributions stay small."""
    step = max(1, min(batch_size, 16))
    lps, ref_lps, kls = [], [], []
    with torch.no_grad():
        for i in range(0, responses.ids.shape[0], step):
            part, ids = seqs.rows(slice(i, i + step)), responses.ids[i:i + step]
            logits, ref_logits = response_forward(policy, part)[0], response_forward(reference, part)[0]
            ref_full = torch.log_softmax(ref_logits.float() / temperature, dim=-1)  # (b, R, V)
            lps.append(logprobs_from_logits(logits, ids, temperature))
            ref_lps.append(torch.gather(ref_full, -1, ids.unsqueeze(-1)).squeeze(-1))
            kls.append(exact_kl_from_logits(logits, ref_full, temperature))
            del logits, ref_logits, ref_full
    mask = responses.mask
    return tuple(zero_masked(torch.cat(x), mask) for x in (lps, ref_lps, kls))


def sample_batches(model, tokenizer, prompt_ids: list[list[int]], cfg: PipelineConfig, device, desc: str,
                   seed: int | None = None):
    """[(prompt ids, prompt mask, Responses)] per batch; the batch from prompt i on is
    sampled with seed + i (seed: `run.seed` by default), so every model answers each prompt under the
    same random stream."""
    ec = cfg.eval
    stop_ids = stop_token_ids(tokenizer, cfg.ppo.stop_tokens)
    out = []
    for start in tqdm(range(0, len(prompt_ids), ec.batch_size), desc=desc, unit="batch"):
        ids, mask = left_pad(prompt_ids[start:start + ec.batch_size], tokenizer.pad_token_id, device)
        torch.manual_seed((cfg.run.seed if seed is None else seed) + start)
        out.append((ids, mask, sample(model, ids, mask, ec.max_new_tokens, ec.temperature, stop_ids,
                                      tokenizer.pad_token_id, greedy=ec.greedy)))
    return out


def policy_answers(policy, reference, tokenizer, prompt_ids, cfg: PipelineConfig, device, desc: str):
    """Per batch of the eval's policy answers: (Responses, per-token logprobs (B, R) under the policy, the same
    under the reference, exact per-position KL (B, R)), 0 after the stop token (see `answer_logprobs`)."""
    temp = 1.0 if cfg.eval.greedy else cfg.eval.temperature
    for ids, mask, responses in sample_batches(policy, tokenizer, prompt_ids, cfg, device, desc):
        seqs = Sequences.join(ids, mask, responses.ids, responses.mask)
        yield responses, *answer_logprobs(policy, reference, seqs, responses, temp, cfg.eval.batch_size)


def measure_policy(policy, reference, tokenizer, prompt_ids, cfg: PipelineConfig, device, desc: str) -> dict:
    """The policy's responses, their length, their KL to the reference (exact per position, and sampled) and
    their logprob under the reference."""
    r: dict[str, list] = {"texts": [], "length": [], "kl": [], "kl_sampled": [], "ref_logprob": []}
    for responses, lp, ref_lp, kl in policy_answers(policy, reference, tokenizer, prompt_ids, cfg, device, desc):
        r["kl"] += kl.sum(1).tolist()
        r["kl_sampled"] += (lp - ref_lp).sum(1).tolist()
        r["ref_logprob"] += ref_lp.sum(1).tolist()
        r["texts"] += decode_responses(tokenizer, responses)
        r["length"] += responses.lengths.tolist()
    return r


def summarize(cfg: PipelineConfig, ref: dict, pol: dict) -> dict[str, Any]:
    """The METRICS of one policy against the reference, from per-prompt scores."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    metrics: dict[str, Any] = {
        "num_prompts": len(pol["texts"]), "policy_score": mean(pol["score"]), "ref_score": mean(ref["score"]),
        "kl": mean(pol["kl"]), "kl_se": standard_error(pol["kl"]), "kl_sampled": mean(pol["kl_sampled"]),
        "policy_length": mean(pol["length"]), "ref_length": mean(ref["length"]),
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


def sample_best_of_n(reference, tokenizer, prompt_ids: list[list[int]], cfg: PipelineConfig, device,
                     extra: int) -> list[str]:
    """`extra` more reference answers per prompt (prompt-major: prompt 0's, then prompt 1's, ...), in one
    batched pass on a random stream of their own, so the eval answers sampled before and after stay as
    they were."""
    repeated = [ids for ids in prompt_ids for _ in range(extra)]
    texts: list[str] = []
    for _, _, responses in sample_batches(reference, tokenizer, repeated, cfg, device,
                                          f"reference, best-of-{extra + 1} samples", seed=cfg.run.seed + BON_SEED_OFFSET):
        texts += decode_responses(tokenizer, responses)
    return texts


def evaluate_policies(cfg: PipelineConfig, policies: dict[str, Any], reward_dir: Path, prompts: list[Any],
                      device) -> tuple[dict[str, tuple[dict[str, Any], list[dict[str, Any]]]],
                                       list[dict[str, Any]] | None]:
    """Metrics and per-prompt rows of each policy against the reference, whose answers are sampled once,
    and the best-of-n samples of the reference (None without `eval.best_of_n` or when decoding greedily):
    per prompt `prompt`, `responses`, `scores`, `golds` (None without a gold judge), the reference's eval
    answer first.

    `policies` maps a name to a function that loads that policy (one is in memory at a time)."""
    dtype = default_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    enc = encode_config_prompts(cfg, prompts, tokenizer)
    reference = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).to(device).eval()
    ref: dict[str, Any] = {"texts": [], "length": []}
    for _, _, responses in sample_batches(reference, tokenizer, enc.input_ids, cfg, device, "reference"):
        ref["texts"] += decode_responses(tokenizer, responses)
        ref["length"] += responses.lengths.tolist()
    measured = {}
    for name, load in policies.items():
        policy = load(dtype).to(device).eval()
        measured[name] = measure_policy(policy, reference, tokenizer, enc.input_ids, cfg, device, name)
        del policy
    max_n = 0 if cfg.eval.greedy else max(cfg.eval.best_of_n, default=0)  # greedy: n copies of one answer
    extra = sample_best_of_n(reference, tokenizer, enc.input_ids, cfg, device, max_n - 1) if max_n > 1 else []
    del reference

    score = load_scorer(reward_dir, cfg, device, dtype)
    judge = get_judge(cfg.prefs.judge) if cfg.prefs.judge else None
    for r in [ref, *measured.values()]:
        r["score"] = score(enc.prompts, r["texts"]).tolist()
        if not all(math.isfinite(s) for s in r["score"]):
            raise TrainingFault(f"the reward model in {reward_dir} gives non-finite scores; retrain it "
                                f"(rlhf reward CONFIG --force)")
        r["gold"] = judge(r["texts"]) if judge else None
    bon = None
    if max_n:  # the best-of-n samples of each prompt: its eval answer, then the max_n - 1 more
        scores = score([p for p in enc.prompts for _ in range(max_n - 1)], extra).tolist()
        golds = judge(extra) if judge and extra else []
        part = lambda xs, i: xs[i * (max_n - 1):(i + 1) * (max_n - 1)]  # noqa: E731
        bon = [{"prompt": prompt_text(enc.prompts[i]), "responses": [ref["texts"][i], *part(extra, i)],
                "scores": [ref["score"][i], *part(scores, i)],
                "golds": [ref["gold"][i], *part(golds, i)] if judge else None} for i in range(len(enc.prompts))]
    results = {}
    for name, pol in measured.items():
        rows = [{"prompt": prompt_text(enc.prompts[i]), "ref_response": ref["texts"][i],
                 "policy_response": pol["texts"][i], "ref_score": ref["score"][i], "policy_score": pol["score"][i],
                 "ref_gold": ref["gold"][i] if judge else None, "policy_gold": pol["gold"][i] if judge else None,
                 "kl": pol["kl"][i], "kl_sampled": pol["kl_sampled"][i], "ref_length": ref["length"][i],
                 "policy_length": pol["length"][i]}
                for i in range(len(enc.prompts))]
        results[name] = (summarize(cfg, ref, pol), rows)
    return results, bon


def eval_prompts(cfg: PipelineConfig) -> list[Any]:
    """The held-out prompts the eval stage answers: `eval.prompts` (its `data.split`) or `data.test_prompts`."""
    source = cfg.eval.prompts or cfg.data.test_prompts
    split = cfg.data.test_split if cfg.eval.prompts is None else cfg.data.split
    return load_prompts(source, cfg.data.prompt_column, split, cfg.eval.num_prompts)


def final_policy(cfg: PipelineConfig, ppo_dir: Path, dtype: torch.dtype):
    """The PPO stage's saved policy in `dtype`: read in fp32 and narrowed by stochastic rounding, as PPO's
    sampler is (`sync_sampler`; a bf16-saved policy reads back exactly)."""
    policy = load_causal_lm(str(ppo_dir / "policy"), torch.float32, cfg.model.trust_remote_code)
    return cast_parameters(policy, dtype, rounding_generator(cfg.run.seed, "cpu"))


def run_eval(cfg: PipelineConfig, run_dir: Path, out: Path) -> Path:
    """The eval stage (see the module docstring)."""
    reward_dir = require_done(cfg, run_dir, "reward", "eval") / "model"
    ppo_dir = require_done(cfg, run_dir, "ppo", "eval")
    out = Path(out)
    device = stage_device(cfg)
    prompts = eval_prompts(cfg)

    policies, final_step = {}, trained_updates(ppo_dir, cfg.ppo.num_updates)
    if cfg.eval.checkpoints:
        for ckpt in sorted((ppo_dir / "checkpoints").glob("step_*")):
            if int(ckpt.name.split("_")[1]) == final_step:
                continue  # the same weights as the final policy
            if not checkpoint_loads(ckpt):
                warn(f"checkpoint {ckpt} is damaged (its files do not load): not evaluated")
                continue
            policies[ckpt.name] = lambda dtype, ckpt=ckpt: policy_from_checkpoint(cfg, ckpt, dtype)
    policies["final"] = lambda dtype: final_policy(cfg, ppo_dir, dtype)
    with fault_context("eval"):
        results, bon = evaluate_policies(cfg, policies, reward_dir, prompts, device)
    frontier = best_of_n_frontier(bon, cfg.eval.best_of_n) if bon else None
    for m, _ in results.values():
        m.update(bon_metrics(frontier, m["kl"]) if frontier else {})
    metrics, rows = results.pop("final")
    write_jsonl(out / "generations.jsonl", rows)
    atomic_write_json(out / "metrics.json", metrics)
    curve = [{"checkpoint": name, "step": int(name.split("_")[1]), **m} for name, (m, _) in results.items()]
    curve.append({"checkpoint": "final", "step": final_step, **metrics})
    if results:  # the curve over checkpoints, then the final policy
        write_jsonl(out / "checkpoints.jsonl", curve)
    if frontier:  # best-of-n, then PPO's path: its checkpoints and the final policy
        frontier += [{"method": "ppo", "step": r["step"], "kl": r["kl"], "score": r["policy_score"],
                      "gold": r.get("policy_gold")} for r in curve]
        write_jsonl(out / "best_of_n.jsonl", bon)
        write_jsonl(out / "frontier.jsonl", frontier)
    else:  # no frontier this time: none from an earlier run may stand in the report
        for name in ("best_of_n.jsonl", "frontier.jsonl"):
            (out / name).unlink(missing_ok=True)

    tracker = Tracker(cfg, "eval", out)
    tracker.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=0)
    # a table name other than "generations": Tracker.log_table appends to <name>.jsonl, which would
    # duplicate the rows of generations.jsonl
    tracker.log_table("samples", rows[:64], step=0)
    try:
        report = write_report(Path(run_dir), out, config_yaml(cfg))
        for name in ("curves", "length", "frontier"):
            if report.with_name(f"{name}.png").exists():
                tracker.log_image(f"eval/{name}", report.with_name(f"{name}.png"))
    except Exception as e:  # the metrics are written: a failed report must not fail the stage
        Console(stderr=True).print(f"[yellow]eval: report not written ({type(e).__name__}: {e})[/yellow]")
    tracker.log_summary({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    tracker.finish()
    Console(stderr=True).print("eval: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()
                                                    if isinstance(v, float)))
    return out
