"""benchmarks/memory_plan.py: its parameter counts against real models, its per-GPU sums by hand."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_plan.py"
spec = importlib.util.spec_from_file_location("memory_plan", PATH)
plan = sys.modules["memory_plan"] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
spec.loader.exec_module(plan)


@pytest.mark.parametrize("arch, tied", [("qwen2", True), ("qwen2", False), ("llama", True)])
def test_counts_match_the_models_transformers_builds(arch, tied):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = plan.Shape(hidden=64, layers=2, intermediate=96, heads=4, kv_heads=2, vocab=100, tied=tied,
                       qkv_bias=arch == "qwen2")
    config = AutoConfig.for_model(arch, hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                  tie_word_embeddings=tied, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in lm.parameters()) == plan.causal_lm_params(shape)
    scorer = AutoModelForSequenceClassification.from_config(config)
    assert sum(p.numel() for p in scorer.parameters()) == plan.scorer_params(shape)
    lora = get_peft_model(lm, LoraConfig(r=4, target_modules="all-linear"))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == plan.lora_params(shape, 4)


def test_published_qwen_sizes():
    assert plan.causal_lm_params(plan.QWEN25["0.5B"]) == 494_032_768
    assert plan.causal_lm_params(plan.QWEN25["7B"]) == 7_615_616_512
    assert plan.causal_lm_params(plan.SMOLLM2_135M) == 134_515_008


# hidden 2, 1 layer, MLP 4, vocab 10, tied, no bias: a layer has 2*4 (q, o) + 2*4 (k, v) + 3*2*4 (MLP)
# + 2*2 (norms) = 44 parameters, the LM 10*2 + 44 + 2 = 66, the scorer 20 + 44 + 2 + 2 = 68, LoRA r=1
# 4*2 + 2*4 + 3*6 = 34.
SMALL = plan.Shape(hidden=2, layers=1, intermediate=4, heads=1, kv_heads=1, vocab=10, tied=True, qkv_bias=False)


def test_small_case_by_hand():
    assert (plan.causal_lm_params(SMALL), plan.scorer_params(SMALL), plan.lora_params(SMALL, 1)) == (66, 68, 34)
    ddp = plan.ppo_memory(SMALL, "DDP", lora=False, gpus=2, lora_r=1)
    assert ddp == {"policy": 16 * 66, "reference": 2 * 66, "sampler": 2 * 66, "critic": 16 * 68,
                   "reward model": 2 * 68}
    zero3 = plan.ppo_memory(SMALL, "ZeRO-3", lora=False, gpus=2, lora_r=1)
    # the trained module halves; the frozen reference, sampler and reward model are not wrapped and stay whole
    assert zero3 == {"policy": 528, "reference": 132, "sampler": 132, "critic": 544, "reward model": 136}
    assert plan.ppo_memory(SMALL, "FSDP2", lora=False, gpus=2, lora_r=1) == zero3
    # with LoRA the policy's frozen base sits inside the wrapped module: split too
    zero3_lora = plan.ppo_memory(SMALL, "ZeRO-3", lora=True, gpus=2, lora_r=1)
    assert zero3_lora["policy"] == 2 * 66 / 2 + 16 * 34 / 2
    # ZeRO-2 keeps weights whole and halves the 12 bytes of gradients + AdamW states; LoRA: no reference
    zero2_lora = plan.ppo_memory(SMALL, "ZeRO-2", lora=True, gpus=2, lora_r=1)
    assert zero2_lora == {"policy": 2 * 66 + 4 * 34 + 6 * 34, "reference": 0, "sampler": 132,
                          "critic": 4 * 68 + 6 * 68, "reward model": 2 * 68}


def test_table_lists_every_size_and_engine():
    text = plan.table(gpus=8)
    assert text.splitlines()[0] == "| model (params) | policy training | DDP | ZeRO-2 | ZeRO-3 | FSDP2 |"
    assert len(text.splitlines()) == 2 + 2 * len(plan.QWEN25)
    assert "| Qwen2.5-7B (7.62B) | full | 260.4 | 116.8 | 68.9 | 68.9 |" in text
