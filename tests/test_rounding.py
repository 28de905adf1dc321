"""Copies of trained fp32 weights in bf16 (PPO's sampler, the merged LoRA policy, eval's policy) keep small
updates: stochastic rounding, where round-to-nearest drops every change under half a bf16 step."""

from __future__ import annotations

import copy

import pytest
import torch

from rlhf.config import PPOConfig, load_config
from rlhf.models import load_causal_lm, round_stochastic
from rlhf.ppo_models import add_lora, lora_merged_weights, merge_lora, rounding_generator, sync_sampler


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_stochastic_lands_on_a_neighbour_with_unbiased_odds(dtype):
    g = torch.Generator().manual_seed(0)
    low = torch.linspace(-3, 3, 501).to(dtype)
    high = torch.nextafter(low, torch.full_like(low, float("inf")))
    frac = torch.rand(low.shape, generator=g)
    x = low.float() + frac * (high.float() - low.float())
    draws = torch.stack([round_stochastic(x, dtype, g) for _ in range(400)])
    assert draws.dtype == dtype and ((draws == low) | (draws == high)).all()
    p_high = (draws == high).float().mean(0)
    assert (p_high - frac).abs().max() < 0.1  # 400 draws: sd at most 0.025
    bias = (draws.float().mean(0) - x) / (high.float() - low.float())
    assert bias.mean().abs() < 0.01
    # values the dtype holds come back as they are; widening is exact
    assert torch.equal(round_stochastic(low.float(), dtype, g), low)
    assert torch.equal(round_stochastic(low, torch.float32, g), low.float())


def test_round_stochastic_is_reproducible_from_its_generator():
    x = torch.randn(1000)
    a = round_stochastic(x, torch.bfloat16, torch.Generator().manual_seed(3))
    b = round_stochastic(x, torch.bfloat16, torch.Generator().manual_seed(3))
    c = round_stochastic(x, torch.bfloat16, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def kept(copies: dict[str, torch.Tensor], base: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> float:
    """The share of the update `delta` that the narrowed copies hold, measured along the update."""
    num = sum(((copies[k].double() - base[k].double()) * delta[k].double()).sum() for k in delta)
    return (num / sum((delta[k].double() ** 2).sum() for k in delta)).item()


@pytest.fixture
def small_lora_update():
    """A bf16 LoRA policy with weights of magnitude 1 to 2 (a bf16 step of 1/128) and an update BA of ~1/10 of
    that step: round-to-nearest drops nearly all of it."""
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm("tiny-llama", torch.bfloat16), PPOConfig())
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()
            if "base_layer" in name:
                param.copy_(param.sign() * (1 + torch.rand_like(param.float())))
    base = {name: weight.float() for name, weight in policy.get_base_model().state_dict().items()}
    delta = {f"{name}.weight": weight - base[f"{name}.base_layer.weight"]
             for name, weight in lora_merged_weights(policy)}
    scale = 0.1 * torch.finfo(torch.bfloat16).eps / (sum(d.abs().sum() for d in delta.values())
                                                     / sum(d.numel() for d in delta.values()))
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    return policy, {k: base[k.replace(".weight", ".base_layer.weight")] for k in delta}, \
        {k: d * scale for k, d in delta.items()}


def test_sampler_and_merged_policy_keep_an_update_round_to_nearest_drops(small_lora_update):
    policy, base, delta = small_lora_update
    nearest = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert kept(nearest, base, delta) < 0.2  # peft adds in bf16: most of the update is gone

    sampler = load_causal_lm("tiny-llama", torch.bfloat16)
    sync_sampler(sampler, policy, rounding_generator(0, "cpu"))
    assert kept(sampler.state_dict(), base, delta) == pytest.approx(1.0, abs=0.1)

    merged = merge_lora(copy.deepcopy(policy), rounding_generator(0, "cpu"))
    assert not hasattr(merged, "get_base_model") and merged.dtype == torch.bfloat16
    assert kept(merged.state_dict(), base, delta) == pytest.approx(1.0, abs=0.1)
    # the same stream draws the same roundings: the saved policy is the sampler's last copy
    assert all(torch.equal(merged.state_dict()[k], sampler.state_dict()[k]) for k in delta)


def with_small_update(policy) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Set an fp32 model's weights to bf16 values of magnitude 1 to 2 plus ~1/10 of a bf16 step: (base, update)."""
    base, delta = {}, {}
    with torch.no_grad():
        for name, weight in policy.named_parameters():
            base[name] = (weight.sign() * (1 + torch.rand_like(weight))).to(torch.bfloat16).float()
            delta[name] = 0.1 * torch.finfo(torch.bfloat16).eps * torch.randn_like(weight)
            weight.copy_(base[name] + delta[name])
    return base, delta


def test_full_fine_tuning_sampler_keeps_a_small_update():
    torch.manual_seed(0)
    policy = load_causal_lm("tiny-llama", torch.float32)
    base, delta = with_small_update(policy)
    sampler = load_causal_lm("tiny-llama", torch.bfloat16)
    sync_sampler(sampler, policy, rounding_generator(0, "cpu"))
    assert kept(dict(sampler.named_parameters()), base, delta) == pytest.approx(1.0, abs=0.1)
    assert kept({n: w.to(torch.bfloat16) for n, w in policy.named_parameters()}, base, delta) < 0.2


def test_eval_reads_an_fp32_policy_into_bf16_keeping_its_update(tmp_path):
    from rlhf.evaluate import final_policy

    torch.manual_seed(0)
    policy = load_causal_lm("tiny-llama", torch.float32)
    base, delta = with_small_update(policy)
    policy.save_pretrained(tmp_path / "ppo" / "policy")
    read = final_policy(load_config("configs/tiny.yaml"), tmp_path / "ppo", torch.bfloat16)
    assert read.dtype == torch.bfloat16
    assert kept(dict(read.named_parameters()), base, delta) == pytest.approx(1.0, abs=0.1)


def test_bf16_rounding_benchmark_on_a_tiny_lora_checkpoint(tmp_path):
    """benchmarks/bf16_rounding.py on a PPO checkpoint of tiny-llama whose LoRA update is ~1/10 of a bf16 step:
    round-to-nearest keeps part of it, stochastic rounding all of it, and every KL it prints is a number."""
    import re
    import subprocess
    import sys

    from safetensors.torch import save_file

    from rlhf.config import save_config

    run = tmp_path / "run"
    cfg = load_config("configs/tiny.yaml", [f"run.output_dir={run}", "ppo.lora=true"])
    (run / "ppo" / "checkpoints" / "step_00002").mkdir(parents=True)
    save_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    policy = add_lora(load_causal_lm("tiny-llama", torch.bfloat16), cfg.ppo)
    for name, param in policy.named_parameters():
        if "lora_B" in name:
            param.data.normal_()
    weights = [w for n, w in policy.get_base_model().state_dict().items() if "base_layer" in n]
    update = [w - policy.get_base_model().get_submodule(n).base_layer.weight.float()
              for n, w in lora_merged_weights(policy)]
    scale = 0.1 * torch.finfo(torch.bfloat16).eps * (sum(w.float().abs().mean() for w in weights) / len(weights)) \
        / (sum(u.abs().mean() for u in update) / len(update))
    state = {f"policy.{n}": (p.data * scale if "lora_B" in n else p.data).contiguous()
             for n, p in policy.named_parameters() if p.requires_grad}
    save_file(state, str(run / "ppo" / "checkpoints" / "step_00002" / "trainable.safetensors"))

    proc = subprocess.run([sys.executable, "benchmarks/bf16_rounding.py", str(run)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kept_share = {k: float(v) for k, v in re.findall(r"(\w+): keeps ([\d.]+) of the update", proc.stdout)}
    assert kept_share["nearest"] < 0.9 and kept_share["stochastic"] == pytest.approx(1.0, abs=0.1)
    kls = re.findall(r"^KL\((.+)\) = (-?[\d.]+) nats$", proc.stdout, re.M)
    assert len(kls) == 6 and all(float(v) > -0.01 for _, v in kls)
    assert len(re.findall(r"^sampler refresh, (nearest|stochastic): [\d.]+ s", proc.stdout, re.M)) == 2
