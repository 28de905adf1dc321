"""The shipped engine configs (configs/accelerate/) as accelerate itself reads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

PROJECT_ROOT = Path(__file__).resolve().parent.parent

CONFIGS = PROJECT_ROOT / "configs" / "accelerate"


@pytest.mark.parametrize("name, engine, precision", [
    ("ddp", DistributedType.MULTI_GPU, "bf16"),
    ("fsdp2", DistributedType.FSDP, "bf16"),
    # accelerate refuses mixed_precision next to a DeepSpeed file: bf16 is set there ("auto")
    ("zero2", DistributedType.DEEPSPEED, None),
    ("zero3", DistributedType.DEEPSPEED, None),
])
def test_engine_processes_and_precision(name, engine, precision):
    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert config.distributed_type == engine
    assert (config.num_processes, config.num_machines, config.machine_rank) == (8, 1, 0)
    assert config.mixed_precision == precision
    assert not config.use_cpu


def test_fsdp2_wraps_decoder_layers_and_saves_shards():
    fsdp = load_config_from_file(str(CONFIGS / "fsdp2.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "SHARDED_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is False  # the frozen models are loaded outside FSDP


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json_has_the_stage_and_leaves_sizes_to_the_run(stage):
    ds = load_config_from_file(str(CONFIGS / f"zero{stage}.yaml")).deepspeed_config
    path = PROJECT_ROOT / ds["deepspeed_config_file"]  # relative to the project root, where launches start
    settings = json.loads(path.read_text())
    assert settings["zero_optimization"]["stage"] == stage
    # fixed numbers here would override the run's config (accelerate prefers DeepSpeed's values)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert settings[key] == "auto", key
    assert settings["bf16"]["enabled"] == "auto"
