"""`rlhf bench`: runs real PPO updates in a scratch directory and reports figures by phase."""

import json
import math


from rlhf.bench import forward_flops_per_token, matmul_peak, run_bench
from rlhf.config import load_config


def test_forward_flops_per_token_llama_by_hand():
    from transformers import LlamaConfig

    c = LlamaConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)
    # per layer: q,o 8x8 each; k,v 8x4 each; gate, up, down 8x16 each -> 64+64+32+32+3*128 = 576
    assert forward_flops_per_token(c) == 2 * 2 * 576


def test_matmul_peak_is_positive():
    assert matmul_peak("cpu", n=128, repeats=2) > 1e6


def test_bench_on_tiny_with_a_judge_reward(tmp_path, capsys):
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={tmp_path / 'run'}", "ppo.reward=keyword:good",
                                            "ppo.value_model=head"])
    out = tmp_path / "bench.json"
    result = run_bench(cfg, updates=3, json_out=str(out))
    assert result["updates_timed"] == 2  # the first update is excluded
    for key in ("seconds_per_update", "seconds_generate", "seconds_train", "generated_tokens_per_second",
                "peak_rss_gib", "train_share_of_peak", "matmul_peak_gflops"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert json.loads(out.read_text())["updates_timed"] == 2
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
