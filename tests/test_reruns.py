"""Reruns on real tiny runs: `--force` recomputes, killed work resumes or is left aside, logs belong to one
execution, and a killed run of a changed config leaves the finished run intact (through the real CLI)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf import checkpoints
from rlhf.config import load_config
from rlhf.pipeline import PARTIAL, run_pipeline
from rlhf.stages import STAGES, is_done, read_marker
from rlhf.utils import read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"
SMALL = ["tracking.wandb=off", "run.device=cpu", "prefs.num_prompts=64", "reward.epochs=1",
         "reward.normalize_samples=16", "ppo.num_updates=6", "ppo.save_every=3", "eval.num_prompts=16"]


def cfg_for(run_dir, *overrides):
    return load_config(TINY, [f"run.output_dir={run_dir}", *SMALL, *overrides])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run_pipeline(cfg_for(run_dir))
    return run_dir


def copy_of(finished: Path, dest: Path) -> Path:
    shutil.copytree(finished, dest)
    return dest


def tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_force_recomputes_every_stage_and_replaces_its_logs(finished, tmp_path, monkeypatch):
    """`rlhf run --force` on a finished run: PPO does every update again instead of resuming its final
    checkpoint, each stage's logs hold this execution's rows only, and the results are the same."""
    run_dir = copy_of(finished, tmp_path / "run")
    logs = ("prefs/metrics.jsonl", "reward/metrics.jsonl", "ppo/metrics.jsonl", "ppo/samples.jsonl",
            "eval/metrics.jsonl", "eval/samples.jsonl")
    before = {name: read_jsonl(run_dir / name) for name in logs}
    loaded = []
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path, *a: loaded.append(path))
    run_pipeline(cfg_for(run_dir), force=True)
    after = {name: read_jsonl(run_dir / name) for name in logs}
    assert loaded == []
    assert {k: len(v) for k, v in after.items()} == {k: len(v) for k, v in before.items()}
    ppo_before, ppo_after = before["ppo/metrics.jsonl"], after["ppo/metrics.jsonl"]
    assert [r["step"] for r in ppo_after] == [1, 2, 3, 4, 5, 6]
    assert [r["time"] for r in ppo_after] != [r["time"] for r in ppo_before]  # really done again
    assert [r["objective/kl"] for r in ppo_after] == [r["objective/kl"] for r in ppo_before]


def test_forcing_ppo_alone_makes_eval_stale(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    cfg = cfg_for(run_dir, "ppo.num_updates=2")
    run_pipeline(cfg, only="ppo")  # changed: PPO reruns, eval now reads other PPO outputs
    run_pipeline(cfg, only="ppo", force=True)
    assert is_done(cfg, run_dir, "ppo") and not is_done(cfg, run_dir, "eval")


def test_a_setting_of_no_effect_does_not_stop_a_killed_ppo_run_from_resuming(finished, tmp_path, monkeypatch,
                                                                              killed_at_update):
    run_dir = copy_of(finished, tmp_path / "run")
    cfg = cfg_for(run_dir, "ppo.kl_coef=0.1")  # a new PPO run, killed after its step-3 checkpoint
    with killed_at_update(5):
        run_pipeline(cfg)
    loaded = []
    real_load = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path, *a: loaded.append(Path(path).name) or real_load(path, *a))
    run_pipeline(cfg_for(run_dir, "ppo.kl_coef=0.1", "ppo.sample_every=1", "ppo.keep_checkpoints=3"))
    assert loaded == ["step_00003"]
    assert [r["step"] for r in read_jsonl(run_dir / "ppo" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert not (run_dir / PARTIAL).exists() or not list((run_dir / PARTIAL).iterdir())


def test_reward_training_leaves_no_temporary_folder(finished, tmp_path):
    run_dir = copy_of(finished, tmp_path / "run")
    assert not list((run_dir / "reward").glob("tmp*"))
    # what a kill -9 during training leaves: the trainer's temporary folder in the stage's work folder
    stale = run_dir / PARTIAL / "reward" / "tmpabc"
    stale.mkdir(parents=True)
    run_pipeline(cfg_for(run_dir, "reward.learning_rate=1.0e-3"), only="reward")
    assert not stale.exists() and not (run_dir / PARTIAL / "reward").exists()
    assert not list((run_dir / "reward").glob("tmp*"))


def cli(*args, **kwargs) -> list[str]:
    return [sys.executable, "-m", "rlhf.cli", *args]


def test_sigkill_of_a_changed_config_leaves_the_finished_run_intact(finished, tmp_path):
    """`kill -9` of a PPO run with another kl_coef, then the old command: every stage is skipped, and the
    finished run's metrics, policy and checkpoints are as they were."""
    run_dir = copy_of(finished, tmp_path / "run")
    old_args = ["run", str(TINY), f"run.output_dir={run_dir}", *SMALL]
    protected = {"eval/metrics.json": (run_dir / "eval" / "metrics.json").read_bytes(),
                 "ppo/policy": tree_digest(run_dir / "ppo" / "policy"),
                 "ppo/checkpoints": tree_digest(run_dir / "ppo" / "checkpoints"),
                 "config.yaml": (run_dir / "config.yaml").read_bytes()}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cli(*old_args, "ppo.kl_coef=0.3", "ppo.num_updates=200"), cwd=PROJECT_ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while not list((run_dir / PARTIAL).glob("ppo-*/checkpoints/step_00003")):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline, "the changed PPO run wrote no checkpoint in time"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    rerun = subprocess.run(cli(*old_args), cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stderr.count("done with this config, skipped") == len(STAGES), rerun.stderr[-2000:]
    assert (run_dir / "eval" / "metrics.json").read_bytes() == protected["eval/metrics.json"]
    assert tree_digest(run_dir / "ppo" / "policy") == protected["ppo/policy"]
    assert tree_digest(run_dir / "ppo" / "checkpoints") == protected["ppo/checkpoints"]
    assert (run_dir / "config.yaml").read_bytes() == protected["config.yaml"]
    assert read_marker(run_dir, "ppo")["inputs"]["ppo.kl_coef"] == cfg_for(run_dir).ppo.kl_coef


def test_ppo_seed_reruns_ppo_alone_on_the_same_pairs_reward_model_and_eval_samples(finished, tmp_path):
    """`ppo.seed` varies PPO's random stream alone: the pairs and the reward model are not redone, the
    reference's eval answers stay the same, the policy's change; `ppo.seed` equal to `run.seed` is the run
    without it, to the last digit."""
    run_dir = copy_of(finished, tmp_path / "run")
    ids = {stage: read_marker(run_dir, stage)["id"] for stage in ("prefs", "reward")}
    kl = [r["objective/kl"] for r in read_jsonl(finished / "ppo" / "metrics.jsonl")]
    gens = read_jsonl(finished / "eval" / "generations.jsonl")

    run_pipeline(cfg_for(run_dir, "ppo.seed=1"))
    assert {stage: read_marker(run_dir, stage)["id"] for stage in ids} == ids
    seeded = read_jsonl(run_dir / "eval" / "generations.jsonl")
    assert [r["objective/kl"] for r in read_jsonl(run_dir / "ppo" / "metrics.jsonl")] != kl
    assert [r["ref_response"] for r in seeded] == [r["ref_response"] for r in gens]
    assert [r["policy_response"] for r in seeded] != [r["policy_response"] for r in gens]

    run_pipeline(cfg_for(run_dir, "ppo.seed=0"))
    assert [r["objective/kl"] for r in read_jsonl(run_dir / "ppo" / "metrics.jsonl")] == kl
    assert read_jsonl(run_dir / "eval" / "generations.jsonl") == gens
