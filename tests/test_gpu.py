"""The CUDA paths, on the tiny models: padding invariance, the whole pipeline in bf16, exact resume.

Skipped where no CUDA device is visible (every CPU machine, CI included); `benchmarks/gpu_check.sh`
runs them on a GPU machine: `python -m pytest -q -m gpu`.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = PROJECT_ROOT / "configs" / "tiny.yaml"
CUDA = ["run.device=cuda", "tracking.wandb=off"]


def tiny_cfg(run_dir, *overrides):
    from rlhf.config import load_config

    return load_config(TINY, [f"run.output_dir={run_dir}", *CUDA, *overrides])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_padding_invariance_on_cuda(name):
    """A response's logprobs and values do not depend on its batch's left padding (detail 1), on the GPU."""
    from rlhf.generation import left_pad
    from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.prompts import encode_prompts
    from rlhf.ppo_models import PolicyAndValue, Sequences
    from rlhf.rollout import forward_tokens

    tok = load_tokenizer("tiny-llama")
    model = PolicyAndValue(load_causal_lm(name), load_reward_model(name)).cuda().eval()
    short, long = encode_prompts(["write a good story", "tell me about the weather in the city today and the "
                                  "food and the music and the park"], tok, max_tokens=256).input_ids
    responses = torch.randint(8, len(tok), (2, 6), generator=torch.Generator().manual_seed(0)).cuda()
    ones = torch.ones(2, 6, dtype=torch.long, device="cuda")

    def run(prompts, rows):
        queries, qmask = left_pad(prompts, tok.pad_token_id, "cuda")
        seqs = Sequences.join(queries, qmask, responses[:rows], ones[:rows])
        return forward_tokens(model, seqs, responses[:rows], 1.0, 4)[:2]

    (lp1, v1), (lp2, v2) = run([short], 1), run([short, long], 2)
    torch.testing.assert_close(lp1[0], lp2[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(v1[0], v2[0], atol=1e-4, rtol=0)


def test_tiny_pipeline_in_bf16_on_cuda(tmp_path):
    """All four stages on the GPU with bf16 autocast: the policy learns the keyword, every figure finite."""
    from rlhf.pipeline import run_pipeline

    torch.cuda.reset_peak_memory_stats()
    run_dir = tmp_path / "run"
    run_pipeline(tiny_cfg(run_dir, "model.dtype=bfloat16"))
    assert torch.cuda.max_memory_allocated() > 0  # the models did run on the GPU
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert metrics["policy_gold"] > metrics["ref_gold"] + 0.5, metrics
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "policy")  # a plain HF folder, loadable anywhere


def test_resume_on_cuda_reaches_the_same_result(tmp_path, killed_at_update):
    """A PPO run killed after its step-3 checkpoint and restarted matches the uninterrupted run: the CUDA
    RNG (sampling) is saved and restored with the CPU one."""
    from rlhf.pipeline import run_pipeline
    from rlhf.utils import read_jsonl

    overrides = ["ppo.reward=keyword:good", "ppo.num_updates=6", "ppo.save_every=3", "prefs.num_prompts=96",
                 "reward.epochs=1"]
    up = tmp_path / "up"
    cfg = tiny_cfg(up, *overrides)
    run_pipeline(cfg, only="prefs")
    run_pipeline(cfg, only="reward")
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(up, dir_a)
    shutil.copytree(up, dir_b)
    run_pipeline(tiny_cfg(dir_a, *overrides), only="ppo")

    with killed_at_update(5):
        run_pipeline(tiny_cfg(dir_b, *overrides), only="ppo")
    run_pipeline(tiny_cfg(dir_b, *overrides), only="ppo")

    rows_a = read_jsonl(dir_a / "ppo" / "metrics.jsonl")
    rows_b = read_jsonl(dir_b / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
            assert rb[key] == pytest.approx(ra[key], abs=1e-4), (ra["step"], key)
    samples_a = read_jsonl(dir_a / "ppo" / "samples.jsonl")
    samples_b = read_jsonl(dir_b / "ppo" / "samples.jsonl")
    assert [s["response"] for s in samples_b] == [s["response"] for s in samples_a]
