"""Shared fixtures: an isolated model cache for the tiny aliases, W&B off, no network.

The real model cache (where `smollm2-135m-instruct` is converted once) is kept in `REAL_CACHE`
for the slow test, which uses the `real_cache` fixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REAL_CACHE_ENV = os.environ.get("RLHF_CACHE")  # None: cache_dir() falls back to XDG / ~/.cache
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Session-wide: tiny aliases are built in a tmp cache, W&B is off, hubs are never contacted."""
    root = tmp_path_factory.mktemp("env")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RLHF_CACHE", str(root / "rlhf-cache"))
        mp.setenv("WANDB_MODE", "disabled")
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("HF_DATASETS_CACHE", str(root / "hf-datasets"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        mp.setenv("TRANSFORMERS_VERBOSITY", "error")
        yield root


@pytest.fixture
def real_cache(monkeypatch):
    """Use the user's real model cache (for the embedded SmolLM2, converted once and kept)."""
    from rlhf.models import cache_dir

    if REAL_CACHE_ENV:
        monkeypatch.setenv("RLHF_CACHE", REAL_CACHE_ENV)
    else:
        monkeypatch.delenv("RLHF_CACHE", raising=False)
    return cache_dir()


@pytest.fixture
def run_dir(tmp_path):
    return tmp_path / "run"


@pytest.fixture
def default_yaml():
    return PROJECT_ROOT / "configs" / "default.yaml"


# ---------------------------------------------------------------------------------------------
# one real tiny run per test session, shared by tests/test_e2e.py and tests/test_eval_report.py


@dataclasses.dataclass
class TinyRun:
    run_dir: Path
    command: list[str]  # the console-script command that made it (rerun it to test skipping)
    proc: subprocess.CompletedProcess
    seconds: float


def rlhf_command() -> list[str]:
    """The installed `rlhf` console script next to this interpreter, else `python -m rlhf.cli`."""
    script = Path(sys.executable).parent / "rlhf"
    return [str(script)] if script.exists() else [sys.executable, "-m", "rlhf.cli"]


@pytest.fixture(scope="session")
def tiny_run(isolated_env, tmp_path_factory) -> TinyRun:
    """`rlhf run configs/tiny.yaml` into a tmp run dir (about a minute on CPU), in a subprocess that
    inherits the isolated env (RLHF_CACHE, W&B off, offline)."""
    run_dir = tmp_path_factory.mktemp("tiny-run") / "run"
    command = [*rlhf_command(), "run", str(PROJECT_ROOT / "configs" / "tiny.yaml"), f"run.output_dir={run_dir}",
               "run.device=cpu"]
    t0 = time.time()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=PROJECT_ROOT, env=os.environ.copy(),
                          timeout=1200)
    if proc.returncode != 0:
        pytest.fail(f"tiny run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}", pytrace=False)
    return TinyRun(run_dir, command, proc, time.time() - t0)


@pytest.fixture(scope="session")
def tiny_run_dir(tiny_run) -> Path:
    return tiny_run.run_dir


class KilledRun(Exception):
    """Raised in place of a PPO update, as a kill would stop the run there."""


@pytest.fixture
def killed_at_update(monkeypatch):
    """`with killed_at_update(n): run_pipeline(...)`: the n-th PPO update of the block raises KilledRun (the
    block expects it), and the real update is back after the block."""
    import rlhf.ppo as ppo

    @contextlib.contextmanager
    def kill(n: int):
        real_update, calls = ppo.ppo_update, []

        def dies(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KilledRun()
            return real_update(*args, **kwargs)

        monkeypatch.setattr(ppo, "ppo_update", dies)
        try:
            with pytest.raises(KilledRun):
                yield
        finally:
            monkeypatch.setattr(ppo, "ppo_update", real_update)

    return kill


@pytest.fixture(scope="session")
def finished_reward_stage(tmp_path_factory):
    """A function: tiny-config overrides -> a fresh run directory whose prefs and reward stages are done (the
    upstream that PPO tests copy, built once per module that asks)."""
    from rlhf.config import load_config
    from rlhf.pipeline import run_pipeline

    def make(*overrides: str) -> Path:
        run_dir = tmp_path_factory.mktemp("upstream") / "run"
        cfg = load_config(PROJECT_ROOT / "configs" / "tiny.yaml", [f"run.output_dir={run_dir}", *overrides])
        run_pipeline(cfg, only="prefs")
        run_pipeline(cfg, only="reward")
        return run_dir

    return make
