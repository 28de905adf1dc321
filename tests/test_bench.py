"""`rlhf bench`: runs real PPO updates in a scratch directory and reports figures by phase."""

import json
import math

import pytest
import torch

from rlhf import bench
from rlhf.bench import (decode_step_bytes, format_figure, forward_flops_per_token, matmul_peak, memory_bandwidth,
                        run_bench, sampling_limit)
from rlhf.config import load_config


def test_forward_flops_per_token_llama_by_hand():
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)
    # per layer: q,o 8x8 each; k,v 8x4 each; gate, up, down 8x16 each -> 64+64+32+32+3*128 = 576
    assert forward_flops_per_token(c) == 2 * 2 * 576


def test_matmul_peak_is_positive():
    assert matmul_peak("cpu", n=128, repeats=2) > 1e6


def test_memory_bandwidth_is_positive_and_finite():
    bandwidth = memory_bandwidth("cpu", mib=8, repeats=2)
    assert math.isfinite(bandwidth) and bandwidth > 1e6


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_bytes_and_sampling_limit_by_hand(tied):
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1, vocab_size=10, tie_word_embeddings=tied)
    # per layer: 576 projection weights (as above) + 2 RMSNorm weights of 8 = 592; the final norm 8; the LM head
    # 10x8 = 80, read in full, while an untied input embedding is read one row per sequence and not counted
    params = 2 * 592 + 8 + 80
    assert decode_step_bytes(c, torch.bfloat16) == 2 * params
    assert decode_step_bytes(c, torch.float32) == 4 * params
    # 2544 bytes per step at 2,544,000 bytes/s: 1000 decode steps/s, 4 rows each
    assert sampling_limit(2_544_000.0, 2 * params, rows=4) == pytest.approx(4000.0)


def test_format_figure_keeps_small_shares_readable():
    assert format_figure(0.72) == "0.720"
    assert format_figure(0.000123456) == "0.000123"
    assert format_figure(0.0) == "0.000"
    assert format_figure("bfloat16") == "bfloat16"


def test_bench_on_tiny_with_a_judge_reward(tmp_path, capsys, monkeypatch):
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path / 'run'}", "ppo.reward=keyword:good",
                                            "ppo.value_model=head", "ppo.critic_warmup_updates=2"])
    out = tmp_path / "bench.json"
    ran = []
    run_ppo = bench.run_ppo
    monkeypatch.setattr(bench, "run_ppo", lambda c, *a: ran.append(c) or run_ppo(c, *a))
    result = run_bench(cfg, updates=3, json_out=str(out))
    assert [c.ppo.critic_warmup_updates for c in ran] == [0]  # every timed update trains the policy
    assert result["updates_timed"] == 2  # the first update is excluded
    for key in ("seconds_per_update", "seconds_generate", "seconds_train", "generated_tokens_per_second",
                "peak_rss_gib", "train_share_of_peak", "matmul_peak_gflops", "dtype_matmul_peak_gflops",
                "train_share_of_dtype_peak", "forward_share_of_dtype_peak", "memory_bandwidth_gbs",
                "generate_tokens_per_second_limit", "generate_share_of_bandwidth_limit"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert result["matmul_peak_dtype"] == "float32"  # configs/tiny.yaml runs in fp32
    if result["dtype"] == "float32":  # on the CPU both shares divide by the one fp32 peak
        assert result["train_share_of_dtype_peak"] == result["train_share_of_peak"]
    assert result["generate_share_of_bandwidth_limit"] == pytest.approx(
        result["generated_tokens_per_second"] / result["generate_tokens_per_second_limit"])
    written = json.loads(out.read_text())
    assert written["updates_timed"] == 2
    assert written["generate_share_of_bandwidth_limit"] == result["generate_share_of_bandwidth_limit"]
    assert not (tmp_path / "run").exists()  # the scratch run is removed, the user's run dir untouched
    assert "PPO benchmark" in capsys.readouterr().out


def test_bench_without_a_trained_rm_times_an_untrained_one_at_fixed_length(tmp_path, capsys):
    # the side-by-side setting: RM and full-size critic from the policy backbone, fixed-length responses
    cfg = load_config("benchmarks/same_work_tiny.yaml", [f"run.output_dir={tmp_path / 'run'}", "ppo.max_new_tokens=8",
                                                         "ppo.min_new_tokens=8"])
    result = run_bench(cfg, updates=2)
    assert result["updates_timed"] == 1
    assert result["response_length"] == 8  # no response stopped early
    assert result["train_share_of_peak"] > 0
    assert "untrained" in capsys.readouterr().err
