"""rlhf/cli.py through a real subprocess: help texts, one-line user errors with exit code 2, --debug."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf.cli import STAGE_HELP, build_parser

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def rlhf(*args, cwd=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or PROJECT_ROOT, timeout=timeout, env=os.environ.copy())


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("rlhf: error:")
    for needle in needles:
        assert needle in lines[0]
    return lines[0]


def test_top_level_help():
    proc = rlhf("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("run", "prefs", "reward", "ppo", "eval", "inspect", "bench"):
        assert command in proc.stdout
    assert "prefs -> reward -> ppo -> eval" in proc.stdout
    assert "KEY=VALUE" in proc.stdout


@pytest.mark.parametrize("stage", list(STAGE_HELP))
def test_stage_help(stage):
    proc = rlhf(stage, "--help")
    assert proc.returncode == 0, proc.stderr
    assert f"usage: rlhf {stage}" in proc.stdout
    assert STAGE_HELP[stage] in " ".join(proc.stdout.split())  # description, unwrapped
    assert "--force" in proc.stdout and "KEY=VALUE" in proc.stdout


def test_run_help():
    proc = rlhf("run", "--help")
    assert proc.returncode == 0
    assert "usage: rlhf run" in proc.stdout
    assert "--only" in proc.stdout and "--from" in proc.stdout and "STAGE" in proc.stdout


@pytest.mark.parametrize("command, words", [("inspect", ["run_dir", "--sort"]), ("bench", ["--updates"])])
def test_other_commands_help(command, words):
    proc = rlhf(command, "--help")
    assert proc.returncode == 0
    assert f"usage: rlhf {command}" in proc.stdout
    for word in words:
        assert word in proc.stdout


def test_console_script_help():
    script = Path(sys.executable).parent / "rlhf"
    if not script.exists():
        pytest.skip("console script not installed next to this interpreter")
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: rlhf" in proc.stdout


def test_no_command_is_usage_error():
    proc = rlhf()
    assert proc.returncode == 2 and "usage: rlhf" in proc.stderr


def test_bad_config_key_is_one_line(default_yaml, tmp_path):
    proc = rlhf("run", default_yaml, "ppo.kl_cof=0.1", f"run.output_dir={tmp_path / 'run'}")
    line = assert_user_error(proc, "ppo.kl_cof", "ppo.kl_coef")
    assert proc.stdout == ""
    assert not (tmp_path / "run").exists(), line


@pytest.mark.parametrize("stage", ["prefs", "reward", "ppo", "eval"])
def test_bad_config_value_each_stage(stage, default_yaml):
    proc = rlhf(stage, default_yaml, "ppo.batch_size=abc")
    assert_user_error(proc, "ppo.batch_size", "expected int")


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("ppo:\n  kl_coef: [0.1\n")
    assert_user_error(rlhf("run", path), str(path), "invalid YAML")


def test_missing_config_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert_user_error(rlhf("run", missing), "not found", str(missing))


def test_debug_shows_traceback(default_yaml):
    proc = rlhf("run", default_yaml, "ppo.kl_cof=0.1", "--debug")
    assert proc.returncode not in (0, 2)
    assert "Traceback" in proc.stderr
    assert "ConfigError" in proc.stderr and "ppo.kl_coef" in proc.stderr


def test_unknown_stage_for_only(default_yaml, tmp_path):
    run_dir = tmp_path / "run"
    proc = rlhf("run", default_yaml, f"run.output_dir={run_dir}", "--only", "train")
    assert_user_error(proc, "unknown stage", "'train'")
    assert not run_dir.exists()


def test_unknown_stage_for_from(default_yaml, tmp_path):
    proc = rlhf("run", default_yaml, f"run.output_dir={tmp_path / 'run'}", "--from", "rl")
    assert_user_error(proc, "unknown stage", "'rl'")


def test_only_and_from_are_exclusive(default_yaml):
    proc = rlhf("run", default_yaml, "--only", "ppo", "--from", "reward")
    assert proc.returncode == 2 and "not allowed with" in proc.stderr


def test_stage_needing_earlier_stage_is_user_error(tmp_path):
    # the tiny model: the up-front checks load the policy's tokenizer, which for the embedded default means
    # converting it once (minutes in this test's empty model cache)
    proc = rlhf("ppo", PROJECT_ROOT / "configs" / "tiny.yaml", f"run.output_dir={tmp_path / 'run'}")
    assert_user_error(proc, "prefs", "has not finished")


def test_parser_accepts_overrides_before_options():
    args = build_parser().parse_args(["run", "c.yaml", "a=1", "b=2", "--only", "ppo", "--force"])
    assert args.overrides == ["a=1", "b=2"] and args.only == "ppo" and args.force


@pytest.mark.parametrize("options", [["--force"], ["--only", "prefs"], ["--debug"]])
def test_overrides_after_options_are_applied(default_yaml, options):
    # the override after the option reaches load_config: its typo is reported
    proc = rlhf("run", default_yaml, *options, "ppo.kl_cof=0.1")
    if "--debug" in options:
        assert proc.returncode not in (0, 2) and "ppo.kl_coef" in proc.stderr
    else:
        assert_user_error(proc, "ppo.kl_cof", "ppo.kl_coef")


def test_overrides_on_both_sides_of_options(default_yaml, tmp_path):
    run_dir = tmp_path / "run"
    proc = rlhf("run", default_yaml, "tracking.wandb=off", "--only", "train", f"run.output_dir={run_dir}")
    assert_user_error(proc, "unknown stage", "'train'")
    assert not run_dir.exists()


@pytest.mark.parametrize("extra", [["--bogus"], ["notanoverride"]])
def test_unknown_arguments_are_usage_errors(default_yaml, extra):
    proc = rlhf("run", default_yaml, "--force", *extra)
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr and extra[0] in proc.stderr
    assert "Traceback" not in proc.stderr
