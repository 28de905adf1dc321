"""rlhf/tracking.py: W&B mode resolution, local metrics files, and an offline W&B run (no network)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from rlhf.config import load_config
from rlhf.tracking import Tracker, wandb_mode
from rlhf.utils import read_jsonl


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No W&B settings in the environment and a HOME without .netrc."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("WANDB_MODE", "WANDB_API_KEY", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    return home


# ---------------------------------------------------------------------------------------------
# wandb_mode


@pytest.mark.parametrize("setting, mode", [("off", "disabled"), ("online", "online"), ("offline", "offline")])
def test_explicit_settings(clean_env, monkeypatch, setting, mode):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # an explicit setting ignores the environment
    monkeypatch.setenv("WANDB_MODE", "online")
    assert wandb_mode(setting) == mode


def test_auto_without_anything_is_offline(clean_env):
    assert wandb_mode("auto") == "offline"


@pytest.mark.parametrize("env", ["offline", "online", "disabled"])
def test_auto_follows_wandb_mode(clean_env, monkeypatch, env):
    monkeypatch.setenv("WANDB_MODE", env)
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == env


def test_auto_with_api_key_is_online(clean_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"


def test_auto_with_netrc_is_online(clean_env):
    netrc = clean_env / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "x" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto") == "online"


def test_auto_with_other_netrc_is_offline(clean_env):
    netrc = clean_env / ".netrc"
    netrc.write_text("machine example.com\n  login user\n  password secret\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto") == "offline"


def test_auto_with_broken_netrc_is_offline(clean_env):
    netrc = clean_env / ".netrc"
    netrc.write_text("machine\n")
    netrc.chmod(0o600)
    assert wandb_mode("auto") == "offline"


# ---------------------------------------------------------------------------------------------
# local files


def make_cfg(tmp_path, wandb="off"):
    return load_config(None, [f"run.output_dir={tmp_path / 'run'}", f"tracking.wandb={wandb}", "run.name=t"])


def test_metrics_jsonl_rows(tmp_path):
    cfg = make_cfg(tmp_path)
    stage_dir = tmp_path / "run" / "ppo"
    tracker = Tracker(cfg, "ppo", stage_dir)
    assert tracker.run is None
    tracker.log({"loss": 0.5, "kl": torch.tensor(0.25), "n": 3, "bad": float("nan"), "big": float("inf")}, step=0)
    tracker.log({"loss": 0.25}, step=1)
    tracker.finish()
    rows = read_jsonl(stage_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["loss"] == 0.5 and rows[0]["kl"] == 0.25 and rows[0]["n"] == 3
    assert rows[0]["bad"] is None and rows[0]["big"] == "inf"  # valid JSON, no NaN literal
    assert rows[1] == {"step": 1, "time": rows[1]["time"], "loss": 0.25}
    assert rows[1]["time"] >= rows[0]["time"] >= 0
    assert "NaN" not in (stage_dir / "metrics.jsonl").read_text()


def test_metrics_append_across_trackers(tmp_path):
    cfg = make_cfg(tmp_path)
    stage_dir = tmp_path / "run" / "eval"
    Tracker(cfg, "eval", stage_dir).log({"a": 1}, step=0)
    Tracker(cfg, "eval", stage_dir).log({"a": 2}, step=5)
    assert [(r["step"], r["a"]) for r in read_jsonl(stage_dir / "metrics.jsonl")] == [(0, 1), (5, 2)]


def test_log_table_appends_rows(tmp_path):
    cfg = make_cfg(tmp_path)
    stage_dir = tmp_path / "run" / "ppo"
    tracker = Tracker(cfg, "ppo", stage_dir)
    tracker.log_table("samples", [{"prompt": "p1", "response": "é ok", "score": torch.tensor(1.5)},
                                  {"prompt": "p2", "response": "x", "score": 0.0}], step=0)
    tracker.log_table("samples", [{"prompt": "p3", "response": "y", "score": -1.0}], step=5)
    tracker.log_table("samples", [], step=6)  # nothing to write
    rows = read_jsonl(stage_dir / "samples.jsonl")
    assert [(r["step"], r["prompt"]) for r in rows] == [(0, "p1"), (0, "p2"), (5, "p3")]
    assert rows[0]["score"] == 1.5 and rows[0]["response"] == "é ok"
    assert not (stage_dir / "metrics.jsonl").exists()


def test_disabled_tracker_writes_nothing(tmp_path):
    cfg = make_cfg(tmp_path, wandb="offline")
    stage_dir = tmp_path / "run" / "ppo"
    tracker = Tracker(cfg, "ppo", stage_dir, enabled=False)  # a non-main process
    assert tracker.run is None
    tracker.log({"a": 1}, step=0)
    tracker.log_table("samples", [{"a": 1}], step=0)
    tracker.log_summary({"a": 1})
    tracker.finish()
    assert list(stage_dir.iterdir()) == []


def test_wandb_failure_falls_back_to_files(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def broken_init(**kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken_init)
    cfg = make_cfg(tmp_path, wandb="online")
    stage_dir = tmp_path / "run" / "reward"
    with pytest.warns(UserWarning, match="W&B unavailable"):
        tracker = Tracker(cfg, "reward", stage_dir)
    assert tracker.run is None
    tracker.log({"acc": 0.75}, step=2)
    tracker.finish()
    assert read_jsonl(stage_dir / "metrics.jsonl")[0]["acc"] == 0.75


# ---------------------------------------------------------------------------------------------
# a real offline W&B run


def test_offline_wandb_run(tmp_path, monkeypatch, clean_env):
    """tracking.wandb=offline with nothing configured: no network, no prompt, files under the run dir."""
    pytest.importorskip("wandb")
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setattr("sys.stdin", None)  # would fail loudly if anything tried to prompt
    cfg = make_cfg(tmp_path, wandb="offline")
    stage_dir = tmp_path / "run" / "ppo"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the W&B fallback warning would fail the test
        tracker = Tracker(cfg, "ppo", stage_dir)
    try:
        assert tracker.run is not None
        assert tracker.run.offline
        assert tracker.run.name == "t-ppo" and tracker.run.group == "t"
        assert tracker.run.config["ppo"]["kl_coef"] == cfg.ppo.kl_coef
        tracker.log({"loss": 1.0, "nan": float("nan")}, step=0)
        tracker.log({"loss": 0.5}, step=1)
        tracker.log_table("samples", [{"prompt": "p", "response": "r", "score": 0.5}], step=1)
        tracker.log_summary({"final/score": torch.tensor(0.5)})
    finally:
        tracker.finish()
    assert tracker.run is None
    rows = read_jsonl(stage_dir / "metrics.jsonl")
    assert [r["loss"] for r in rows] == [1.0, 0.5]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert math.isfinite(rows[0]["time"])
    assert json.loads((stage_dir / "samples.jsonl").read_text())["score"] == 0.5


def test_a_resumed_stage_continues_its_wandb_run(tmp_path, monkeypatch):
    """The W&B run id is kept in the stage's folder: a PPO stage resumed from its work folder continues
    the run it started; a stage in a fresh folder starts a new one."""
    wandb = pytest.importorskip("wandb")
    calls = []

    class FakeRun:
        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kwargs: calls.append(kwargs) or FakeRun())
    cfg = make_cfg(tmp_path, wandb="offline")
    Tracker(cfg, "ppo", tmp_path / "work").finish()
    Tracker(cfg, "ppo", tmp_path / "work").finish()  # killed and restarted: the same folder
    Tracker(cfg, "ppo", tmp_path / "other").finish()
    ids = [c["id"] for c in calls]
    assert ids[0] == ids[1] != ids[2]
    assert all(c["resume"] == "allow" for c in calls)
