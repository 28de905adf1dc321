"""Numerical faults and damaged state: each gives its documented outcome, and a sane run then works in the
same run directory.

- a non-finite or exploding loss, gradient or weight (a learning rate of 1e30), a judge or reward function
  that returns NaN, a reward model that cannot be normalised: a TrainingFault (exit 3 at the CLI) naming
  the update or step, the quantity and a likely cause; nothing is saved from it;
- a damaged newest checkpoint is skipped for the one before it; a torn last line of a log is dropped;
- atomic writes reach the disk (fsync) before they are renamed into place.

prefs + reward run once on the tiny config (`upstream`); each test works on a copy of that run directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reward_models.train
from rlhf import checkpoints
from rlhf.config import load_config
from rlhf.pipeline import run_pipeline, work_dir
from rlhf.stages import MARKER, is_done
from rlhf.utils import TrainingFault, UserError, atomic_dir, atomic_write_text, check_weights, read_jsonl

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"
BASE = ["tracking.wandb=off", "prefs.num_prompts=48", "reward.epochs=1"]
JUDGE = "ppo.reward=keyword:good"
SANE_PPO = [JUDGE, "ppo.num_updates=2", "ppo.save_every=1"]


def tiny_cfg(run_dir, *overrides):
    return load_config(TINY, [f"run.output_dir={run_dir}", *BASE, *overrides])


@pytest.fixture(scope="module")
def upstream(finished_reward_stage):
    return finished_reward_stage(*BASE)


@pytest.fixture
def copy(upstream, tmp_path):
    return Path(shutil.copytree(upstream, tmp_path / "run"))


@pytest.fixture
def fault_judges(tmp_path, monkeypatch):
    """An importable module of judges that return NaN (always, or for responses with "good")."""
    folder = tmp_path / "judges"
    folder.mkdir()
    (folder / "rlhf_fault_judges.py").write_text(
        "def nan(text):\n    return float('nan')\n\n"
        "def nan_when_good(text):\n    return float('nan') if 'good' in text.split() else 0.0\n")
    monkeypatch.syspath_prepend(str(folder))
    return "rlhf_fault_judges"


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_ppo_saved_nothing(run_dir: Path) -> None:
    out = run_dir / "ppo"
    assert not (out / MARKER).exists() and not (out / "policy").exists()
    assert not list(out.glob("checkpoints/step_*"))
    assert not list(run_dir.glob(".partial/ppo-*/checkpoints/step_*"))  # nor in the unfinished work


def sane_ppo_works(run_dir: Path) -> None:
    cfg = tiny_cfg(run_dir, *SANE_PPO)
    run_pipeline(cfg, only="ppo")
    assert is_done(cfg, run_dir, "ppo")
    weights = load_file(str(run_dir / "ppo" / "policy" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# ---------------------------------------------------------------------------------------------
# PPO


def test_learning_rate_1e30_for_one_step_is_caught_before_anything_is_saved(copy):
    # one optimiser step: no loss is computed after it, only the weights show the divergence (they are
    # ~1e30, still finite in fp32); this used to finish with exit 0 and save them
    cfg = tiny_cfg(copy, JUDGE, "ppo.learning_rate=1e30", "ppo.num_updates=1", "ppo.ppo_epochs=1",
                   "ppo.mini_batch_size=32")
    with pytest.raises(TrainingFault, match=r"^ppo update 1: weights exploded \(largest \|w\| = [\d.]+e\+30 > 10000\): "
                                            r"ppo.learning_rate=1e\+30 too high\?$"):
        run_pipeline(cfg, only="ppo")
    assert_ppo_saved_nothing(copy)
    sane_ppo_works(copy)


def test_learning_rate_1e30_makes_the_next_loss_non_finite(copy):
    cfg = tiny_cfg(copy, JUDGE, "ppo.learning_rate=1e30", "ppo.num_updates=3", "ppo.save_every=1")
    # the second optimiser step sees the first one's ~1e30 weights
    with pytest.raises(TrainingFault, match=r"^ppo update 1: (loss|gradient norm) is (nan|inf).* at PPO epoch 1, "
                                            r"mini-batch 2: ppo.learning_rate=1e\+30 too high\?$"):
        run_pipeline(cfg, only="ppo")
    assert_ppo_saved_nothing(copy)


def test_reward_function_returning_nan_stops_ppo(copy, fault_judges):
    # NaN only for the responses that say "good": a NaN reward for some rows of a batch is enough
    cfg = tiny_cfg(copy, f"ppo.reward={fault_judges}:nan_when_good", "ppo.num_updates=2")
    with pytest.raises(TrainingFault, match=rf"^ppo update \d: judge '{fault_judges}:nan_when_good' returned nan "
                                            r"for \d+ of 32 responses"):
        run_pipeline(cfg, only="ppo")
    assert_ppo_saved_nothing(copy)
    sane_ppo_works(copy)


def test_check_weights():
    check_weights([torch.ones(3), torch.full((2,), -9e3)], "here", "hint")
    with pytest.raises(TrainingFault, match="^here: weights are nan \\(not finite\\): hint$"):
        check_weights([torch.ones(3), torch.tensor([1.0, float("nan")])], "here", "hint")
    with pytest.raises(TrainingFault, match="^here: weights are inf"):
        check_weights([torch.tensor([-float("inf")])], "here", "hint")
    with pytest.raises(TrainingFault, match="exploded .*2e\\+04"):
        check_weights([torch.tensor([2e4])], "here", "hint")
    check_weights([torch.empty(0)], "here", "hint")  # sharded-away parameters hold nothing


# ---------------------------------------------------------------------------------------------
# prefs and reward


def test_nan_judge_stops_prefs_before_pairs_are_written(tmp_path, fault_judges):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(run_dir, f"prefs.judge={fault_judges}:nan_when_good", "prefs.num_prompts=16")
    with pytest.raises(TrainingFault, match=rf"^prefs: judge '{fault_judges}:nan_when_good' returned nan for \d+ of "
                                            r"64 responses"):
        run_pipeline(cfg, only="prefs")
    assert not (run_dir / "prefs" / "train.jsonl").exists() and not (run_dir / "prefs" / MARKER).exists()
    sane = tiny_cfg(run_dir, "prefs.num_prompts=16")
    run_pipeline(sane, only="prefs")
    assert is_done(sane, run_dir, "prefs")


def test_reward_learning_rate_1e30_saves_no_reward_model(copy):
    before = digest(copy / "reward")
    cfg = tiny_cfg(copy, "reward.learning_rate=1e30")
    # the second step's loss, or (a run of one step) the weights after training
    with pytest.raises(TrainingFault, match=r"^reward: (loss is (nan|inf) at step \d+|after training: weights "
                                            r"(exploded|are (nan|inf)).*): reward.learning_rate=1e\+30 too high\?$"):
        run_pipeline(cfg, only="reward")
    after = digest(copy / "reward")
    outputs = [k for k in before if k.startswith("model/") or k == "metrics.json"]
    assert len(outputs) > 3 and {k: after.get(k) for k in outputs} == {k: before[k] for k in outputs}


def test_reward_model_that_cannot_be_normalised(copy, monkeypatch):
    real = reward_models.train.score_texts

    def nan_scores(*args, **kwargs):
        return real(*args, **kwargs) * float("nan")

    monkeypatch.setattr(reward_models.train, "score_texts", nan_scores)
    before = digest(copy / "reward" / "model")
    with pytest.raises(TrainingFault, match=r"^reward: the reward model's scores on \d+ reference responses are not "
                                            r"finite .* cannot be normalised"):
        run_pipeline(tiny_cfg(copy, "reward.epochs=0.5"), only="reward")
    assert digest(copy / "reward" / "model") == before
    monkeypatch.setattr(reward_models.train, "score_texts", real)
    cfg = tiny_cfg(copy, "reward.epochs=0.5")
    run_pipeline(cfg, only="reward")  # a later sane run in the same run directory
    assert is_done(cfg, copy, "reward")


# ---------------------------------------------------------------------------------------------
# damaged state


def test_resume_skips_a_damaged_checkpoint_and_a_torn_log_line(upstream, tmp_path, monkeypatch, capsys,
                                                                 killed_at_update):
    overrides = [JUDGE, "ppo.num_updates=3", "ppo.save_every=1", "ppo.sample_every=1", "ppo.batch_size=16",
                 "ppo.mini_batch_size=8"]
    dir_a = Path(shutil.copytree(upstream, tmp_path / "a"))
    run_pipeline(tiny_cfg(dir_a, *overrides), only="ppo")

    dir_b = Path(shutil.copytree(upstream, tmp_path / "b"))
    cfg = tiny_cfg(dir_b, *overrides)
    with killed_at_update(3):
        run_pipeline(cfg, only="ppo")
    work = work_dir(cfg, dir_b, "ppo")  # the killed run's work folder, which the same command resumes
    ckpts = work / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00001", "step_00002"]
    weights = ckpts / "step_00002" / "trainable.safetensors"  # the newest checkpoint, cut in half
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with open(work / "metrics.jsonl", "a") as f:  # a log line cut short
        f.write('{"step": 3, "objective/kl": 0.0')
    capsys.readouterr()

    loaded = []
    real_load = checkpoints.load_checkpoint
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda path, *a: loaded.append(Path(path).name) or real_load(path, *a))
    run_pipeline(cfg, only="ppo")
    err = capsys.readouterr().err
    assert loaded == ["step_00001"]
    assert "step_00002 is damaged" in err and "metrics.jsonl: dropped its last line 3" in err
    assert is_done(cfg, dir_b, "ppo")
    assert [r["step"] for r in read_jsonl(dir_b / "ppo" / "metrics.jsonl")] == [1, 2, 3]
    final_a = load_file(str(dir_a / "ppo" / "policy" / "model.safetensors"))
    final_b = load_file(str(dir_b / "ppo" / "policy" / "model.safetensors"))
    for k in final_a:  # the same result as the run that was never interrupted
        torch.testing.assert_close(final_b[k], final_a[k], atol=1e-6, rtol=0)


def test_read_jsonl_drops_a_torn_last_line_only(tmp_path, capsys):
    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}\n{"step": 3, "text": "caf\xc3')  # cut inside a UTF-8 character
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert "dropped its last line 4" in capsys.readouterr().err
    path.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(UserError, match=r"log.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"step": 1}\n{"step": 2}\n')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}] and capsys.readouterr().err == ""


@pytest.fixture
def io_events(monkeypatch):
    """Record fsyncs (by path) and renames in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced files")
def test_atomic_dir_fsyncs_its_files_before_the_rename_and_the_folder_after(tmp_path, io_events):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as tmp:
        (tmp / "weights.bin").write_bytes(b"w" * 100)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "state.json").write_text("{}")
    names = [(kind, Path(p).name) for kind, p in io_events]
    rename = names.index(("replace", "ckpt"))
    synced_before = {n for kind, n in names[:rename] if kind == "fsync"}
    assert {"weights.bin", "state.json", "sub"} <= synced_before
    assert ("fsync", tmp_path.name) in names[rename:]  # the parent folder, after the rename
    assert (final / "sub" / "state.json").read_text() == "{}"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fsynced files")
def test_atomic_write_text_fsyncs_the_file_and_then_its_folder(tmp_path, io_events):
    atomic_write_text(tmp_path / "a.json", "{}")
    kinds = [kind for kind, _ in io_events]
    assert kinds == ["fsync", "replace", "fsync"]
    assert Path(io_events[2][1]) == tmp_path
