"""Several processes: what one needs from the others, and how a run says how it runs.

Statistics across processes (the `reduce=` hook of `ppo_core`, means of logged metrics), each
process's own random streams for exact resume, and the one line naming the engine, processes and
machines. With one process every function here is the plain local computation (no collective).
"""

from __future__ import annotations

import ast
import os
import random
from typing import Any, Callable

import torch


def sum_over_processes(accelerator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A `reduce=` hook for `ppo_core` (tensor -> its sum over every process), or None with one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.reduce(t, reduction="sum")


def global_mean(value: torch.Tensor | float, accelerator) -> float:
    """The mean of a per-process scalar over every process."""
    t = torch.as_tensor(value, dtype=torch.float32, device=accelerator.device)
    return (accelerator.reduce(t, reduction="mean") if accelerator.num_processes > 1 else t).item()


def gather_over_processes(accelerator):
    """`accelerator.gather` when there are several processes (for checks that must agree), else None."""
    return accelerator.gather if accelerator.num_processes > 1 else None


# ---------------------------------------------------------------------------------------------
# random streams: each process draws its own (seed + process index); a checkpoint keeps every one


def rng_state() -> dict[str, Any]:
    """This process's random streams: torch's CPU generator, the CUDA one when CUDA is in use, and Python's."""
    state = {"torch": torch.get_rng_state(), "python": repr(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # the GPU's stream: sampling on cuda
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def gather_rng_states(accelerator) -> list[dict[str, Any]]:
    """Every process's `rng_state()`, in process order (a collective: all processes call it)."""
    if accelerator.num_processes == 1:
        return [rng_state()]
    from accelerate.utils import gather_object  # accelerate: see rlhf.ppo.start_processes

    return gather_object([rng_state()])


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------
# how the run runs


def num_machines() -> int:
    """Machines of this launch: the world size over the processes per machine (torchrun and accelerate set both)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return max(1, world // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))))


def describe(accelerator, stage: str, dtype: torch.dtype) -> str:
    """One line: the engine, the number of processes and machines, the device and dtype."""
    engine = {"NO": "", "MULTI_CPU": "DDP", "MULTI_GPU": "DDP", "FSDP": "FSDP2", "DEEPSPEED": "DeepSpeed"}
    name = engine.get(accelerator.distributed_type.name, accelerator.distributed_type.name)
    if name == "DeepSpeed":
        name += f" ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    if name == "FSDP2" and getattr(accelerator.state.fsdp_plugin, "fsdp_version", 2) == 1:
        name = "FSDP"
    n, machines = accelerator.num_processes, num_machines()
    return (f"{stage}: {name + ', ' if name else ''}{n} process{'es' if n > 1 else ''} on {machines} "
            f"machine{'s' if machines > 1 else ''} ({accelerator.device.type}, {str(dtype).replace('torch.', '')})")


def single_process_warning(accelerator) -> str | None:
    """A warning for a launch that asked accelerate for the CPU and got one process: `accelerate launch --cpu`
    (or a MULTI_CPU config) starts a single process whatever `--num_processes` says, without an error."""
    launched_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1", "yes")
    if accelerator.num_processes == 1 and launched_cpu and "WORLD_SIZE" not in os.environ:
        return ("one process: `accelerate launch --cpu` (or a MULTI_CPU config) starts a single process whatever "
                "--num_processes says; for N processes on the CPU launch with ACCELERATE_USE_CPU=1 and "
                "--multi_gpu --num_processes N (README, Several processes)")
    return None
