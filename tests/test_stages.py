"""rlhf/stages.py: a stage's fingerprint covers every config field it reads, checked on the real stages.

Each stage of a small tiny-config run is given a config that records the fields read from it; a field
that the stage's fingerprint does not cover (its own `STAGE_INPUTS`, an earlier stage's, or a field of
no effect) fails the test: a changed value of it would silently reuse stale outputs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import rlhf.pipeline as pipeline
import rlhf.stages as stages
from rlhf.config import PipelineConfig, load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"


class Recorder:
    """A read-only view of a config that records the dotted names of the fields read through it."""

    def __init__(self, target, path: str, seen: set[str]):
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_seen", seen)

    def __getattr__(self, name):
        value = getattr(self._target, name)
        key = f"{self._path}.{name}" if self._path else name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return Recorder(value, key, self._seen)
        if name.startswith("_") or callable(value):
            raise AssertionError(f"a stage used {key} of its config")
        self._seen.add(key)
        return value

    def __setattr__(self, name, value):
        raise AssertionError(f"a stage assigned {name} on its config")


def unwrap(cfg):
    return object.__getattribute__(cfg, "_target") if isinstance(cfg, Recorder) else cfg


def test_every_field_a_stage_reads_is_in_its_fingerprint(tmp_path, monkeypatch):
    read: dict[str, set[str]] = {s: set() for s in stages.STAGES}
    real_function = pipeline.stage_function

    def recording(stage):
        fn = real_function(stage)
        return lambda cfg, run_dir, out: fn(Recorder(cfg, "", read[stage]), run_dir, out)

    monkeypatch.setattr(pipeline, "stage_function", recording)
    # the bookkeeping itself reads the whole config: it sees the real one
    for name in ("stage_records", "stage_identity", "why_not_done"):
        real = getattr(stages, name)
        monkeypatch.setattr(stages, name, lambda cfg, *a, _real=real, **k: _real(unwrap(cfg), *a, **k))
    cfg = load_config(TINY, [f"run.output_dir={tmp_path / 'run'}", "tracking.wandb=off", "prefs.num_prompts=32",
                             "reward.epochs=1", "reward.normalize_samples=16", "ppo.num_updates=2",
                             "ppo.save_every=1", "eval.num_prompts=8", "eval.checkpoints=true"])
    pipeline.run_pipeline(cfg)
    assert all(read.values()), read  # every stage did read its config
    for stage, keys in read.items():
        uncovered = sorted(k for k in keys if not stages.reads(stage, k))
        assert not uncovered, f"the {stage} stage reads {uncovered}, which its fingerprint does not cover"


def test_the_check_catches_an_uncovered_field(monkeypatch):
    """The coverage rule itself: a field read by a stage before the stage that declares it is not covered."""
    assert stages.reads("eval", "ppo.kl_coef") and stages.reads("ppo", "reward.max_length")
    assert not stages.reads("prefs", "ppo.kl_coef")
    assert not stages.reads("reward", "eval.num_prompts")
    assert stages.reads("prefs", "ppo.stop_tokens") and stages.reads("prefs", "tracking.wandb")
    monkeypatch.setitem(stages.STAGE_INPUTS, "prefs", tuple(k for k in stages.STAGE_INPUTS["prefs"]
                                                             if k != "ppo.stop_tokens"))
    assert not stages.reads("prefs", "ppo.stop_tokens")


def test_every_config_field_is_an_input_or_of_no_effect():
    """A new config field must be given to a stage (or declared of no effect) before it can be used."""
    def fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            key = f"{prefix}{f.name}"
            tp = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if tp is not None and dataclasses.is_dataclass(tp):
                yield from fields(tp, key + ".")
            else:
                yield key

    orphans = [k for k in fields(PipelineConfig) if not stages.reads("eval", k)]
    assert not orphans, orphans


@pytest.mark.parametrize("value, expected", [("rm", "rm"), ("rm:1.0", "rm"), ("mod:fn:0.5", "mod:fn"),
                                             ("mod:fn", "mod:fn"), ("keyword:good", "keyword:good")])
def test_reward_spec_parts(value, expected):
    assert [name for name, _ in stages.parse_reward_spec(value)] == [expected]


def test_file_hashes_reuse_size_and_mtime(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("one")
    hashes = stages.FileHashes()
    first = hashes.file(f)
    assert hashes.used[str(f.resolve())][2] == first
    f.write_text("two")
    assert hashes.file(f) != first
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "x").write_text("1")
    (folder / ".hidden").write_text("ignored")
    h1 = hashes.folder(folder)
    (folder / ".hidden").write_text("still ignored")
    assert hashes.folder(folder) == h1
    (folder / "y").write_text("2")
    assert hashes.folder(folder) != h1


def finished_markers(cfg, run_dir: Path) -> None:
    """`_done.json` of every stage, as a run of `cfg` leaves them (no outputs: only the bookkeeping is read)."""
    for stage in stages.STAGES:
        stages.write_marker(run_dir / stage, stages.marker_for(cfg, run_dir, stage, 1.0))


def test_a_setting_added_since_a_run_at_the_value_it_computed_keeps_the_run(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}"])
    finished_markers(cfg, tmp_path)
    assert all(stages.is_done(cfg, tmp_path, s) for s in stages.STAGES)
    marker = stages.read_marker(tmp_path, "ppo")  # as a run from before the added settings existed left it
    for key in stages.ADDED_SETTINGS:
        del marker["inputs"][key]
    stages.write_marker(tmp_path / "ppo", {**marker, "fingerprint": "an earlier version's"})
    assert set(stages.ADDED_SETTINGS) <= set(stages.stage_records(cfg, tmp_path)["ppo"]["inputs"])
    assert stages.is_done(cfg, tmp_path, "ppo") and stages.is_done(cfg, tmp_path, "eval")
    # at another value the setting changes the work: the stage and the next rerun, and the reason names it
    other = load_config(TINY, [f"run.output_dir={tmp_path}", "ppo.samples_per_prompt=2"])
    assert stages.why_not_done(other, tmp_path, "ppo") == ("was run with other settings (ppo.samples_per_prompt: "
                                                           "a setting the earlier run did not have, now 2)")
    assert not stages.is_done(other, tmp_path, "eval")
    # a changed setting the run did record still counts, and so does a stale stage upstream
    changed = load_config(TINY, [f"run.output_dir={tmp_path}", "ppo.kl_coef=0.5"])
    assert not stages.is_done(changed, tmp_path, "ppo")
    reward = stages.read_marker(tmp_path, "reward")
    reward["inputs"]["reward.epochs"] += 1
    stages.write_marker(tmp_path / "reward", {**reward, "fingerprint": "of other settings"})
    epochs = cfg.reward.epochs
    assert stages.why_not_done(cfg, tmp_path, "ppo") == ("reads the reward stage, which was run with other settings "
                                                         f"(reward.epochs: {epochs + 1} -> {epochs})")


def test_a_setting_added_since_a_finished_run_is_named_as_the_reason_it_reruns(tmp_path):
    cfg = load_config(TINY, [f"run.output_dir={tmp_path}"])
    inputs = stages.stage_records(cfg, tmp_path)["ppo"]["inputs"]
    assert "ppo.kl_loss_coef" in inputs
    earlier = {k: v for k, v in inputs.items() if k != "ppo.kl_loss_coef"}  # a run from before the field existed
    stages.write_marker(tmp_path / "ppo", {"fingerprint": "an earlier version's", "inputs": earlier})
    cfg.ppo.kl_loss_coef = 0.1
    reason = stages.why_not_done(cfg, tmp_path, "ppo")
    assert reason == "was run with other settings (ppo.kl_loss_coef: a setting the earlier run did not have, now 0.1)"
