"""Preference pairs: the `prefs` stage, loading a dataset or simulating annotators with a gold judge.

Output, in `<run_dir>/prefs/`: `train.jsonl` and `test.jsonl`, one pair per line
(`prompt`, `chosen`, `rejected`, optional `margin`, and `chosen_gold` / `rejected_gold` /
`gold_label_agrees` when simulated), and `stats.json` with the counts of what was kept and dropped.

Accepted dataset rows (`source: load`):
- explicit prompt: `prompt`, `chosen`, `rejected` strings (or `prompt` as chat messages);
- conversational: `chosen` / `rejected` as message lists sharing their first turns (hh-rlhf,
  UltraFeedback style), the prompt being the shared turns;
- implicit prompt: `chosen` / `rejected` full texts sharing a prefix, which is split off;
- optional numeric `margin`.
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from reward_models.judges import get_judge
from rlhf.config import PipelineConfig
from rlhf.generation import generate_texts, stop_token_ids
from rlhf.models import default_dtype, load_causal_lm, load_tokenizer, stage_device
from rlhf.prompts import encode_config_prompts, load_prompts, load_rows
from rlhf.tracking import Tracker
from rlhf.utils import UserError, atomic_write_json, fault_context, write_jsonl

Pair = dict[str, Any]


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and len(value) > 0 and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in value)


def split_implicit_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split the shared prefix off two texts, at the last "Assistant:" turn or else at a word boundary."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    prefix = chosen[:n]
    marker = prefix.rfind("Assistant:")
    if marker >= 0:
        n = marker + len("Assistant:")
    elif n < min(len(chosen), len(rejected)):
        n = max(prefix.rfind(" "), prefix.rfind("\n")) + 1
    return chosen[:n], chosen[n:].strip(), rejected[n:].strip()


def normalize_pair(row: dict[str, Any]) -> tuple[Pair | None, str]:
    """One dataset row as {prompt, chosen, rejected[, margin]}, or (None, reason it was dropped)."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    if chosen is None or rejected is None:
        return None, "missing chosen/rejected"
    if _is_messages(chosen) and _is_messages(rejected):
        if chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
            return None, "conversation does not end with an assistant turn"
        if prompt is None:
            shared = chosen[:-1]
            if shared != rejected[:-1] or not shared:
                return None, "conversations do not share their prompt turns"
            prompt = shared
        chosen, rejected = chosen[-1]["content"], rejected[-1]["content"]
    elif isinstance(chosen, str) and isinstance(rejected, str):
        if prompt is None:
            prompt, chosen, rejected = split_implicit_prompt(chosen, rejected)
    else:
        return None, "wrong types"
    if isinstance(prompt, list):
        if not _is_messages(prompt):
            return None, "wrong types"
    elif not isinstance(prompt, str):
        return None, "wrong types"
    if not (prompt.strip() if isinstance(prompt, str) else prompt):
        return None, "empty prompt"
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        return None, "wrong types"
    if not chosen.strip() or not rejected.strip():
        return None, "empty text"
    if chosen.strip() == rejected.strip():
        return None, "identical chosen and rejected"
    pair: Pair = {"prompt": prompt.strip() if isinstance(prompt, str) else prompt,
                  "chosen": chosen.strip(), "rejected": rejected.strip()}
    if row.get("margin") is not None:
        margin = row["margin"]
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin):
            return None, "non-numeric margin"
        pair["margin"] = float(margin)
    return pair, ""


def load_pairs(rows: list[dict[str, Any]], source: str = "dataset") -> tuple[list[Pair], Counter]:
    """Normalise dataset rows, dropping and counting malformed ones; no usable row is an error."""
    pairs, dropped = [], Counter()
    for row in rows:
        pair, reason = normalize_pair(row) if isinstance(row, dict) else (None, "not a mapping")
        if pair is None:
            dropped[reason] += 1
        else:
            pairs.append(pair)
    if not pairs:
        detail = ", ".join(f"{n} {r}" for r, n in dropped.most_common()) or "no rows"
        raise UserError(f"{source}: no usable preference pairs ({detail})")
    return pairs, dropped


def sigmoid(x: float) -> float:
    """1 / (1 + e^-x) without overflow: a small annotator temperature makes |x| huge (below -700, e^x is
    the value to within 1e-304)."""
    return 1.0 / (1.0 + math.exp(-x)) if x > -700 else math.exp(x)


def label_pairs(prompts: list[Any], responses: list[list[str]], gold: list[list[float]], bt_temperature: float,
                flip_rate: float, min_gold_gap: float, rng: random.Random) -> tuple[list[Pair], dict[str, float]]:
    """Simulated annotators (AlpacaFarm-style): for each pair of a prompt's responses, choose by
    Bradley-Terry on the gold scores (noiseless when the temperature is 0), then flip with `flip_rate`."""
    pairs, agree, decided, skipped = [], 0, 0, 0
    for prompt, texts, scores in zip(prompts, responses, gold):
        for i, j in itertools.combinations(range(len(texts)), 2):
            a, b, ga, gb = texts[i], texts[j], scores[i], scores[j]
            if not a.strip() or not b.strip() or a.strip() == b.strip() or abs(ga - gb) < min_gold_gap:
                skipped += 1
                continue
            if bt_temperature > 0:
                prefer_a = rng.random() < sigmoid((ga - gb) / bt_temperature)
            else:
                prefer_a = ga > gb if ga != gb else rng.random() < 0.5
            if rng.random() < flip_rate:
                prefer_a = not prefer_a
            (c, gc), (r, gr) = ((a, ga), (b, gb)) if prefer_a else ((b, gb), (a, ga))
            agrees = gc > gr if ga != gb else None
            if agrees is not None:
                decided += 1
                agree += int(agrees)
            pairs.append({"prompt": prompt, "chosen": c, "rejected": r, "chosen_gold": gc, "rejected_gold": gr,
                          "gold_label_agrees": agrees})
    stats = {"label_gold_agreement": agree / decided if decided else float("nan"), "pairs_skipped": skipped}
    return pairs, stats


def simulate_pairs(cfg: PipelineConfig, progress: bool = True) -> tuple[list[Pair], dict[str, Any]]:
    """Sample k responses per training prompt from the policy and label pairs with a noisy gold judge."""
    judge = get_judge(cfg.prefs.judge)
    rng = random.Random(cfg.run.seed)
    prompts = load_prompts(cfg.data.train_prompts, cfg.data.prompt_column, cfg.data.split)
    rng.shuffle(prompts)
    prompts = prompts[: cfg.prefs.num_prompts]
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    enc = encode_config_prompts(cfg, prompts, tokenizer)
    device = stage_device(cfg)
    model = load_causal_lm(cfg.model.policy, default_dtype(cfg.model.dtype, device),
                           cfg.model.trust_remote_code).to(device).eval()
    k = cfg.prefs.responses_per_prompt
    repeated = [ids for ids in enc.input_ids for _ in range(k)]
    torch.manual_seed(cfg.run.seed)
    texts = generate_texts(model, tokenizer, repeated, cfg.prefs.max_new_tokens, cfg.prefs.temperature,
                           cfg.prefs.batch_size, stop_token_ids(tokenizer, cfg.ppo.stop_tokens),
                           progress="sampling responses" if progress else None, device=device)
    gold = judge(texts)
    grouped = [texts[i * k:(i + 1) * k] for i in range(len(enc.prompts))]
    grouped_gold = [gold[i * k:(i + 1) * k] for i in range(len(enc.prompts))]
    pairs, stats = label_pairs(enc.prompts, grouped, grouped_gold, cfg.prefs.noise.bt_temperature,
                               cfg.prefs.noise.flip_rate, cfg.prefs.min_gold_gap, rng)
    stats.update(prompts=len(enc.prompts), prompts_truncated=enc.truncated, prompts_dropped=enc.dropped,
                 responses=len(texts), gold_mean=sum(gold) / len(gold))
    if not pairs:
        raise UserError("simulation produced no usable pairs: raise prefs.num_prompts or lower prefs.min_gold_gap")
    return pairs, stats


def split_by_prompt(pairs: list[Pair], test_fraction: float, seed: int) -> tuple[list[Pair], list[Pair]]:
    """Hold out whole prompts, so test pairs ask about prompts the reward model never saw."""
    keys = sorted({repr(p["prompt"]) for p in pairs})
    random.Random(seed).shuffle(keys)
    n_test = max(1, round(len(keys) * test_fraction)) if len(keys) > 1 else 0
    test_keys = set(keys[:n_test])
    train = [p for p in pairs if repr(p["prompt"]) not in test_keys]
    test = [p for p in pairs if repr(p["prompt"]) in test_keys]
    if not train:
        raise UserError("too few preference pairs to hold out a test split: add data or lower prefs.test_fraction")
    return train, test


def run_prefs(cfg: PipelineConfig, run_dir: Path, out: Path) -> Path:
    """The prefs stage: write train/test preference pairs and their statistics to `out` (the orchestrator
    publishes it as `<run_dir>/prefs/`)."""
    out = Path(out)
    if cfg.prefs.source == "load":
        pairs, dropped = load_pairs(load_rows(cfg.prefs.dataset, cfg.prefs.dataset_split), cfg.prefs.dataset)
        stats: dict[str, Any] = {"rows_dropped": dict(dropped), "rows_dropped_total": sum(dropped.values())}
    else:
        with fault_context("prefs"):
            pairs, stats = simulate_pairs(cfg)
    if cfg.prefs.max_pairs > 0:
        pairs = pairs[: cfg.prefs.max_pairs]
    train, test = split_by_prompt(pairs, cfg.prefs.test_fraction, cfg.run.seed)
    stats.update(source=cfg.prefs.source, pairs_train=len(train), pairs_test=len(test))
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    atomic_write_json(out / "stats.json", stats)
    tracker = Tracker(cfg, "prefs", out)
    tracker.log({f"prefs/{k}": v for k, v in stats.items() if isinstance(v, (int, float))}, step=0)
    tracker.finish()
    Console(stderr=True).print(
        "prefs: " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items()))
    return out
