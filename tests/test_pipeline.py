"""rlhf/pipeline.py: fingerprints decide which stages run, skip or rerun, with fake stage functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlhf.pipeline as pipeline
from rlhf.config import load_config
from rlhf.pipeline import MARKER, STAGES, is_done, run_pipeline, stage_fingerprints
from rlhf.utils import UserError, atomic_dir


class FakeStages:
    """Stage functions that record their calls and write `<run_dir>/<stage>/out.txt`."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail: set[str] = set()

    def __call__(self, stage: str):
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}")

        def fn(cfg, run_dir):
            self.calls.append(stage)
            out = Path(run_dir) / stage
            out.mkdir(parents=True, exist_ok=True)
            if stage in self.fail:
                (out / "partial.txt").write_text("half")
                raise RuntimeError(f"{stage} exploded")
            (out / "out.txt").write_text(f"{stage} kl={cfg.ppo.kl_coef}")
            return out

        return fn

    def take(self) -> list[str]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def fake(monkeypatch):
    stages = FakeStages()
    monkeypatch.setattr(pipeline, "stage_function", stages)
    monkeypatch.setattr(pipeline, "preflight", lambda cfg, stages: None)  # the fake stages read no inputs
    return stages


def cfg_for(run_dir, *overrides):
    return load_config(None, [f"run.output_dir={run_dir}", "tracking.wandb=off", *overrides])


def done_stages(cfg, run_dir):
    return [s for s in STAGES if is_done(cfg, run_dir, s)]


def test_first_run_calls_all_stages_in_order(fake, run_dir):
    cfg = cfg_for(run_dir)
    outputs = run_pipeline(cfg)
    assert fake.take() == ["prefs", "reward", "ppo", "eval"]
    assert list(outputs) == list(STAGES)
    for stage in STAGES:
        assert outputs[stage] == run_dir / stage
        marker = json.loads((run_dir / stage / MARKER).read_text())
        assert marker["fingerprint"] == stage_fingerprints(cfg)[stage]
        assert (run_dir / stage / "out.txt").is_file()


def test_second_run_same_config_calls_nothing(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    outputs = run_pipeline(cfg_for(run_dir))
    assert fake.take() == []
    assert outputs == {s: run_dir / s for s in STAGES}


def test_changing_kl_coef_reruns_ppo_and_eval(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    cfg = cfg_for(run_dir, "ppo.kl_coef=0.1")
    run_pipeline(cfg)
    assert fake.take() == ["ppo", "eval"]
    assert (run_dir / "ppo" / "out.txt").read_text() == "ppo kl=0.1"
    assert done_stages(cfg, run_dir) == list(STAGES)


def test_changing_eval_reruns_eval_only(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, "eval.num_prompts=7"))
    assert fake.take() == ["eval"]


def test_changing_reward_reruns_reward_ppo_eval(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, "reward.epochs=3"))
    assert fake.take() == ["reward", "ppo", "eval"]


def test_changing_prefs_num_prompts_reruns_all(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, "prefs.num_prompts=8"))
    assert fake.take() == list(STAGES)


def test_changing_seed_reruns_all(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, "run.seed=1"))
    assert fake.take() == list(STAGES)


def test_changing_tracking_or_name_reruns_nothing(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, "tracking.project=other", "run.name=renamed"))
    assert fake.take() == []


def test_going_back_to_old_config_reruns_again(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    run_pipeline(cfg_for(run_dir, "ppo.kl_coef=0.1"))
    fake.take()
    run_pipeline(cfg_for(run_dir))  # markers now hold the kl=0.1 fingerprints
    assert fake.take() == ["ppo", "eval"]


def test_force_reruns_everything(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir), force=True)
    assert fake.take() == list(STAGES)


def test_force_only_one_stage(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    cfg = cfg_for(run_dir)
    run_pipeline(cfg, only="reward", force=True)
    assert fake.take() == ["reward"]
    # the stages after a rerun stage are stale: their markers are gone
    assert done_stages(cfg, run_dir) == ["prefs", "reward"]
    run_pipeline(cfg)
    assert fake.take() == ["ppo", "eval"]


def test_only_skips_a_done_stage(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    outputs = run_pipeline(cfg_for(run_dir), only="ppo")
    assert fake.take() == [] and list(outputs) == ["ppo"]


def test_only_prefs_on_fresh_dir(fake, run_dir):
    outputs = run_pipeline(cfg_for(run_dir), only="prefs")
    assert fake.take() == ["prefs"] and list(outputs) == ["prefs"]


def test_only_reward_without_prefs_raises(fake, run_dir):
    with pytest.raises(UserError) as e:
        run_pipeline(cfg_for(run_dir), only="reward")
    msg = str(e.value)
    assert "prefs" in msg and "has not finished" in msg and "rlhf prefs" in msg
    assert fake.take() == []


def test_only_ppo_with_prefs_from_other_config_raises(fake, run_dir):
    run_pipeline(cfg_for(run_dir), only="prefs")
    run_pipeline(cfg_for(run_dir), only="reward")
    fake.take()
    with pytest.raises(UserError) as e:
        run_pipeline(cfg_for(run_dir, "prefs.num_prompts=8"), only="ppo")
    assert "prefs" in str(e.value) and "different config" in str(e.value)
    assert fake.take() == []


def test_start_ppo_reruns_ppo_and_eval(fake, run_dir):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    outputs = run_pipeline(cfg_for(run_dir), start="ppo")
    assert fake.take() == ["ppo", "eval"]
    assert list(outputs) == ["ppo", "eval"]


def test_start_needs_earlier_stages(fake, run_dir):
    run_pipeline(cfg_for(run_dir), only="prefs")
    fake.take()
    with pytest.raises(UserError) as e:
        run_pipeline(cfg_for(run_dir), start="ppo")
    assert "reward" in str(e.value)
    assert fake.take() == []


@pytest.mark.parametrize("kwargs", [{"only": "train"}, {"start": "rl"}])
def test_unknown_stage_raises_before_any_work(fake, run_dir, kwargs):
    with pytest.raises(UserError) as e:
        run_pipeline(cfg_for(run_dir), **kwargs)
    assert "unknown stage" in str(e.value) and "prefs, reward, ppo, eval" in str(e.value)
    assert fake.take() == []
    assert not run_dir.exists()


def test_failing_stage_leaves_no_marker_and_keeps_earlier(fake, run_dir):
    cfg = cfg_for(run_dir)
    fake.fail.add("ppo")
    with pytest.raises(RuntimeError, match="ppo exploded"):
        run_pipeline(cfg)
    assert fake.take() == ["prefs", "reward", "ppo"]
    assert not (run_dir / "ppo" / MARKER).exists()
    assert not (run_dir / "eval" / MARKER).exists()
    assert done_stages(cfg, run_dir) == ["prefs", "reward"]
    # the next run resumes at the failed stage
    fake.fail.clear()
    run_pipeline(cfg)
    assert fake.take() == ["ppo", "eval"]


def test_failing_rerun_removes_stale_marker(fake, run_dir):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    fake.take()
    fake.fail.add("reward")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, force=True, start="reward")
    assert fake.take() == ["reward"]
    # reward's old marker (and those after it) must not survive a failed rerun
    assert done_stages(cfg, run_dir) == ["prefs"]


def test_config_yaml_written(fake, run_dir):
    cfg = cfg_for(run_dir, "ppo.kl_coef=0.3")
    run_pipeline(cfg)
    saved = run_dir / "config.yaml"
    assert saved.is_file()
    assert load_config(saved) == cfg


def test_config_yaml_written_even_when_a_stage_fails(fake, run_dir):
    fake.fail.add("prefs")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg_for(run_dir))
    assert (run_dir / "config.yaml").is_file()


def test_corrupt_marker_is_not_done(fake, run_dir):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    fake.take()
    (run_dir / "reward" / MARKER).write_text("{half a json")
    run_pipeline(cfg)
    assert fake.take() == ["reward", "ppo", "eval"]


def test_fingerprints_chain():
    a = stage_fingerprints(load_config(None))
    b = stage_fingerprints(load_config(None, ["reward.lora=true"]))
    assert a["prefs"] == b["prefs"]
    assert all(a[s] != b[s] for s in ("reward", "ppo", "eval"))
    assert len(set(a.values())) == 4


def test_real_stage_function_unknown_stage():
    with pytest.raises(UserError):
        pipeline.stage_function("nope")


# Stages that read a setting of a later section must also be fingerprinted on it: prefs samples with
# ppo.stop_tokens (reward_models/data.py), and the reward stage normalises scores on responses
# sampled with ppo.max_new_tokens / ppo.temperature / ppo.stop_tokens (reward_models/train.py).
@pytest.mark.parametrize("override, first", [
    ("ppo.stop_tokens=['!']", "prefs"),
    ("ppo.temperature=0.7", "reward"),
    ("ppo.max_new_tokens=16", "reward"),
])
def test_cross_section_inputs_rerun_the_stage_that_reads_them(fake, run_dir, override, first):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, override))
    assert fake.take() == list(STAGES[STAGES.index(first):])


# ---------------------------------------------------------------------------------------------
# atomic_dir


def test_atomic_dir_replaces_on_success(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp != final
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind


def test_atomic_dir_creates_missing_parent(tmp_path):
    final = tmp_path / "a" / "b" / "model"
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"


def test_atomic_dir_keeps_old_folder_if_body_raises(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "weights").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_atomic_dir_no_folder_if_body_raises(tmp_path):
    final = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(final) as tmp:
            (tmp / "weights").write_text("half")
            raise KeyboardInterrupt
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []
