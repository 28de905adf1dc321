"""PPO on several CPU processes through `accelerate launch` with the shipped engine configs (gloo).

Each launch starts real processes (the tests assert two); `kill -9` of a 2-process run and the same
command again reach the metrics and weights of an uninterrupted 2-process run.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from distributed_launch import PROJECT_ROOT, cpu_launch, free_port
from rlhf.config import load_config
from rlhf.distributed import describe, single_process_warning
from rlhf.pipeline import work_dir
from rlhf.utils import read_jsonl

TINY = str(PROJECT_ROOT / "configs" / "tiny.yaml")
BASE = ["tracking.wandb=off", "run.device=cpu", "ppo.reward=keyword:good"]
PPO = ["ppo.num_updates=6", "ppo.save_every=2", "ppo.batch_size=16", "ppo.mini_batch_size=8"]
# the engine comparisons train a LoRA policy (adapters drawn at random, a merged sampling copy) and a full critic
LORA = ("ppo.lora=true",)


@pytest.fixture(scope="module")
def upstream(finished_reward_stage):
    """A finished prefs and reward stage of the tiny config (one process), copied by each test."""
    return finished_reward_stage(*BASE, *PPO, "prefs.num_prompts=64", "reward.epochs=1")


def ppo_command(engine: str, run_dir: Path, tmp_path: Path, command: str = "ppo", extra: tuple[str, ...] = (),
                **launch) -> tuple[list[str], dict[str, str], list[str]]:
    overrides = [f"run.output_dir={run_dir}", *BASE, *PPO, "prefs.num_prompts=64", "reward.epochs=1", *extra]
    argv, env = cpu_launch(engine, ["-m", "rlhf.cli", command, TINY, *overrides], tmp_path, **launch)
    return argv, env, overrides


def run(argv, env, timeout=600) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def copy_run(upstream: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(upstream, dest)
    return dest


def kill_all(marker: str) -> None:
    """SIGKILL every process whose command line holds `marker`, as `pkill -9 -f` would."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass  # gone meanwhile


@pytest.fixture(scope="module")
def ddp_run(upstream, tmp_path_factory):
    """An uninterrupted 2-process DDP PPO run: what every engine and every resumed run is compared with."""
    run_dir = copy_run(upstream, tmp_path_factory.mktemp("ddp") / "run")
    argv, env, _ = ppo_command("ddp", run_dir, run_dir.parent, extra=LORA)
    proc = run(argv, env)
    assert "ppo: DDP, 2 processes on 1 machine (cpu, float32)" in proc.stderr
    rows = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # one writer
    assert {r["dist/num_processes"] for r in rows} == {2}
    return run_dir


def kill_and_resume(engine: str, run_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """Launch a 2-process PPO run, `kill -9` every process of it after the step-2 checkpoint, then launch the
    same command again; returns the second launch."""
    argv, env, overrides = ppo_command(engine, run_dir, tmp_path, extra=LORA)
    work = work_dir(load_config(TINY, overrides), run_dir, "ppo")
    killed = subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if (work / "metrics.jsonl").exists() and len(read_jsonl(work / "metrics.jsonl")) >= 3:
            break
        time.sleep(0.1)
    kill_all(str(run_dir))  # the launcher and every worker: torch's elastic agent starts them in sessions of their own
    killed.wait()
    assert not (run_dir / "ppo").exists(), "the run finished before it was killed"
    assert (work / "checkpoints" / "step_00002").is_dir()
    proc = run(argv, env)
    assert "resuming PPO from" in proc.stderr
    return proc


def assert_same_run(run_dir: Path, reference: Path, weights_atol: float = 1e-6) -> None:
    """The metrics (to 1e-5) and final policy weights of two 2-process PPO runs agree."""
    rows, expected = read_jsonl(run_dir / "ppo" / "metrics.jsonl"), read_jsonl(reference / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [r["step"] for r in expected] == [1, 2, 3, 4, 5, 6]
    assert {r["dist/num_processes"] for r in rows} == {2}
    for row, ref in zip(rows, expected):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "policy/approxkl_avg",
                    "policy/grad_norm_avg"):
            assert row[key] == pytest.approx(ref[key], abs=1e-5), (ref["step"], key)
    final = load_file(str(run_dir / "ppo" / "policy" / "model.safetensors"))
    final_ref = load_file(str(reference / "ppo" / "policy" / "model.safetensors"))
    assert final.keys() == final_ref.keys()
    for name in final_ref:
        torch.testing.assert_close(final[name], final_ref[name], atol=weights_atol, rtol=0)


def test_ddp_exact_resume_after_kill(upstream, ddp_run, tmp_path):
    run_dir = copy_run(upstream, tmp_path / "run")
    kill_and_resume("ddp", run_dir, tmp_path)
    assert_same_run(run_dir, ddp_run)


needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install -e '.[deepspeed]')")


@pytest.mark.parametrize("engine, name", [("fsdp2", "FSDP2"), pytest.param("zero2", "DeepSpeed ZeRO-2",
                                                                            marks=needs_deepspeed)])
def test_sharding_engine_resumes_exactly_and_matches_ddp(engine, name, upstream, ddp_run, tmp_path):
    """Killed and resumed under FSDP2 / ZeRO-2 (checkpoints sharded by the engine), the run reaches what the
    uninterrupted DDP run reached, up to the order of the sums over processes."""
    run_dir = copy_run(upstream, tmp_path / "run")
    proc = kill_and_resume(engine, run_dir, tmp_path)
    assert f"ppo: {name}, 2 processes on 1 machine (cpu, float32)" in proc.stderr
    checkpoint = run_dir / "ppo" / "checkpoints" / "step_00006"
    assert json.loads((checkpoint / "trainer_state.json").read_text())["engine"] == engine
    shards = [p.name for p in (checkpoint / "engine").rglob("*") if p.is_file()]
    if engine == "fsdp2":  # torch.distributed.checkpoint: one file per process for the weights and the optimiser
        assert sum(n.endswith(".distcp") for n in shards) == 4, shards
    else:  # each process's partition of the optimiser state
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(shards)
    assert_same_run(run_dir, ddp_run, weights_atol=1e-5)


@needs_deepspeed
def test_zero3_matches_ddp(upstream, ddp_run, tmp_path):
    """ZeRO-3 partitions the weights (sampling from a copy refreshed from the gathered ones) and trains what DDP
    trains."""
    run_dir = copy_run(upstream, tmp_path / "run")
    argv, env, _ = ppo_command("zero3", run_dir, tmp_path, extra=LORA)
    proc = run(argv, env)
    assert "ppo: DeepSpeed ZeRO-3, 2 processes on 1 machine (cpu, float32)" in proc.stderr
    assert_same_run(run_dir, ddp_run, weights_atol=1e-5)


def test_two_machines_on_localhost(upstream, tmp_path):
    """`--num_machines 2 --machine_rank 0/1` with one process each: one DDP run over two "machines", `rlhf run`
    from the finished reward stage on: PPO on both, the evaluation on the main process alone."""
    run_dir = copy_run(upstream, tmp_path / "run")
    port = free_port()
    launches = []
    for rank in (0, 1):
        argv, env, _ = ppo_command("ddp", run_dir, tmp_path, "run", ("eval.num_prompts=16", "eval.best_of_n=[1,2]"),
                                   num_processes=2, num_machines=2, machine_rank=rank, port=port)
        argv[argv.index("ppo.num_updates=6")] = "ppo.num_updates=2"
        launches.append(subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600) for p in launches]
    for p, (_, err) in zip(launches, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "ppo: DDP, 2 processes on 2 machines (cpu, float32)" in outputs[0][1]
    rows = read_jsonl(run_dir / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2] and {r["dist/num_processes"] for r in rows} == {2}
    assert len(read_jsonl(run_dir / "eval" / "generations.jsonl")) == 16  # written once
    assert (run_dir / "eval" / "metrics.json").is_file() and not (run_dir / ".partial" / "eval").exists()


def fake_accelerator(kind: str, processes: int):
    return SimpleNamespace(distributed_type=SimpleNamespace(name=kind), num_processes=processes,
                           device=torch.device("cpu"), state=SimpleNamespace())


def test_describe_names_engine_processes_and_machines(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert describe(fake_accelerator("NO", 1), "ppo", torch.bfloat16) == "ppo: 1 process on 1 machine (cpu, bfloat16)"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert describe(fake_accelerator("MULTI_GPU", 8), "reward", torch.float32).startswith(
        "reward: DDP, 8 processes on 2 machines")


def test_a_cpu_launch_of_one_process_is_warned_about(monkeypatch):
    """`accelerate launch --cpu --num_processes 2` starts one process without an error: the stage says so."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert "single process" in single_process_warning(fake_accelerator("NO", 1))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert single_process_warning(fake_accelerator("MULTI_CPU", 2)) is None
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    monkeypatch.delenv("WORLD_SIZE")
    assert single_process_warning(fake_accelerator("NO", 1)) is None  # a plain `rlhf ppo`


@pytest.fixture(scope="module")
def reward_launch(upstream, tmp_path_factory):
    """A function: engine -> (run directory, stderr) of the reward stage on 2 CPU processes under that engine, from a
    copy of `upstream`; launched once per engine and module."""
    launched = {}

    def launch(engine: str) -> tuple[Path, str]:
        if engine not in launched:
            tmp = tmp_path_factory.mktemp(f"reward-{engine}")
            run_dir = copy_run(upstream, tmp / "run")
            overrides = [f"run.output_dir={run_dir}", *BASE, *PPO, "prefs.num_prompts=64", "reward.epochs=1"]
            argv, env = cpu_launch(engine, ["-m", "rlhf.cli", "reward", TINY, *overrides, "--force"], tmp)
            launched[engine] = run_dir, run(argv, env).stderr
        return launched[engine]

    return launch


def reward_results(run_dir: Path) -> tuple[dict, list[int], dict[str, torch.Tensor]]:
    """The reward stage's metrics.json, the steps of its metrics.jsonl rows and its saved weights."""
    metrics = json.loads((run_dir / "reward" / "metrics.json").read_text())
    steps = [r["step"] for r in read_jsonl(run_dir / "reward" / "metrics.jsonl")]
    return metrics, steps, load_file(str(run_dir / "reward" / "model" / "model.safetensors"))


def test_reward_stage_on_two_processes(upstream, reward_launch):
    """TRL's RewardTrainer under DDP: each process takes half of every batch of reward.batch_size, one writes."""
    run_dir, stderr = reward_launch("ddp")
    assert "reward: DDP, 2 processes on 1 machine (cpu, float32)" in stderr
    two, logged, _ = reward_results(run_dir)
    one, one_logged, _ = reward_results(upstream)
    assert logged == one_logged  # one writer, same steps
    assert two["train_pairs"] == one["train_pairs"]
    # the same global batches in the same order; only the loss's per-process averaging differs
    assert two["test_accuracy"] == pytest.approx(one["test_accuracy"], abs=0.05)


@pytest.mark.parametrize("engine, name", [("fsdp2", "FSDP2"),
                                          pytest.param("zero2", "DeepSpeed ZeRO-2", marks=needs_deepspeed),
                                          pytest.param("zero3", "DeepSpeed ZeRO-3", marks=needs_deepspeed)])
def test_reward_stage_under_each_engine(engine, name, reward_launch):
    """TRL's RewardTrainer under FSDP2 and ZeRO-2/3 trains what it trains under DDP: the same metrics and saved weights
    as the DDP run of 2 processes, up to the order of the reductions, and one plain model folder (the weights that
    FSDP2 and ZeRO-3 shard are gathered), as `load_scorer` reads it.

    Tolerance 1e-5: these 4 steps differ from DDP by at most 3e-7 in a weight and 2.4e-7 in the reference score mean
    (ZeRO-3; FSDP2 and ZeRO-2 by 4e-9 and 8e-9), while one process and two, whose losses average differently,
    differ by 7e-3 in a weight and 5e-2 in that mean."""
    from reward_models.model import load_scorer

    run_dir, stderr = reward_launch(engine)
    ddp_dir, _ = reward_launch("ddp")
    assert f"reward: {name}, 2 processes on 1 machine (cpu, float32)" in stderr
    metrics, logged, weights = reward_results(run_dir)
    ddp_metrics, ddp_logged, ddp_weights = reward_results(ddp_dir)
    assert logged == ddp_logged  # one writer, same steps
    for key in ("train_pairs", "test_pairs", "test_accuracy", "test_gold_accuracy", "reference_samples"):
        assert metrics[key] == ddp_metrics[key], key
    for key in ("reference_raw_mean", "reference_raw_std", "test_spearman_gold"):
        assert metrics[key] == pytest.approx(ddp_metrics[key], abs=1e-5), key
    assert weights.keys() == ddp_weights.keys()
    for key in ddp_weights:
        torch.testing.assert_close(weights[key], ddp_weights[key], atol=1e-5, rtol=0)
    cfg = load_config(TINY, [f"run.output_dir={run_dir}", *BASE])
    pairs = read_jsonl(run_dir / "prefs" / "test.jsonl")
    prompts, responses = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    scores = load_scorer(run_dir / "reward" / "model", cfg, "cpu", torch.float32)(prompts, responses)
    ddp_scores = load_scorer(ddp_dir / "reward" / "model", cfg, "cpu", torch.float32)(prompts, responses)
    torch.testing.assert_close(scores, ddp_scores, atol=1e-5, rtol=0)


def test_each_process_gets_its_own_random_streams_back(tmp_path, capsys):
    """A checkpoint holds every process's streams; each process restores its own; saved by another number of
    processes, none is restored and a warning says the run no longer matches an uninterrupted one."""
    from rlhf.checkpoints import load_checkpoint, save_checkpoint
    from rlhf.distributed import rng_state
    from rlhf.ppo_core import FixedKLController

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    streams = []
    for process in range(2):  # two processes' streams, as gather_rng_states returns them
        torch.manual_seed(100 + process)
        streams.append(rng_state())
    path = save_checkpoint(tmp_path, model, optimizer, scheduler, FixedKLController(0.1), 3, "fp", streams)
    for process in (1, 0):
        torch.manual_seed(0)
        load_checkpoint(path, model, optimizer, scheduler, FixedKLController(0.1), process, 2)
        torch.manual_seed(100 + process)
        expected = torch.rand(3)
        load_checkpoint(path, model, optimizer, scheduler, FixedKLController(0.1), process, 2)
        assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    load_checkpoint(path, model, optimizer, scheduler, FixedKLController(0.1), 0, 1)
    assert torch.equal(torch.get_rng_state(), before)
    assert "saved by 2 processes and is resumed by 1" in capsys.readouterr().err


def test_a_checkpoint_split_by_an_engine_resumes_only_under_that_engine(tmp_path):
    """FSDP2 / ZeRO checkpoints hold each process's part: resumed by another engine or number of processes, the
    stage stops with one line saying how it was written, before reading any of it."""
    from rlhf.checkpoints import load_checkpoint, save_checkpoint, write_checkpoint_files
    from rlhf.distributed import rng_state
    from rlhf.ppo_core import FixedKLController
    from rlhf.utils import UserError

    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    plain = save_checkpoint(tmp_path / "plain", model, optimizer, scheduler, FixedKLController(0.1), 2, "fp",
                            [rng_state()])
    with pytest.raises(UserError, match="written by single on 1 processes; this launch is fsdp2 on 2"):
        load_checkpoint(plain, model, optimizer, scheduler, FixedKLController(0.1), 0, 2, fake_accelerator("FSDP", 2))
    split = tmp_path / "split"
    split.mkdir()
    write_checkpoint_files(split, {}, None, scheduler, FixedKLController(0.1), 2, "fp", [rng_state()] * 2, "fsdp2")
    with pytest.raises(UserError, match="written by fsdp2 on 2 processes; this launch is ddp on 2"):
        load_checkpoint(split, model, optimizer, scheduler, FixedKLController(0.1), 0, 2,
                        fake_accelerator("MULTI_CPU", 2))
