"""Command lines that run the shipped engine configs (configs/accelerate/) as 2 processes on the CPU.

    argv, env = cpu_launch("zero2", ["-m", "rlhf.cli", "ppo", "configs/tiny.yaml"], tmp_path)
    subprocess.run(argv, env=env, check=True)

The command is the README's, `accelerate launch --config_file configs/accelerate/<engine>.yaml
--num_processes 2 ...`, unchanged on the CPU: the configs are written for GPUs (bf16, GPU ids), and
what each engine needs on CPU processes is done by the project (rlhf.distributed: gloo, FSDP turned
on for CPU processes, models loaded whole under ZeRO-3, the stage's own precision). Found by trying
each (torch 2.13 CPU, accelerate 1.15, deepspeed 0.19.8):
- ACCELERATE_USE_CPU is taken out of the environment: with it accelerate drops DeepSpeed and runs DDP
  without a word (and `accelerate launch --cpu` starts one process, `rlhf.distributed.single_process_warning`).
- The first DeepSpeed launch JIT-compiles its `deepspeed_shm_comm` op into `TORCH_EXTENSIONS_DIR`
  (about 2 minutes on 2 cores, needs a C++ compiler); later launches load it. DS_ACCELERATOR=cpu is set
  by the project on a machine without a GPU (`rlhf.distributed.quiet_deepspeed_on_cpu`).
- zero3 with tiny models: DeepSpeed keeps every parameter under `stage3_param_persistence_threshold`
  (1e5 elements by default) whole on every rank, so a tiny model would not be sharded at all; the
  launch uses a copy of zero3.json with the threshold at 0.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENGINES = ("ddp", "fsdp2", "zero2", "zero3")
# Where the DeepSpeed op is compiled once and reused by every later launch (and test session).
EXTENSIONS_DIR = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))


def free_port() -> int:
    """A TCP port nobody listens on now, so that concurrent launches do not share a rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_launch(engine: str, target: list[str], workdir: Path, num_processes: int = 2, port: int | None = None,
               num_machines: int = 1, machine_rank: int = 0) -> tuple[list[str], dict[str, str]]:
    """(argv, env) of `accelerate launch --config_file configs/accelerate/<engine>.yaml ... <target>` on the CPU.

    `target` is what follows the launcher: a script and its arguments, or `["-m", "rlhf.cli", ...]`.
    `num_processes` counts all machines; with `num_machines` > 1, run the same argv once per
    `machine_rank` (0 first) on localhost, all with the same `port`. `workdir` receives the
    ZeRO-3 config copy. Run it from the project root (the DeepSpeed JSON path in the yamls is relative).
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
    argv = [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(PROJECT_ROOT / "configs" / "accelerate" / f"{engine}.yaml"),
            "--num_processes", str(num_processes), "--num_machines", str(num_machines),
            "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port or free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TORCH_EXTENSIONS_DIR": str(EXTENSIONS_DIR)}
    env.pop("ACCELERATE_USE_CPU", None)
    if engine == "zero3":
        ds_config = json.loads((PROJECT_ROOT / "configs" / "accelerate" / "zero3.json").read_text())
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        path = Path(workdir) / "zero3_cpu.json"
        path.write_text(json.dumps(ds_config, indent=1))
        argv += ["--deepspeed_config_file", str(path)]
    return argv + list(target), env
