"""A few AdamW steps of a 2-layer Llama under whatever `accelerate launch` set up, then a saved state.

    accelerate launch ... tests/distributed_probe.py OUT_DIR

Each rank writes OUT_DIR/rank<k>.json: the engine and world size accelerate reports, the loss after
each step (averaged over ranks), the parameter elements this rank holds (smaller than the model's
under ZeRO-3 and FSDP2) and the files `save_state` wrote. Used to check a launch command really
starts N processes that train one model together (tests/distributed_launch.py builds the commands).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs
from transformers import LlamaConfig, LlamaForCausalLM


def local_elements(param: torch.Tensor) -> int:
    """Elements of `param` held on this rank between steps: its shard under FSDP2 (DTensor); under
    ZeRO-3 its shard plus the full copy DeepSpeed keeps of parameters below the persistence threshold."""
    if hasattr(param, "ds_tensor"):
        return param.ds_tensor.numel() + param.data.numel()
    return param.to_local().numel() if hasattr(param, "to_local") else param.numel()


def enable_fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Turn FSDP on when the launcher asked for it and the processes run on the CPU.

    accelerate enables FSDP only for accelerator devices; on the CPU it falls back to DDP without a word.
    Every `AcceleratorState()` copies PartialState's type again, so both are set.
    """
    if os.environ.get("ACCELERATE_USE_FSDP") == "true" and accelerator.distributed_type == DistributedType.MULTI_CPU:
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def main(out: Path) -> None:
    # gloo explicitly: DeepSpeed on the CPU otherwise asks for its own (uninstallable) ccl backend
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    enable_fsdp_on_cpu(accelerator)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # no DataLoader is prepared, so DeepSpeed cannot infer its micro-batch
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 2
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    generator = torch.Generator().manual_seed(1 + accelerator.process_index)
    losses = []
    for _ in range(3):
        ids = torch.randint(0, 64, (2, 8), generator=generator).to(accelerator.device)
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(accelerator.reduce(loss.detach(), "mean").item())
    start = time.perf_counter()
    accelerator.save_state(str(out / "state"))
    accelerator.wait_for_everyone()
    record = {
        "distributed_type": str(accelerator.distributed_type),
        "num_processes": accelerator.num_processes,
        "process_index": accelerator.process_index,
        "backend": accelerator.state.backend,
        "losses": losses,
        "local_param_elements": sum(local_elements(p) for p in model.parameters()),
        "model_param_elements": sum(p.numel() for p in LlamaForCausalLM(config).parameters()),
        "save_seconds": round(time.perf_counter() - start, 2),
        "saved": sorted(str(p.relative_to(out)) for p in (out / "state").rglob("*") if p.is_file()),
    }
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(record, indent=1))
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
