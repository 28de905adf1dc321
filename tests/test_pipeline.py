"""rlhf/pipeline.py and rlhf/stages.py: fingerprints decide which stages run, skip or rerun, and a stage
that fails leaves the run directory as it was; with fake stage functions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import rlhf.pipeline as pipeline
from rlhf.config import load_config
from rlhf.pipeline import PARTIAL, run_pipeline
from rlhf.stages import MARKER, STAGES, is_done, read_marker, stage_fingerprints
from rlhf.utils import UserError, atomic_dir


class FakeStages:
    """Stage functions that record their calls (and what their work folder held) and write `out/out.txt`."""

    def __init__(self):
        self.calls: list[str] = []
        self.found: dict[str, list[str]] = {}
        self.fail: set[str] = set()

    def __call__(self, stage: str):
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r}")

        def fn(cfg, run_dir, out):
            self.calls.append(stage)
            self.found[stage] = sorted(p.name for p in Path(out).iterdir())
            (out / "partial.txt").write_text("written before any failure")
            if stage in self.fail:
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
    assert "prefs" in msg and "has not finished" in msg and "prefs CONFIG" in msg
    assert fake.take() == []


def test_only_ppo_with_prefs_from_other_config_raises(fake, run_dir):
    run_pipeline(cfg_for(run_dir), only="prefs")
    run_pipeline(cfg_for(run_dir), only="reward")
    fake.take()
    with pytest.raises(UserError) as e:
        run_pipeline(cfg_for(run_dir, "prefs.num_prompts=8"), only="ppo")
    assert "prefs" in str(e.value) and "prefs.num_prompts: 512 -> 8" in str(e.value)
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
    assert not (run_dir / "ppo").exists() and not (run_dir / "eval").exists()
    assert done_stages(cfg, run_dir) == ["prefs", "reward"]
    # the next run starts at the failed stage, in a fresh work folder (only PPO keeps its work to resume)
    fake.fail.clear()
    run_pipeline(cfg)
    assert fake.take() == ["ppo", "eval"]
    assert fake.found["eval"] == []


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of the run directory but unfinished work, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and PARTIAL not in p.parts}


@pytest.mark.parametrize("override, failing", [
    ("ppo.kl_coef=0.3", "ppo"),  # a changed PPO setting that fails at run time
    ("prefs.noise.bt_temperature=0.001", "prefs"),  # a changed prefs setting that fails at run time
    ("eval.num_prompts=7", "eval"),
])
def test_a_failing_rerun_keeps_the_finished_run_as_it_was(fake, run_dir, override, failing):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    before = snapshot(run_dir)
    fake.take()
    fake.fail.add(failing)
    with pytest.raises(RuntimeError):
        run_pipeline(cfg_for(run_dir, override))
    assert fake.take()[-1] == failing
    assert snapshot(run_dir) == before  # markers, outputs and config.yaml untouched
    fake.fail.clear()
    run_pipeline(cfg)  # the previous config: every stage is still done
    assert fake.take() == []


def test_a_failing_forced_rerun_keeps_the_previous_outputs(fake, run_dir):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    before = snapshot(run_dir)
    fake.take()
    fake.fail.add("reward")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, force=True, start="reward")
    assert fake.take() == ["reward"]
    assert snapshot(run_dir) == before
    assert done_stages(cfg, run_dir) == list(STAGES)


def test_config_yaml_written(fake, run_dir):
    cfg = cfg_for(run_dir, "ppo.kl_coef=0.3")
    run_pipeline(cfg)
    saved = run_dir / "config.yaml"
    assert saved.is_file()
    assert load_config(saved) == cfg


def test_config_yaml_is_the_config_of_the_stages_that_are_done(fake, run_dir):
    fake.fail.add("prefs")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg_for(run_dir))
    assert not (run_dir / "config.yaml").exists()  # nothing finished
    fake.fail = {"ppo"}
    cfg = cfg_for(run_dir, "reward.epochs=2")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg)
    assert load_config(run_dir / "config.yaml") == cfg  # written when prefs and reward finished


def test_a_refused_stage_command_leaves_config_yaml_alone(fake, run_dir):
    """`rlhf eval CONFIG ppo.kl_coef=9` on a finished run: refused (PPO is not done with kl 9), nothing written."""
    run_pipeline(cfg_for(run_dir))
    before = snapshot(run_dir)
    with pytest.raises(UserError, match="ppo"):
        run_pipeline(cfg_for(run_dir, "ppo.kl_coef=9"), only="eval")
    assert snapshot(run_dir) == before


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
# ppo.stop_tokens (reward_models/prefs.py), and the reward stage normalises scores on responses
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


# ---------------------------------------------------------------------------------------------
# what the fingerprints cover: file contents, upstream executions; what they leave out


def test_editing_the_prompts_file_reruns_every_stage_that_reads_it(fake, run_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    cfg = cfg_for(run_dir, f"data.train_prompts={prompts}")
    run_pipeline(cfg)
    fake.take()
    prompts.write_text('{"prompt": "a"}\n')  # rewritten, same contents: nothing to do
    run_pipeline(cfg)
    assert fake.take() == []
    prompts.write_text('{"prompt": "b"}\n')
    run_pipeline(cfg)
    assert fake.take() == list(STAGES)


def test_editing_the_test_prompts_reruns_eval_only(fake, run_dir, tmp_path):
    prompts = tmp_path / "test.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    cfg = cfg_for(run_dir, f"data.test_prompts={prompts}")
    run_pipeline(cfg)
    fake.take()
    prompts.write_text('{"prompt": "changed"}\n')
    run_pipeline(cfg)
    assert fake.take() == ["eval"]


def test_editing_a_judge_module_reruns_from_prefs(fake, run_dir, tmp_path, monkeypatch):
    (tmp_path / "myjudge.py").write_text("def score(text):\n    return len(text)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = cfg_for(run_dir, "prefs.judge=myjudge:score")
    run_pipeline(cfg)
    fake.take()
    (tmp_path / "myjudge.py").write_text("def score(text):\n    return -len(text)\n")
    run_pipeline(cfg)
    assert fake.take() == list(STAGES)


def test_changing_a_local_model_folder_reruns_every_stage(fake, run_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights v1")
    cfg = cfg_for(run_dir, f"model.policy={model}")
    run_pipeline(cfg)
    fake.take()
    (model / "model.safetensors").write_bytes(b"weights v2")
    run_pipeline(cfg)
    assert fake.take() == list(STAGES)
    assert read_marker(run_dir, "prefs")["sources"]["model.policy"]


@pytest.mark.parametrize("overrides", [
    ["ppo.sample_every=1", "ppo.save_every=1", "ppo.keep_checkpoints=5"],
    ["run.threads=1", "run.device=cpu", "tracking.wandb=offline", "tracking.project=x"],
])
def test_keys_of_no_effect_rerun_nothing(fake, run_dir, overrides):
    run_pipeline(cfg_for(run_dir))
    fake.take()
    run_pipeline(cfg_for(run_dir, *overrides))
    assert fake.take() == []


def test_a_recomputed_stage_makes_the_later_ones_stale(fake, run_dir):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    fake.take()
    run_pipeline(cfg, only="prefs", force=True)  # same settings, new outputs
    assert fake.take() == ["prefs"]
    assert done_stages(cfg, run_dir) == ["prefs"]
    with pytest.raises(UserError, match="recomputed"):
        run_pipeline(cfg, only="ppo")
    run_pipeline(cfg)
    assert fake.take() == ["reward", "ppo", "eval"]


def test_ppo_keeps_its_unfinished_work_per_config(fake, run_dir):
    """A killed PPO run finds its work again (to resume from its checkpoints); another config, or --force,
    starts in a fresh folder; the work of other configs goes once a PPO run has finished."""
    cfg = cfg_for(run_dir)
    fake.fail.add("ppo")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg)
    with pytest.raises(RuntimeError):
        run_pipeline(cfg)
    assert fake.found["ppo"] == ["partial.txt"]  # the same work folder, kept
    with pytest.raises(RuntimeError):
        run_pipeline(cfg_for(run_dir, "ppo.kl_coef=0.2"))
    assert fake.found["ppo"] == []  # another config: a folder of its own
    assert len(list((run_dir / PARTIAL).glob("ppo-*"))) == 2
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, force=True)
    assert fake.found["ppo"] == []  # --force never resumes
    fake.fail.clear()
    run_pipeline(cfg)
    assert fake.found["ppo"] == ["partial.txt"]
    assert list((run_dir / PARTIAL).glob("ppo-*")) == []


def test_start_from_a_recomputed_stage_gives_ppo_a_fresh_folder(fake, run_dir):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    fake.fail.add("ppo")
    with pytest.raises(RuntimeError):
        run_pipeline(cfg, start="prefs")
    fake.fail.clear()
    fake.take()
    run_pipeline(cfg, start="prefs")
    assert fake.take() == list(STAGES)
    assert fake.found["ppo"] == []  # new prefs and reward outputs: nothing of the earlier PPO work is reused


def test_an_interrupted_replacement_is_undone(fake, run_dir):
    cfg = cfg_for(run_dir)
    run_pipeline(cfg)
    fake.take()
    # a kill between the two renames of publishing: the old folder moved aside, the new one not in place
    (run_dir / PARTIAL).mkdir(exist_ok=True)
    (run_dir / "eval").rename(run_dir / PARTIAL / "eval.old")
    run_pipeline(cfg)
    assert fake.take() == []
    assert (run_dir / "eval" / "out.txt").is_file()


def test_a_hub_model_enters_by_its_cached_revision(fake, run_dir, tmp_path, monkeypatch):
    """A hub name whose files are in the local hub cache is fingerprinted by the commit `refs/main` points
    to: a newer download reruns every stage."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--someorg--somemodel"
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    cfg = cfg_for(run_dir, "model.policy=someorg/somemodel")
    run_pipeline(cfg)
    assert read_marker(run_dir, "prefs")["sources"]["model.policy"] == "a" * 40
    fake.take()
    run_pipeline(cfg)
    assert fake.take() == []
    (repo / "refs" / "main").write_text("b" * 40)
    run_pipeline(cfg)
    assert fake.take() == list(STAGES)


# ---------------------------------------------------------------------------------------------
# one process at a time in a run directory


def can_lock(folder: Path) -> bool:
    """Whether a new descriptor of this process could take the folder's lock now (flock locks belong to
    open descriptions: another open of the folder conflicts with run_pipeline's, as another process would)."""
    import fcntl
    import os

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.parametrize("exists", [True, False])
def test_the_run_directory_is_locked_while_stages_run_and_free_after(fake, run_dir, exists, monkeypatch):
    if exists:
        run_dir.mkdir()
    seen = []
    stage_fn = fake("ppo")

    def locked_stage(stage):
        def fn(cfg, rd, out):
            seen.append((stage, can_lock(rd)))
            return stage_fn(cfg, rd, out)
        return fn

    monkeypatch.setattr(pipeline, "stage_function", locked_stage)
    run_pipeline(cfg_for(run_dir))
    assert seen == [(s, False) for s in STAGES]
    assert can_lock(run_dir)  # released on return
    fake.fail.add("eval")
    monkeypatch.setattr(pipeline, "stage_function", fake)
    with pytest.raises(RuntimeError, match="eval exploded"):
        run_pipeline(cfg_for(run_dir, "ppo.kl_coef=0.3"))
    assert can_lock(run_dir)  # and when a stage raises


def test_a_second_process_on_a_run_directory_stops_before_touching_it(run_dir):
    import os
    import signal
    import subprocess
    import sys

    (run_dir / PARTIAL).mkdir(parents=True)
    (run_dir / PARTIAL / "prefs.old").mkdir()  # what a first run may be in the middle of: not to be "recovered"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(120)", str(run_dir)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", "configs/tiny.yaml", f"run.output_dir={run_dir}"],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and f"run directory {run_dir} is in use by another rlhf process" in lines[0]
        assert f"(pid {holder.pid}: {sys.executable} -c import fcntl" in lines[0]
        assert (run_dir / PARTIAL / "prefs.old").is_dir() and not (run_dir / "prefs").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert can_lock(run_dir)  # a killed holder leaves no lock behind


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(fake, run_dir, monkeypatch, capsys):
    import errno

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(pipeline.fcntl, "flock", no_locks)
    run_pipeline(cfg_for(run_dir))
    assert fake.take() == list(STAGES)
    assert f"cannot lock run directory {run_dir} (No locks available)" in capsys.readouterr().err
