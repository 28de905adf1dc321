"""benchmarks/ppo_study.py: PPO and eval rerun on a finished run's preference data and reward model."""

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.eval_math import bon_gold_at_kl

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "benchmarks" / "ppo_study.py"
spec = importlib.util.spec_from_file_location("ppo_study", SCRIPT)
ppo_study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ppo_study)


def study(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=PROJECT_ROOT,
                          timeout=900)


def test_a_trial_reuses_prefs_and_reward_and_is_read_against_the_base_frontier(tiny_run_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_run_dir, base)
    proc = study(str(base), "kl0.3", "ppo.kl_coef=0.3", "ppo.num_updates=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = tmp_path / "base-study" / "kl0.3"
    for stage in ("prefs", "reward"):  # copied and found done: the same executions, not recomputed
        assert json.loads((trial / stage / "_done.json").read_text())["id"] == \
            json.loads((base / stage / "_done.json").read_text())["id"]
    config = (trial / "config.yaml").read_text()
    assert "kl_coef: 0.3" in config and "num_updates: 2" in config
    assert not (trial / "eval" / "frontier.jsonl").exists() or all(
        json.loads(line)["method"] == "ppo" for line in (trial / "eval" / "frontier.jsonl").read_text().splitlines())

    row = json.loads((tmp_path / "base-study" / "results.jsonl").read_text())
    metrics = json.loads((trial / "eval" / "metrics.json").read_text())
    assert row["name"] == "kl0.3" and row["overrides"] == ["ppo.kl_coef=0.3", "ppo.num_updates=2"]
    assert (row["gold"], row["kl"], row["win_rate_gold"]) == \
        (metrics["policy_gold"], metrics["kl"], metrics["win_rate_gold"])
    assert len((trial / "ppo" / "metrics.jsonl").read_text().splitlines()) == 2 and row["updates"] == 2

    table = study(str(base), "--table")
    assert table.returncode == 0, table.stderr[-3000:]
    lines = table.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[2].startswith("| base |") and lines[3].startswith("| kl0.3 |")
    frontier = [json.loads(line) for line in (base / "eval" / "frontier.jsonl").read_text().splitlines()]
    bon_gold, _ = bon_gold_at_kl([p for p in frontier if p["method"] == "best_of_n"], row["kl"])
    assert f"| {bon_gold:.3f}" in lines[3]


def test_a_base_without_a_reward_model_is_one_line(tmp_path):
    proc = study(str(tmp_path), "trial", "ppo.kl_coef=0.3")
    assert proc.returncode != 0 and "no finished reward stage" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_kl_breakdown_resamples_the_eval_answers_and_splits_their_kl(tiny_run_dir):
    proc = study(str(tiny_run_dir), "--kl-breakdown")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    lines = proc.stdout.splitlines()
    # the same answers as the eval's: their sampled KL, and the exact KL that eval reports as `kl`
    assert f"sequence KL {metrics['kl_sampled']:.2f} nats over {metrics['num_prompts']} answers, " \
           f"{metrics['policy_length']:.1f} tokens each" in lines[0]
    exact = next(line for line in lines if line.startswith("Exact KL over the vocabulary"))
    nats, share = float(exact.split(": ")[1].split(" nats")[0]), float(exact.split("sharpening ")[1].split("%")[0])
    assert nats == pytest.approx(metrics["kl"], abs=0.011), exact
    assert 0 <= share <= 100, exact  # sharpening: at most the KL it is part of
    first = lines.index("| response tokens | share of the KL | KL per token |")
    by_position = lines[first + 2:lines.index("", first)]
    assert by_position[0].startswith("| 1-1 |")
    assert abs(sum(float(line.split("|")[2]) for line in by_position) - 1) < 0.01  # shares of one total


def test_sharpening_is_all_of_a_tempered_reference_and_none_of_a_permuted_one():
    g = torch.Generator().manual_seed(0)
    ref = torch.log_softmax(2 * torch.randn(5, 11, generator=g, dtype=torch.float64), -1)
    # the policy is the reference at temperature 0.6: a pure sharpening, every nat of its KL
    tempered = torch.log_softmax(ref / 0.6, -1)
    exact, sharpening, entropy, ref_entropy = ppo_study.sharpening_split(tempered, ref)
    assert (exact > 0).all() and (entropy < ref_entropy).all()
    torch.testing.assert_close(sharpening, exact, rtol=1e-6, atol=1e-9)
    # the same probabilities on other tokens: the same entropy, a large KL, no sharpening
    permuted = ref[:, torch.randperm(11, generator=g)]
    exact, sharpening, entropy, ref_entropy = ppo_study.sharpening_split(permuted, ref)
    torch.testing.assert_close(entropy, ref_entropy)
    assert (exact > 0.1).all() and (sharpening.abs() < 1e-6).all(), (exact, sharpening)


def test_without_a_base_eval_the_table_reads_the_first_trial_that_sampled_best_of_n(tmp_path):
    base = tmp_path / "base"
    (base / "reward").mkdir(parents=True)
    frontier = [{"method": "best_of_n", "n": n, "kl": kl, "score": 0.0, "gold": gold}
                for n, kl, gold in [(1, 0.0, 0.3), (4, 0.64, 0.6), (16, 1.84, 0.8)]]
    rows = []
    for name, kl, sampled in [("plain", 1.0, False), ("with-bon", 3.0, True)]:
        trial = tmp_path / "base-study" / name
        (trial / "eval").mkdir(parents=True)
        if sampled:
            lines = frontier + [{"method": "ppo", "step": 20, "kl": kl, "score": 1.0, "gold": 0.7}]
            (trial / "eval" / "frontier.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        rows.append({"name": name, "overrides": [], "gold": 0.7, "ref_gold": 0.3, "kl": kl, "score": 1.0,
                     "win_rate_gold": 0.8, "policy_length": 32.0, "distinct_2": 0.9,
                     "seconds": {"reward": 1.0, "ppo": 2.0, "eval": 3.0}})
    (tmp_path / "base-study" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = study(str(base), "--table")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| plain", "| with-bon"]  # no base row: no base eval
    bon_at_1, _ = bon_gold_at_kl(frontier, 1.0)
    assert f"| {bon_at_1:.3f} | 0.800 |" in lines[2] and "| 0.800 (beyond) | 0.800 |" in lines[3]

    (tmp_path / "base-study" / "with-bon" / "eval" / "frontier.jsonl").unlink()
    proc = study(str(base), "--table")
    assert proc.returncode != 0 and "frontier.jsonl is missing" in proc.stderr


def test_interpolate_goes_from_the_reference_to_the_evaluated_policy(tiny_run_dir):
    """alpha = 0 is the reference (KL 0, its own gold); alpha = 1 is the final policy the eval measured."""
    proc = study(str(tiny_run_dir), "--interpolate", "0", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in proc.stdout.splitlines() if line.startswith("| 0 ") or line.startswith("| 1 ")}
    assert rows["0"][:2] == [f"{metrics['ref_gold']:.3f}", "0.00"]
    assert rows["1"][:5] == [f"{metrics['policy_gold']:.3f}", f"{metrics['kl']:.2f}", f"{metrics['kl_sampled']:.2f}",
                             f"{metrics['policy_score']:.2f}", f"{metrics['win_rate_gold']:.2f}"]


def test_land_lands_a_copy_of_the_final_policy_and_leaves_the_run_as_it_was(tiny_run_dir):
    policy = tiny_run_dir / "ppo" / "policy" / "model.safetensors"
    before = policy.read_bytes()
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    target = round(metrics["kl"] / 2, 2)
    proc = study(str(tiny_run_dir), "--land", str(target))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith(f"| {target:g} |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert 0 < float(cells[1]) < 1 and cells[2].endswith(f", {target:.2f}")  # alpha; expected KL on training prompts
    assert float(cells[4]) == pytest.approx(target, rel=0.25)  # held out: other prompts, other answers
    assert policy.read_bytes() == before and not list(tiny_run_dir.glob(".land.*"))
