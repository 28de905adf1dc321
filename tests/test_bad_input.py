"""Bad input through the CLI: one line, exit 2, no traceback, the culprit named, before any model is loaded.

The table runs `rlhf.cli.main` in this process (the code path of the console script, without ~4 s of imports
per case) with model loading patched to fail, so a case that got as far as loading a model fails loudly. A
handful of cases run through a real subprocess, for the exit code and stderr end to end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import cli

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = str(PROJECT_ROOT / "configs" / "tiny.yaml")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files a careful user might point the config at, and judge modules, in one folder."""
    d = tmp_path_factory.mktemp("bad-input")
    (d / "malformed.jsonl").write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "c"\n{"prompt": "d"}\n')
    (d / "empty.jsonl").write_text("")
    (d / "latin1.jsonl").write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')
    (d / "question.jsonl").write_text('{"question": "how?"}\n')
    (d / "not_objects.jsonl").write_text('{"prompt": "a"}\n["b"]\n')
    (d / "prompts.xml").write_text("<prompts/>")
    (d / "latin1.yaml").write_bytes(b"ppo:\n  kl_coef: 0.1   # caf\xe9\n")
    (d / "a_file").write_text("not a folder")
    pairs = [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(6)]
    (d / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (d / "pairs_malformed.jsonl").write_text(json.dumps(pairs[0]) + '\n{"prompt": "p1", "chosen": \n')
    (d / "pairs_same.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "x", "rejected": "x"}) + "\n")
    (d / "no_config_model").mkdir()
    (d / "bin_model").mkdir()
    (d / "bin_model" / "config.json").write_text("{}")
    (d / "bin_model" / "pytorch_model.bin").write_bytes(b"pickle")
    (d / "rlhf_bad_judge_syntax.py").write_text("def score(text:\n    return 1.0\n")
    (d / "rlhf_bad_judge_const.py").write_text("SCORE = 3\n")
    (d / "rlhf_bad_judge_raises.py").write_text("raise ImportError('needs the package vadersentiment2')\n")
    return d


def case(*overrides, needles=(), stage="run", skip_if_root=False):
    marks = [pytest.mark.skipif(IS_ROOT, reason="root can write anywhere")] if skip_if_root else []
    return pytest.param(stage, list(overrides), list(needles), marks=marks, id=" ".join(overrides)[:60] or stage)


# {d} is the folder of bad files; the run directory is given by the test.
CASES = [
    # values a careful user might try (each trained silently wrong, or failed late, before)
    case("ppo.max_grad_norm=-1", needles=["ppo.max_grad_norm must be > 0", "-1"]),
    case("ppo.cliprange=0", needles=["ppo.cliprange must be in (0, 1)"]),
    case("ppo.target_kl=0", needles=["ppo.target_kl must be > 0"]),
    case("eval.bootstrap_samples=0", needles=["eval.bootstrap_samples"]),
    case("prefs.noise.bt_temperature=-1", needles=["prefs.noise.bt_temperature must be >= 0"]),
    case("ppo.vf_coef=-1", needles=["ppo.vf_coef"]),
    case("ppo.learning_rate=.inf", needles=["ppo.learning_rate", "finite"]),
    case("ppo.batch_size=abc", needles=["ppo.batch_size", "expected int"]),
    case("ppo.kl_cof=0.1", needles=["'ppo.kl_cof'", "did you mean 'ppo.kl_coef'"]),
    case("reward.use_margin=true", needles=["reward.use_margin", "prefs.source=load"]),
    # the run directory
    case("run.output_dir={d}/a_file", needles=["run.output_dir", "a_file is a file"]),
    case("run.output_dir={d}/a_file/run", needles=["run.output_dir", "a_file is a file"]),
    case("run.output_dir={d}/read_only/run", needles=["run.output_dir", "cannot write"], skip_if_root=True),
    # prompt files
    case("data.train_prompts={d}/missing.jsonl", needles=["data.train_prompts", "not found", "missing.jsonl"]),
    case("data.train_prompts={d}/empty.jsonl", needles=["data.train_prompts", "empty.jsonl is empty"]),
    case("data.train_prompts={d}/malformed.jsonl", needles=["malformed.jsonl:3: not valid JSON"]),
    case("data.train_prompts={d}/latin1.jsonl", needles=["latin1.jsonl:2: not UTF-8"]),
    case("data.train_prompts={d}/question.jsonl", needles=["no column 'prompt'", "question", "data.prompt_column"]),
    case("data.train_prompts={d}/not_objects.jsonl", needles=["not_objects.jsonl: line 2 is a list"]),
    case("data.train_prompts={d}/prompts.xml", needles=["unsupported file type '.xml'"]),
    case("data.prompt_column=question", needles=["no column 'question'"]),
    case("data.test_prompts={d}/missing.jsonl", needles=["data.test_prompts", "not found"]),
    case("eval.prompts={d}/missing.jsonl", needles=["eval.prompts", "not found"]),
    case("eval.prompts={d}/empty.jsonl", needles=["eval.prompts", "is empty"]),
    # judges and rewards
    case("prefs.judge=sentiment", needles=["prefs.judge", "unknown judge 'sentiment'"]),
    case("prefs.judge=rlhf_no_such_module:score", needles=["prefs.judge", "No module named"]),
    case("prefs.judge=rlhf_bad_judge_syntax:score", needles=["prefs.judge", "SyntaxError", "line 1"]),
    case("prefs.judge=rlhf_bad_judge_const:SCORE", needles=["prefs.judge", "not a function"]),
    case("prefs.judge=rlhf_bad_judge_raises:score", needles=["needs the package vadersentiment2"]),
    case("ppo.reward=rlhf_no_such_module:score", needles=["ppo.reward", "No module named"]),
    case("ppo.reward=rlhf_no_such_module:score", stage="ppo", needles=["needs the prefs stage", "prefs CONFIG"]),
    case("ppo.reward=rm:1.0,", needles=["ppo.reward", "empty term"]),
    # models and tokenization
    case("model.policy={d}/no_config_model", needles=["model.policy", "has no config.json"]),
    case("model.policy={d}/bin_model", needles=["model.policy", "no .safetensors weights"]),
    case("model.policy=./no/such/model", needles=["model.policy", "model folder not found"]),
    case("ppo.stop_tokens=['good day']", needles=["ppo.stop_tokens", "'good day' is 2 tokens"]),
    case("data.long_prompts=drop", "data.max_prompt_tokens=8", needles=["all 629 prompts are longer"]),
    case("data.long_prompts=drop", "data.max_prompt_tokens=14",
         needles=["ppo.batch_size=32 is more than the 16 training prompts", "dropped by data.long_prompts=drop"]),
    case("data.max_train_prompts=20", needles=["ppo.batch_size=32 is more than the 20 training prompts"]),
    # preference datasets
    case("prefs.source=load", "prefs.dataset={d}/pairs_malformed.jsonl", needles=["pairs_malformed.jsonl:2"]),
    case("prefs.source=load", "prefs.dataset={d}/pairs_same.jsonl", needles=["no usable preference pairs"]),
    case("prefs.source=load", "prefs.dataset={d}/missing.jsonl", needles=["prefs.dataset", "not found"]),
    case("prefs.source=load", "prefs.dataset={d}/pairs.jsonl", "reward.use_margin=true",
         needles=["reward.use_margin", "have no margin"]),
]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Loading (or converting) any model fails the test: bad input must be refused before."""
    import rlhf.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(rlhf.models, "_from_pretrained", refuse)
    monkeypatch.setattr(rlhf.models, "convert_gguf", refuse)
    monkeypatch.setattr("rlhf.utils.keep_freed_memory", lambda: False)  # leave this process's malloc alone


@pytest.mark.parametrize("stage, overrides, needles", CASES)
def test_bad_input_is_one_line_exit_2(stage, overrides, needles, files, tmp_path, monkeypatch, capsys,
                                      no_model_loads):
    run_dir = tmp_path / "run"
    if any("read_only" in o for o in overrides):
        (files / "read_only").mkdir(exist_ok=True)
        os.chmod(files / "read_only", 0o555)
    monkeypatch.chdir(files)  # judge modules import from the working directory
    args = [o.replace("{d}", str(files)) for o in overrides]
    code = cli.main([stage, TINY, f"run.output_dir={run_dir}", "tracking.wandb=off", *args])
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlhf: error: "), err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in lines[0]
    assert not run_dir.exists()  # refused before the run directory was touched


def test_the_table_is_large_enough():
    assert len(CASES) >= 30


# ---------------------------------------------------------------------------------------------
# through a real subprocess


def rlhf(*args, cwd=PROJECT_ROOT):
    """The installed `rlhf` console script (whose path does not hold the working directory), else `python -m`;
    this worktree first on PYTHONPATH either way."""
    script = Path(sys.executable).parent / "rlhf"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "rlhf.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def one_error_line(proc, code: int = 2) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("make_args, needles", [
    (lambda d, run: [TINY, f"run.output_dir={run}", "ppo.max_grad_norm=-1"], ["ppo.max_grad_norm must be > 0"]),
    (lambda d, run: [d / "latin1.yaml", f"run.output_dir={run}"], ["latin1.yaml", "not UTF-8"]),
    (lambda d, run: [TINY, f"run.output_dir={d / 'a_file'}"], ["a_file is a file"]),
    (lambda d, run: [TINY, f"run.output_dir={run}", "prefs.judge=rlhf_bad_judge_syntax:score"], ["SyntaxError"]),
], ids=["range", "non-utf8 config", "output dir is a file", "judge syntax error (from the working directory)"])
def test_bad_input_through_the_real_cli(make_args, needles, files, tmp_path):
    run_dir = tmp_path / "run"
    line = one_error_line(rlhf("run", *make_args(files, run_dir), cwd=files))
    assert line.startswith("rlhf: error: ")
    for needle in needles:
        assert needle in line
    assert not run_dir.exists()


def test_debug_shows_the_traceback_of_a_judge_that_does_not_import(files, tmp_path):
    proc = rlhf("run", TINY, f"run.output_dir={tmp_path / 'run'}", "prefs.judge=rlhf_bad_judge_syntax:score",
                "--debug", cwd=files)
    assert proc.returncode not in (0, 2, 3)
    assert "Traceback" in proc.stderr and "rlhf_bad_judge_syntax.py" in proc.stderr


def test_nan_judge_is_a_training_fault_exit_3(tmp_path):
    """A judge that returns NaN stops the prefs stage with exit 3; no pairs are written."""
    (tmp_path / "rlhf_nan_judge.py").write_text("def score(text):\n    return float('nan')\n")
    run_dir = tmp_path / "run"
    proc = rlhf("prefs", TINY, f"run.output_dir={run_dir}", "prefs.judge=rlhf_nan_judge:score",
                "prefs.num_prompts=8", "tracking.wandb=off", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("rlhf: training fault: prefs: judge 'rlhf_nan_judge:score' returned nan")
    assert not (run_dir / "prefs" / "train.jsonl").exists() and not (run_dir / "prefs" / "_done.json").exists()
