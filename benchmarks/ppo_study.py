"""Rerun PPO and eval on a finished run's preference data and reward model, with overrides, and tabulate.

    python benchmarks/ppo_study.py runs/default kl0.15 ppo.kl_coef=0.15
    python benchmarks/ppo_study.py runs/default seed1 ppo.seed=1     # PPO's random stream alone
    python benchmarks/ppo_study.py runs/default --table
    python benchmarks/ppo_study.py runs/default --kl-breakdown

A trial copies `<base>/prefs` and `<base>/reward` into `<base>-study/<name>` and runs
`rlhf run <base>/config.yaml` there with the overrides (prefs and reward are then done and skipped).
Overrides of the reward stage's inputs (`reward.*`, `ppo.max_new_tokens`, `ppo.temperature`) retrain
the reward model, and the stage time says so. Unless the overrides set `eval.best_of_n`, a trial's eval
skips the best-of-n samples (`eval.best_of_n=[]`): they do not depend on the policy, so the base run's
frontier is the one every trial is read against (same reward model, reference, prompts and seed).

Each trial appends one row to `<base>-study/results.jsonl`: held-out gold, KL (exact per position, and the
sampled k1 estimate), RM score, gold win rate, length, distinct-2, the last rollout's gold and KL, the
updates trained (fewer than `ppo.num_updates` where `ppo.stop_kl` ended PPO early) and the stage seconds. `--table` prints the base run and every trial as a
Markdown table, with the best-of-n gold at each one's KL and the largest n's gold, both from the base run's
frontier (or, while the base has no eval, from the first trial that sampled the best-of-n answers).

`--interpolate A [A ...]` evaluates a finished run's final policy moved along the straight line between the
reference's weights and its own, W_ref + A (W_policy - W_ref): A < 1 towards the reference, A > 1 beyond the
policy. Each point is measured as the eval stage measures the policy (same prompts, seeds and sampling; exact
KL; RM score; gold) and is printed with the best-of-n gold at its KL from the run's frontier.

`--land KL [KL ...]` does what `ppo.land_kl` does (rlhf.landing) to a finished run's final policy, in a scratch
copy, for each KL, and evaluates the landed policy as `--interpolate` does; a trial's folder
(`<base>-study/<name>`) can be given as the run, and is read against the base run's frontier.

`--kl-breakdown` says where a finished run's KL goes: it samples the eval stage's policy answers again
(the same prompts, settings and seeds, so the same tokens), takes log π − log π_ref per token, and prints
the KL by response position and the tokens that carry the most of it. It also reads the exact KL over the
vocabulary at each position and the part of it that the policy's loss of entropy alone costs (sharpening).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rlhf.eval_math import bon_gold_at_kl  # noqa: E402


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def base_frontier(base: Path, trials: list[str] = ()) -> list[dict]:
    """The best-of-n rows of the base run's frontier or, while the base has no eval, of the first trial that
    sampled them (`eval.best_of_n` among its overrides): they depend on the reference, the reward model, the
    prompts and the seed, which every trial shares with the base."""
    study = base.with_name(base.name + "-study")
    for path in [base / "eval" / "frontier.jsonl", *(study / name / "eval" / "frontier.jsonl" for name in trials)]:
        if path.exists():
            rows = [row for row in map(json.loads, path.read_text().splitlines()) if row["method"] == "best_of_n"]
            if len(rows) > 1:
                return rows
    sys.exit(f"{base / 'eval' / 'frontier.jsonl'} is missing: run the base, or a trial with "
             "eval.best_of_n=[1,2,4,8,16], with the best-of-n frontier on")


def trial_row(trial: Path, name: str, overrides: list[str]) -> dict:
    from rlhf.checkpoints import trained_updates  # torch: only once a trial has run

    metrics = read_json(trial / "eval" / "metrics.json")
    ppo_log = [json.loads(line) for line in (trial / "ppo" / "metrics.jsonl").read_text().splitlines()]
    return {
        "name": name, "overrides": overrides,
        "gold": metrics["policy_gold"], "ref_gold": metrics["ref_gold"], "kl": metrics["kl"],
        "kl_sampled": metrics.get("kl_sampled"), "score": metrics["policy_score"],
        "win_rate_gold": metrics["win_rate_gold"],
        "policy_length": metrics["policy_length"], "distinct_2": metrics["policy_distinct_2"],
        "rollout_gold_last": ppo_log[-1].get("objective/gold"), "rollout_kl_last": ppo_log[-1].get("objective/kl"),
        "updates": trained_updates(trial / "ppo", len(ppo_log)),  # `ppo.stop_kl` may end PPO early
        "seconds": {stage: read_json(trial / stage / "_done.json")["seconds"] for stage in ("reward", "ppo", "eval")},
    }


def table(base: Path, rows: list[dict]) -> str:
    """The trials as a Markdown table, each read against the base run's best-of-n frontier."""
    points = base_frontier(base, [r["name"] for r in rows])
    largest = max(points, key=lambda p: p["n"])
    lines = [f"| trial | overrides | gold | KL | RM score | gold win rate | best-of-n gold at its KL "
             f"| best-of-{largest['n']} gold | length | distinct-2 | updates | ppo s | eval s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        bon_gold, beyond = bon_gold_at_kl(points, r["kl"])
        lines.append(f"| {r['name']} | {' '.join(r['overrides']) or '(base settings)'} | {r['gold']:.3f} | {r['kl']:.2f} "
                     f"| {r['score']:.2f} | {r['win_rate_gold']:.2f} | {bon_gold:.3f}{' (beyond)' if beyond else ''} "
                     f"| {largest['gold']:.3f} | {r['policy_length']:.1f} | {r['distinct_2']:.2f} | {r.get('updates', '')} "
                     f"| {r['seconds']['ppo']:.0f} | {r['seconds']['eval']:.0f} |")
    return "\n".join(lines)


def sharpening_split(logp, ref):
    """Per position (n,) of log-probabilities logp and ref (n, V) of the policy and the reference: (exact
    KL(π ‖ π_ref), its sharpening part, H(π), H(π_ref)). The sharpening part is KL(π_ref^(1/t) ‖ π_ref) with t
    such that the tempered reference has the policy's entropy: of all distributions with that entropy it is the
    one closest to the reference, so it is the KL that the policy's loss of entropy alone costs."""
    import torch

    entropy = -(logp.exp() * logp).sum(-1)
    lo, hi = torch.full_like(entropy, -4.0), torch.full_like(entropy, 4.0)  # log t, bisected
    for _ in range(40):
        mid = (lo + hi) / 2
        tempered = torch.log_softmax(ref / mid.exp()[:, None], -1)
        too_flat = -(tempered.exp() * tempered).sum(-1) > entropy
        hi, lo = torch.where(too_flat, mid, hi), torch.where(too_flat, lo, mid)
    tempered = torch.log_softmax(ref / ((lo + hi) / 2).exp()[:, None], -1)
    return ((logp.exp() * (logp - ref)).sum(-1), (tempered.exp() * (tempered - ref)).sum(-1), entropy,
            -(ref.exp() * ref).sum(-1))


def entropy_split(policy, reference, seqs, mask, temperature: float):
    """`sharpening_split` summed over the response tokens of a batch (`seqs`, with `mask` over the responses)."""
    import torch

    from rlhf.ppo_models import response_forward

    out = torch.zeros(4, dtype=torch.float64)
    mask = mask.bool()
    with torch.no_grad():
        for i in range(0, mask.shape[0], 8):
            part, m = seqs.rows(slice(i, i + 8)), mask[i:i + 8]
            logp = torch.log_softmax(response_forward(policy, part)[0].float() / temperature, -1)[m]  # (n, V)
            ref = torch.log_softmax(response_forward(reference, part)[0].float() / temperature, -1)[m]
            out += torch.stack([part.sum() for part in sharpening_split(logp, ref)]).double().cpu()
    return out


def kl_breakdown(run: Path, top: int = 15) -> None:
    """Per-token KL of a run's final policy on its eval prompts: by position, and the tokens carrying most."""
    from collections import defaultdict

    import torch

    from rlhf.config import load_config
    from rlhf.evaluate import eval_prompts, final_policy, policy_answers
    from rlhf.generation import left_pad
    from rlhf.models import default_dtype, load_causal_lm, load_tokenizer, stage_device
    from rlhf.ppo_models import Sequences
    from rlhf.prompts import encode_config_prompts

    cfg = load_config(run / "config.yaml", [])
    device = stage_device(cfg)
    dtype = default_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    enc = encode_config_prompts(cfg, eval_prompts(cfg), tokenizer)
    policy = final_policy(cfg, run / "ppo", dtype).to(device).eval()
    reference = load_causal_lm(cfg.model.policy, dtype, cfg.model.trust_remote_code).to(device).eval()
    kls, masks, tokens, split = [], [], [], torch.zeros(4, dtype=torch.float64)
    answers = policy_answers(policy, reference, tokenizer, enc.input_ids, cfg, device, "policy")
    for start, (responses, lp, ref_lp, _) in zip(range(0, len(enc.input_ids), cfg.eval.batch_size), answers):
        kls.append(lp - ref_lp)
        masks.append(responses.mask)
        tokens.append(responses.ids)
        ids, mask = left_pad(enc.input_ids[start:start + cfg.eval.batch_size], tokenizer.pad_token_id, device)
        split += entropy_split(policy, reference, Sequences.join(ids, mask, responses.ids, responses.mask),
                               responses.mask, 1.0 if cfg.eval.greedy else cfg.eval.temperature)
    width = max(k.shape[1] for k in kls)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
    kl, mask, ids = (torch.cat([pad(t, 0) for t in group]) for group in (kls, masks, tokens))
    mask = mask.bool()
    total = kl[mask].sum().item()
    rows = kl.shape[0]
    print(f"{run}: sequence KL {total / rows:.2f} nats over {rows} answers, "
          f"{mask.sum().item() / rows:.1f} tokens each")
    exact, sharpening, entropy, ref_entropy = (split / mask.sum().item()).tolist()
    print(f"Exact KL over the vocabulary at each position: {exact * mask.sum().item() / rows:.2f} nats per answer; "
          f"sharpening {sharpening / exact if exact > 0 else 0.0:.0%} of it (the least KL of a distribution with the "
          f"policy's entropy, {entropy:.2f} nats per token against the reference's {ref_entropy:.2f}, on the "
          f"policy's prefixes)")
    print("| response tokens | share of the KL | KL per token |\n|---|---|---|")
    edges = [0, 1, 2, 4, 8, 16, 24, width]
    for a, b in zip(edges, edges[1:]):
        part = kl[:, a:b][mask[:, a:b]]
        if part.numel():
            print(f"| {a + 1}-{b} | {part.sum().item() / total:.2f} | {part.mean().item():.3f} |")
    by_token: dict[int, list[float]] = defaultdict(list)
    for token, value in zip(ids[mask].tolist(), kl[mask].tolist()):
        by_token[token].append(value)
    print("\n| token | times | KL carried (share) | KL per use |\n|---|---|---|---|")
    for token, values in sorted(by_token.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(f"| {tokenizer.decode([token])!r} | {len(values)} | {sum(values) / total:.3f} "
              f"| {sum(values) / len(values):.2f} |")


def interpolate(run: Path, alphas: list[float]) -> None:
    """Evaluate `run`'s final policy interpolated towards (alpha < 1) or extrapolated away from (alpha > 1) the
    reference in weight space, on the eval stage's prompts and settings; print one row per alpha."""
    import torch

    from rlhf.config import load_config
    from rlhf.evaluate import eval_prompts, evaluate_policies
    from rlhf.models import cast_parameters, load_causal_lm, stage_device
    from rlhf.ppo_models import rounding_generator

    cfg = load_config(run / "config.yaml", ["eval.best_of_n=[]", "tracking.wandb=off"])

    def load(alpha: float):
        def build(dtype):
            policy = load_causal_lm(str(run / "ppo" / "policy"), torch.float32, cfg.model.trust_remote_code)
            reference = load_causal_lm(cfg.model.policy, torch.float32, cfg.model.trust_remote_code)
            ref_params = dict(reference.named_parameters())
            with torch.no_grad():
                for name, param in policy.named_parameters():
                    param.lerp_(ref_params[name].to(param.dtype), 1.0 - alpha)  # ref + alpha (policy - ref)
            return cast_parameters(policy, dtype, rounding_generator(cfg.run.seed, "cpu"))
        return build

    results, _ = evaluate_policies(cfg, {f"alpha={a:g}": load(a) for a in alphas}, run / "reward" / "model",
                                   eval_prompts(cfg), stage_device(cfg))
    points = base_frontier(run)
    print("| alpha | gold | KL | KL (k1) | RM score | gold win rate | best-of-n gold at its KL |")
    print("|---|---|---|---|---|---|---|")
    for name, (m, _) in results.items():
        bon_gold, beyond = bon_gold_at_kl(points, m["kl"])
        print(f"| {name.split('=')[1]} | {m['policy_gold']:.3f} | {m['kl']:.2f} | {m['kl_sampled']:.2f} "
              f"| {m['policy_score']:.2f} | {m['win_rate_gold']:.2f} | {bon_gold:.3f}{' (beyond)' if beyond else ''} |",
              flush=True)


def land(run: Path, targets: list[float]) -> None:
    """Land a finished run's final policy at each KL of `targets` as `ppo.land_kl` does (rlhf.landing, on
    training prompts), in a scratch copy, and evaluate it on the eval stage's prompts and settings; print one
    row per target."""
    import tempfile

    from rlhf.config import load_config
    from rlhf.evaluate import eval_prompts, evaluate_policies, final_policy
    from rlhf.landing import land_policy
    from rlhf.models import default_dtype, load_tokenizer, stage_device
    from rlhf.ppo import ppo_seed, training_prompts

    cfg = load_config(run / "config.yaml", ["eval.best_of_n=[]", "tracking.wandb=off"])
    device = stage_device(cfg)
    dtype = default_dtype(cfg.model.dtype, device)
    tokenizer = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code)
    prompt_ids = training_prompts(cfg, tokenizer).input_ids
    points = base_frontier(run if (run / "eval" / "frontier.jsonl").exists() else run.parent.with_name(
        run.parent.name.removesuffix("-study")))
    print("| land_kl | alpha | KL on training prompts (at alpha = 1, expected) | gold | KL | KL (k1) | RM score "
          "| gold win rate | best-of-n gold at its KL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for target in targets:
        cfg.ppo.land_kl = target
        with tempfile.TemporaryDirectory(dir=run, prefix=".land.") as tmp:
            ppo_dir = Path(tmp) / "ppo"
            shutil.copytree(run / "ppo" / "policy", ppo_dir / "policy")
            landing = land_policy(cfg, ppo_dir / "policy", prompt_ids, tokenizer, device, dtype, ppo_seed(cfg))
            results, _ = evaluate_policies(cfg, {"landed": lambda dtype: final_policy(cfg, ppo_dir, dtype)},
                                           run / "reward" / "model", eval_prompts(cfg), device)
        m = results["landed"][0]
        bon_gold, beyond = bon_gold_at_kl(points, m["kl"])
        print(f"| {target:g} | {landing['alpha']:.3f} | {landing['steps'][0]['kl']:.2f}, {landing['kl_expected']:.2f} "
              f"| {m['policy_gold']:.3f} | {m['kl']:.2f} | {m['kl_sampled']:.2f} | {m['policy_score']:.2f} "
              f"| {m['win_rate_gold']:.2f} | {bon_gold:.3f}{' (beyond)' if beyond else ''} |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("base", type=Path, help="a finished run directory (all four stages done)")
    p.add_argument("name", nargs="?", help="trial name: <base>-study/<name>")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--table", action="store_true", help="print the results so far and exit")
    p.add_argument("--kl-breakdown", action="store_true", help="where the base run's KL goes, and exit")
    p.add_argument("--interpolate", type=float, nargs="+", metavar="A",
                   help="evaluate the run's final policy at W_ref + A (W_policy - W_ref), and exit")
    p.add_argument("--land", type=float, nargs="+", metavar="KL",
                   help="land the run's final policy at each KL as ppo.land_kl does, evaluate it, and exit")
    args = p.parse_args()
    base = args.base.resolve()
    study = base.with_name(base.name + "-study")
    results = study / "results.jsonl"
    if args.kl_breakdown:
        kl_breakdown(base)
        return
    if args.interpolate:
        interpolate(base, args.interpolate)
        return
    if args.land:
        land(base, args.land)
        return
    if args.table:
        rows = [json.loads(line) for line in results.read_text().splitlines()]
        if (base / "eval" / "metrics.json").exists():
            rows = [trial_row(base, "base", [])] + rows
        print(table(base, rows))
        return
    if not args.name:
        p.error("a trial needs a name")
    if not (base / "reward" / "_done.json").exists():
        sys.exit(f"{base} has no finished reward stage: run `rlhf run` on its config first")
    trial = study / args.name
    trial.mkdir(parents=True, exist_ok=True)
    for stage in ("prefs", "reward"):
        if not (trial / stage).exists():
            shutil.copytree(base / stage, trial / stage)
    overrides = list(args.overrides)
    if not any(o.startswith("eval.best_of_n=") for o in overrides):
        overrides.append("eval.best_of_n=[]")
    command = [sys.executable, "-m", "rlhf.cli", "run", str(base / "config.yaml"), f"run.output_dir={trial}",
               "tracking.wandb=off", *overrides]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    row = trial_row(trial, args.name, args.overrides)
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    if (base / "eval" / "frontier.jsonl").exists():
        print(table(base, [row]))


if __name__ == "__main__":
    main()
