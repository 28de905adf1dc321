"""The eval stage's metrics as pure functions of scores: their documentation (`METRICS`), win rates,
distinct-n, and the best-of-n frontier (its analytical KL, the reward model's picks, and the gold of
best-of-n at a policy's KL). Used by the eval stage (rlhf.evaluate) and the report (rlhf.report).
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

METRICS = {
    "num_prompts": "held-out prompts evaluated",
    "policy_score": "mean normalised reward-model score of the policy's responses",
    "ref_score": "the same for the reference (about 0 by the RM's normalisation)",
    "policy_gold": "mean gold-judge score of the policy's responses",
    "ref_gold": "the same for the reference",
    "gold_gain": "policy_gold - ref_gold",
    "kl": "mean sequence KL(policy || reference) on the policy's responses, in nats: at each response position the "
          "KL over the whole vocabulary, summed over the answer (unbiased, and less noisy than kl_sampled)",
    "kl_se": "standard error of kl over the prompts",
    "kl_sampled": "the same KL estimated from the sampled tokens alone: mean sum of log π - log π_ref (k1)",
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
    "bon_gold_at_policy_kl": "gold of best-of-n from the reference at the policy's KL (interpolated in log n; "
                             "the largest n's gold when the policy's KL is beyond it)",
    "bon_policy_kl_beyond_range": "true when the policy's KL is beyond that of the largest n sampled",
}


def distinct_n(texts: list[str], n: int) -> float:
    grams = [tuple(words[i:i + n]) for t in texts for words in [t.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def standard_error(xs: list[float]) -> float:
    """Standard error of the mean of xs (0 for fewer than two)."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0


def win_rate(a: list[float], b: list[float], samples: int, seed: int) -> tuple[float, list[float]]:
    """Share of a > b (ties 1/2) and its bootstrap 95% interval."""
    wins = [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(wins)
    boot = sorted(sum(wins[rng.randrange(n)] for _ in range(n)) / n for _ in range(samples))
    lo, hi = boot[int(0.025 * (samples - 1))], boot[int(0.975 * (samples - 1))]
    return sum(wins) / n, [lo, hi]


def best_of_n_kl(n: float) -> float:
    """KL(best-of-n || reference) in nats, log n - (n - 1) / n: exact when the picking score has no
    ties, an upper bound otherwise (Stiennon et al. 2020, appendix G.3; Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n_log_n_at_kl(kl: float) -> float:
    """log n of the (real) n whose best-of-n KL is `kl`, by bisection: the KL, log n - 1 + 1/n, rises
    with n, so log n lies in [kl, kl + 1]. 0 (n = 1) for kl <= 0."""
    if kl <= 0:
        return 0.0
    lo, hi = kl, kl + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mid - 1 + math.exp(-mid) < kl else (lo, mid)
    return (lo + hi) / 2


def best_of_n_picks(scores: list[float], n: int) -> list[int]:
    """Index of the best-scoring sample in each disjoint group of n consecutive samples ([0, n),
    [n, 2n), ...; a remainder shorter than n is left out); a tie goes to the earlier sample."""
    return [max(range(start, start + n), key=lambda i: scores[i]) for start in range(0, len(scores) - n + 1, n)]


def best_of_n_point(scores: list[list[float]], golds: list[list[float]] | None, n: int) -> dict[str, Any]:
    """A frontier row: best-of-n picked by `scores` (`scores[i][j]`: sample j of prompt i), its analytical
    KL, and the mean RM score and gold of the picks over every group of every prompt (every prompt has
    as many samples, so this is also the mean over prompts of each prompt's mean)."""
    picks = [(i, j) for i, row in enumerate(scores) for j in best_of_n_picks(row, n)]
    mean = lambda values: sum(values[i][j] for i, j in picks) / len(picks)  # noqa: E731
    return {"method": "best_of_n", "n": n, "kl": best_of_n_kl(n), "score": mean(scores),
            "gold": mean(golds) if golds is not None else None}


def bon_gold_at_kl(points: list[dict[str, Any]], kl: float) -> tuple[float, bool]:
    """Best-of-n gold at a KL, and whether that KL is beyond the largest n's.

    `points` are best_of_n_point rows. The gold is linear in log n between the sampled n on either
    side of the n whose analytical KL is `kl`; below the smallest n it is that n's gold, beyond the
    largest n it is the largest n's (flagged True: the frontier there is not measured)."""
    points = sorted(points, key=lambda p: p["n"])
    if kl >= points[-1]["kl"]:
        return points[-1]["gold"], kl > points[-1]["kl"]
    if kl <= points[0]["kl"]:
        return points[0]["gold"], False
    hi = next(k for k, p in enumerate(points) if p["kl"] >= kl)
    a, b = points[hi - 1], points[hi]
    t = (best_of_n_log_n_at_kl(kl) - math.log(a["n"])) / (math.log(b["n"]) - math.log(a["n"]))
    return a["gold"] + t * (b["gold"] - a["gold"]), False


def best_of_n_frontier(bon: list[dict[str, Any]], ns: list[int]) -> list[dict[str, Any]]:
    """The best-of-n rows of the frontier, for n = 1 (the reference, KL 0) and each of `ns`, from the
    per-prompt samples of evaluate_policies."""
    golds = [row["golds"] for row in bon] if bon[0]["golds"] is not None else None
    return [best_of_n_point([row["scores"] for row in bon], golds, n) for n in sorted({1, *ns})]


def bon_metrics(frontier: list[dict[str, Any]], kl: float) -> dict[str, Any]:
    """bon_gold_at_policy_kl and its flag (see METRICS) for a policy at `kl`; nothing without gold."""
    points = [p for p in frontier if p["method"] == "best_of_n"]
    if points[0]["gold"] is None:
        return {}
    gold, beyond = bon_gold_at_kl(points, kl)
    return {"bon_gold_at_policy_kl": gold, "bon_policy_kl_beyond_range": beyond}
