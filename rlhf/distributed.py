"""Several processes: what one needs from the others, and how a run says how it runs.

Statistics across processes (the `reduce=` hook of `ppo_core`, means of logged metrics), each
process's own random streams for exact resume, the engines (`accelerate launch` with DDP, FSDP2 or
DeepSpeed ZeRO-2/3: what each needs on the CPU, and the full weights of a sharded model when they are
read whole), and the one line naming the engine, processes and machines. With one process every function
here is the plain local computation (no collective).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import os
import random
from datetime import timedelta
from typing import Any, Callable, Iterator

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
# engines


def quiet_deepspeed_on_cpu() -> None:
    """Tell DeepSpeed, when it is installed, that a machine without a GPU runs on the CPU (DS_ACCELERATOR=cpu),
    unless the environment already names its accelerator. accelerate imports DeepSpeed whenever it is installed,
    and DeepSpeed would otherwise find the CPU by itself and say so on stdout (the output of `rlhf bench --json`)."""
    gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    if "DS_ACCELERATOR" not in os.environ and not gpu and importlib.util.find_spec("deepspeed") is not None:
        os.environ["DS_ACCELERATOR"] = "cpu"


def launched_processes() -> int:
    """The processes of this launch (`torchrun` and `accelerate launch` set WORLD_SIZE), 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group_settings(cpu: bool) -> dict[str, Any]:
    """How the processes of a launch join their group (`PartialState(**...)`, `InitProcessGroupKwargs(**...)`):
    gloo on the CPU (DeepSpeed would otherwise ask for its ccl backend, not installable from PyPI), and a long
    timeout, since the others wait while the main process alone builds preference pairs or evaluates."""
    settings: dict[str, Any] = {"timeout": timedelta(hours=24)}
    if cpu:
        settings["backend"] = "gloo"
    return settings


def join_process_group(cpu: bool):
    """This process's `PartialState`, joined to the launch's group (when there are several processes) with
    `process_group_settings`. The first call decides: later `Accelerator`s share it."""
    from accelerate import PartialState  # accelerate: see start_accelerator

    settings = process_group_settings(cpu) if launched_processes() > 1 else {}
    # DeepSpeed runs on the CPU through its own CPU accelerator (DS_ACCELERATOR=cpu), not accelerate's `cpu=True`
    return PartialState(cpu=cpu and not deepspeed_launch(), **settings)


def start_accelerator(cpu: bool, **kwargs):
    """The stage's `Accelerator` for whatever `accelerate launch` asked for, also on the CPU (`complete_engine`)."""
    from accelerate import Accelerator  # accelerate takes ~1 s to import: training stages only
    from accelerate.utils import InitProcessGroupKwargs

    join_process_group(cpu)
    handlers = [InitProcessGroupKwargs(**process_group_settings(cpu))] if launched_processes() > 1 else []
    accelerator = Accelerator(cpu=cpu and not deepspeed_launch(), kwargs_handlers=handlers, **kwargs)
    complete_engine(accelerator)
    return accelerator


def deepspeed_launch() -> bool:
    """Whether `accelerate launch` asked for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


def engine(accelerator) -> str:
    """"single", "ddp", "fsdp2", "zero2" or "zero3": what runs the trained weights."""
    kind = accelerator.distributed_type.name
    if kind == "FSDP":
        return "fsdp2"
    if kind == "DEEPSPEED":
        return f"zero{accelerator.state.deepspeed_plugin.zero_stage}"
    return "ddp" if accelerator.num_processes > 1 else "single"


def shards_weights(accelerator) -> bool:
    """Whether each process holds only a shard of the trained weights between forwards (FSDP2, ZeRO-3)."""
    return engine(accelerator) in ("fsdp2", "zero3")


# engines that split the trained weights' or optimiser's state over the processes: a checkpoint is then written
# by every process through the engine (`accelerator.save_state`)
SPLIT_ENGINES = ("fsdp2", "zero2", "zero3")


def engine_checkpoints(accelerator) -> bool:
    return engine(accelerator) in SPLIT_ENGINES


def configure_deepspeed(accelerator, micro_batch_size: int, max_grad_norm: float) -> None:
    """The DeepSpeed settings a run fixes and no DataLoader can tell it: the micro-batch per process, and the
    gradient clipping (DeepSpeed clips inside its step)."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_clipping"] = max_grad_norm


def broadcast_trained_weights(accelerator, module: torch.nn.Module) -> None:
    """Give every process the main process's trainable weights before an engine wraps them. Fresh weights (LoRA's
    A matrices, drawn from each process's own random stream) differ between processes; DDP and DeepSpeed
    broadcast them when they wrap a model, FSDP2 shards each process's own copy and would train a mix."""
    if accelerator.num_processes > 1:
        with torch.no_grad():
            for param in module.parameters():
                if param.requires_grad:
                    torch.distributed.broadcast(param.data, src=0)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this process holds: its shard under FSDP2 (a DTensor) or ZeRO-3, else itself."""
    if hasattr(param, "ds_tensor"):  # ZeRO-3 pads the last partitions to equal sizes: the padding is not weights
        shard = param.ds_tensor.reshape(-1)
        offset = shard.numel() * torch.distributed.get_rank(group=param.ds_process_group)
        return shard[:max(0, min(shard.numel(), param.ds_numel - offset))]
    return param.to_local() if hasattr(param, "to_local") else param


@contextlib.contextmanager
def full_weights(accelerator, model: torch.nn.Module, part: torch.nn.Module | None = None) -> Iterator[None]:
    """The weights of `part` of the engine-wrapped `model` (all of it by default) whole on every process inside
    the block; a collective: all processes enter it. FSDP2 unshards the groups of `part` and the root group
    (`model`'s own weights, e.g. embeddings), ZeRO-3 gathers the partitions of `part`; other engines hold the
    weights whole already. Costs one all-gather and, while the block lasts, their full size in memory."""
    kind, part = engine(accelerator), part if part is not None else model
    if kind == "fsdp2":
        from torch.distributed.fsdp import FSDPModule

        inside = {id(m) for m in part.modules()}
        groups = [m for m in model.modules() if isinstance(m, FSDPModule) and (m is model or id(m) in inside)]
        for group in groups:
            group.unshard()
        try:
            yield
        finally:
            for group in groups:
                group.reshard()
    elif kind == "zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(part.parameters()), modifier_rank=None):
            yield
    else:
        yield


def whole_copy(accelerator, model: torch.nn.Module, part: torch.nn.Module, build: Callable[[], torch.nn.Module]):
    """`part` of the engine-wrapped `model` as a module whole in the main process (None in the others; every process
    calls it): `part` itself where the engine keeps the weights whole, else `build()` (the same architecture, built
    afresh) with the gathered weights copied in by name; for the main process to save or evaluate."""
    if not shards_weights(accelerator):
        return part if accelerator.is_main_process else None
    copy = None
    with full_weights(accelerator, model, part):
        if accelerator.is_main_process:
            copy = build()
            weights = {name: param.detach() for name, param in part.named_parameters()}
            expected = {name for name, _ in copy.named_parameters()}
            if set(weights) != expected:
                raise RuntimeError(f"the trained weights are not those of the model built to hold them: "
                                   f"{sorted(set(weights) ^ expected)[:3]}")
            copy.load_state_dict(weights, strict=False)  # parameters only: the buffers are the copy's own
    accelerator.wait_for_everyone()
    return copy


def complete_engine(accelerator) -> None:
    """What accelerate leaves undone of the launch's engine, done on an `Accelerator` just made (`start_accelerator`'s,
    or the one transformers' Trainer makes for itself). accelerate turns FSDP on only for accelerator devices and
    otherwise runs DDP without a word, so the FSDP launch setting (ACCELERATE_USE_FSDP) is applied here to CPU
    processes too. Under DeepSpeed without `zero3_init_flag`, models loaded afterwards stay whole."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if (os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
            and accelerator.distributed_type == DistributedType.MULTI_CPU):
        # every `AcceleratorState()` copies PartialState's type again, so both are set
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # read from the launch's FSDP_* settings
    if accelerator.distributed_type.name == "DEEPSPEED" and not accelerator.state.deepspeed_plugin.zero3_init_flag:
        # accelerate tells transformers about ZeRO-3 even with `zero3_init_flag: false`, and every model loaded
        # afterwards would come up partitioned; the frozen ones (reference, reward model, sampling copy) are never
        # wrapped by the engine and must stay whole. The engine partitions the trained ones when it wraps them.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()


# ---------------------------------------------------------------------------------------------
# how the run runs


def num_machines() -> int:
    """Machines of this launch: the world size over the processes per machine (torchrun and accelerate set both)."""
    world = launched_processes()
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
                "--num_processes says; for N processes on the CPU launch a config of configs/accelerate/ (e.g. "
                "--config_file configs/accelerate/ddp.yaml --num_processes N; README, Several processes)")
    return None
