"""End to end: `rlhf run configs/tiny.yaml` through the real console script (the session fixture
`tiny_run` in conftest.py, about a minute on CPU), then every artifact of the run directory checked
as a user would load it, a rerun that skips all stages, and proof that PPO learned something."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time

import pytest
import yaml

from rlhf.evaluate import METRICS
from rlhf.stages import STAGES
from rlhf.utils import read_jsonl

GENERATION_KEYS = {"prompt", "ref_response", "policy_response", "ref_score", "policy_score", "ref_gold",
                   "policy_gold", "kl", "kl_sampled", "ref_length", "policy_length"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.fixture(scope="module")
def tiny_cfg(tiny_run_dir):
    return yaml.safe_load((tiny_run_dir / "config.yaml").read_text())


def test_run_printed_every_stage(tiny_run):
    for stage in STAGES:
        assert f"{stage}: finished" in tiny_run.proc.stderr
        assert (tiny_run.run_dir / stage / "_done.json").is_file()
    assert str(tiny_run.run_dir / "eval" / "report.html") in " ".join(tiny_run.proc.stderr.split())


def test_config_yaml(tiny_run_dir, tiny_cfg):
    assert tiny_cfg["run"]["output_dir"] == str(tiny_run_dir)
    assert tiny_cfg["model"]["policy"] == "tiny-llama"
    assert tiny_cfg["ppo"]["num_updates"] >= 1


def test_prefs(tiny_run_dir):
    prefs = tiny_run_dir / "prefs"
    train, test = read_jsonl(prefs / "train.jsonl"), read_jsonl(prefs / "test.jsonl")
    assert train and test
    for row in train[:20] + test[:20]:
        assert row["chosen"] != row["rejected"], row
        assert row.get("prompt")
    stats = json.loads((prefs / "stats.json").read_text())
    assert isinstance(stats, dict) and stats


def test_reward_model_loads_alone(tiny_run_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tiny_run_dir / "reward" / "model"
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.num_labels == 1
    batch = tok(["Tell me about a good day. good good"], return_tensors="pt")
    with torch.no_grad():
        assert model(**batch).logits.shape == (1, 1)
    metrics = json.loads((tiny_run_dir / "reward" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["test_accuracy"] > 0.6  # the keyword task is easy


def test_policy_loads_and_generates(tiny_run_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    path = tiny_run_dir / "ppo" / "policy"
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    generate = pipeline("text-generation", model=model, tokenizer=tok, device="cpu")
    out = generate("Write about a day at the park.", max_new_tokens=8, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and len(text) > len("Write about a day at the park.")


def test_ppo_changed_the_weights(tiny_run_dir):
    from safetensors.torch import load_file

    from rlhf.models import resolve_model

    base = load_file(os.path.join(resolve_model("tiny-llama"), "model.safetensors"))
    trained = load_file(str(tiny_run_dir / "ppo" / "policy" / "model.safetensors"))
    shared = sorted(set(base) & set(trained))
    assert shared, (list(base)[:5], list(trained)[:5])
    changed = [k for k in shared if base[k].shape == trained[k].shape and not base[k].float().equal(trained[k].float())]
    assert any("layers" in k for k in changed), "no transformer-layer weight changed during PPO"


def test_ppo_metrics_and_samples(tiny_run_dir, tiny_cfg):
    rows = read_jsonl(tiny_run_dir / "ppo" / "metrics.jsonl")
    updates = tiny_cfg["ppo"]["num_updates"]
    assert [r["step"] for r in rows] == list(range(1, updates + 1))
    for key in ("objective/kl", "objective/scores", "objective/gold", "val/response_length"):
        assert all(_finite(r.get(key)) for r in rows), key
    samples = read_jsonl(tiny_run_dir / "ppo" / "samples.jsonl")
    assert samples
    assert {"step", "query", "response", "score", "kl", "gold", "reward"} <= set(samples[0])
    assert {r["step"] for r in samples} <= set(range(1, updates + 1))


def test_eval_outputs(tiny_run_dir, tiny_cfg):
    rows = read_jsonl(tiny_run_dir / "eval" / "generations.jsonl")
    assert len(rows) == tiny_cfg["eval"]["num_prompts"]  # one row per prompt, no duplicates
    for r in rows:
        assert GENERATION_KEYS <= set(r), GENERATION_KEYS - set(r)
        assert isinstance(r["prompt"], str) and r["prompt"]
        assert all(_finite(r[k]) for k in GENERATION_KEYS - {"prompt", "ref_response", "policy_response"})
    metrics = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    assert set(metrics) == set(METRICS)  # the tiny config has a gold judge: every documented metric
    assert metrics["num_prompts"] == len(rows)
    assert all(r["kl"] >= 0 for r in rows)  # exact per position: never negative, unlike the sampled estimate
    for key in ("kl", "kl_sampled"):
        assert metrics[key] == pytest.approx(sum(r[key] for r in rows) / len(rows), rel=1e-9)
    assert 0 < metrics["kl_se"] < metrics["kl"]
    for key in ("win_rate_gold_ci", "win_rate_rm_ci"):
        lo, hi = metrics[key]
        assert 0 <= lo <= metrics[key[:-3]] <= hi <= 1
    assert (tiny_run_dir / "eval" / "report.html").stat().st_size > 10_000
    assert (tiny_run_dir / "eval" / "curves.png").is_file()


def test_policy_beats_reference(tiny_run_dir):
    m = json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    assert m["policy_score"] > m["ref_score"]
    assert m["policy_gold"] > m["ref_gold"]
    assert m["win_rate_gold"] > 0.5


def test_rerun_skips_every_stage(tiny_run):
    t0 = time.time()
    proc = subprocess.run(tiny_run.command, capture_output=True, text=True, env=os.environ.copy(), timeout=300)
    seconds = time.time() - t0
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("skipped") == len(STAGES), proc.stderr
    for stage in STAGES:
        assert f"{stage}: done with this config, skipped" in proc.stderr
    assert seconds < max(30.0, tiny_run.seconds / 3), f"rerun took {seconds:.0f}s (first run {tiny_run.seconds:.0f}s)"


def test_eval_checkpoints_gives_a_curve(tiny_run_dir, tiny_cfg, tmp_path):
    """eval.checkpoints=true evaluates every kept checkpoint before the final policy (a curve, and PPO's
    path in the frontier), and leaves the final policy's results as they were (same seed, same answers)."""
    import shutil

    from rlhf.config import load_config
    from rlhf.pipeline import run_pipeline
    from rlhf.utils import read_jsonl

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={run_dir}", "run.device=cpu",
                                            "eval.checkpoints=true"])
    run_pipeline(cfg, only="eval")
    curve = read_jsonl(run_dir / "eval" / "checkpoints.jsonl")
    # keep_checkpoints=2 leaves step_00020 and step_00030; the latter is the final policy itself
    assert [r["checkpoint"] for r in curve] == ["step_00020", "final"]
    assert [r["step"] for r in curve] == [20, 30]
    assert all(r["num_prompts"] == tiny_cfg["eval"]["num_prompts"] and r["kl"] == r["kl"] for r in curve)
    final = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert final == json.loads((tiny_run_dir / "eval" / "metrics.json").read_text())
    assert curve[-1]["policy_gold"] == final["policy_gold"]
    assert all("bon_gold_at_policy_kl" in r for r in curve)
    # the frontier: the same best-of-n rows, then PPO's path over the checkpoints
    frontier = read_jsonl(run_dir / "eval" / "frontier.jsonl")
    before = read_jsonl(tiny_run_dir / "eval" / "frontier.jsonl")
    assert [r for r in frontier if r["method"] == "best_of_n"] == [r for r in before if r["method"] == "best_of_n"]
    assert [r for r in frontier if r["method"] == "ppo"] == [
        {"method": "ppo", "step": r["step"], "kl": r["kl"], "score": r["policy_score"], "gold": r["policy_gold"]}
        for r in curve]


def test_eval_of_a_run_stopped_by_stop_kl(tiny_run_dir, tmp_path):
    """A PPO stage ended early by `ppo.stop_kl`: eval reads the updates that trained the final policy, not
    `ppo.num_updates`, in the curve and in PPO's rows of the frontier."""
    import shutil

    from rlhf.checkpoints import trained_updates
    from rlhf.config import load_config
    from rlhf.pipeline import run_pipeline
    from rlhf.utils import read_jsonl

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run_dir, run_dir)
    kl = [r["objective/kl"] for r in read_jsonl(run_dir / "ppo" / "metrics.jsonl")]
    stop_kl = max(kl[1:4]) + 1e-3  # above the first trained policies' KL, and reached later by the run's pace
    assert max(kl[4:-1]) > stop_kl
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={run_dir}", "run.device=cpu", f"ppo.stop_kl={stop_kl}",
                                            "ppo.save_every=1", "eval.checkpoints=true"])
    run_pipeline(cfg, start="ppo")
    rows = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    updates = trained_updates(run_dir / "ppo", cfg.ppo.num_updates)
    assert rows[-1]["stopped"] == 1 and rows[-1]["step"] == updates + 1 < cfg.ppo.num_updates
    curve = read_jsonl(run_dir / "eval" / "checkpoints.jsonl")
    assert curve[-1]["checkpoint"] == "final" and curve[-1]["step"] == updates
    assert [r["step"] for r in curve] == [updates - 1, updates]  # the final policy's checkpoint is not evaluated twice
    ppo_rows = [r for r in read_jsonl(run_dir / "eval" / "frontier.jsonl") if r["method"] == "ppo"]
    assert [r["step"] for r in ppo_rows] == [r["step"] for r in curve]

