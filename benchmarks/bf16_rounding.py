"""How much of a trained LoRA update a bf16 copy keeps: round-to-nearest against stochastic rounding.

    .venv/bin/python benchmarks/bf16_rounding.py runs/default [CHECKPOINT]

A bf16 run trains LoRA adapters in fp32 over the bf16 base and samples from a plain bf16 copy with the
update merged in; the saved policy is merged the same way. From a finished run's PPO checkpoint (default:
the newest), this builds, in fp32 arithmetic so that only the stored weights differ:

- `reference`: bf16(W), the base as a bf16 run holds it;
- `trained`: bf16(W) + BA, the policy PPO trains;
- `nearest`: bf16(bf16(W) + BA) rounded to nearest (peft's `merge_and_unload` in bf16);
- `stochastic`: the same, rounded stochastically (`rlhf.ppo_models.merge_lora`).

It prints the share of the update each copy keeps (projected on the update) and the size of its rounding
error, then the exact KL (per answer, nats) between pairs of them on the eval's held-out prompts, each
sampling its own answers (the eval's sampling settings), and the KL of the bf16 reference to the fp32 one.
Last, the time of one refresh of the sampler (`sync_sampler`) with each rounding, median of 5.
Any run's checkpoint works; the update's size, not the run's dtype, is what matters.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rlhf.config import load_config
from rlhf.evaluate import answer_logprobs, eval_prompts, sample_batches
from rlhf.models import cast_parameters, load_causal_lm, load_tokenizer
from rlhf.ppo_models import Sequences, add_lora, lora_merged_weights, merge_lora, rounding_generator, sync_sampler
from rlhf.prompts import encode_config_prompts


def main(run: Path, ckpt: Path | None) -> None:
    cfg = load_config(run / "config.yaml")
    ckpt = ckpt or sorted((run / "ppo" / "checkpoints").glob("step_*"))[-1]
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    weights = {k[len("policy."):]: v for k, v in load_file(str(ckpt / "trainable.safetensors")).items()
               if k.startswith("policy.")}

    def lora_policy(dtype):
        policy = add_lora(load_causal_lm(cfg.model.policy, dtype), cfg.ppo)
        policy.load_state_dict(weights, strict=False)
        return policy

    def bf16_base_in_fp32():
        return cast_parameters(load_causal_lm(cfg.model.policy, torch.bfloat16), torch.float32)

    reference = bf16_base_in_fp32().eval()
    trained = add_lora(bf16_base_in_fp32(), cfg.ppo)
    trained.load_state_dict(weights, strict=False)
    models = {
        "trained": trained.merge_and_unload().eval(),
        "nearest": cast_parameters(lora_policy(torch.bfloat16).merge_and_unload(), torch.float32).eval(),
        "stochastic": cast_parameters(merge_lora(lora_policy(torch.bfloat16), rounding_generator(cfg.run.seed, "cpu")),
                                      torch.float32).eval(),
    }
    print(f"{run} {ckpt.name}")
    with torch.no_grad():
        for name in ("nearest", "stochastic"):
            along = norm2 = error2 = 0.0
            for t, c, r in zip(models["trained"].parameters(), models[name].parameters(), reference.parameters()):
                update, kept = (t - r).double(), (c - r).double()
                along += (kept * update).sum().item()
                norm2 += (update * update).sum().item()
                error2 += ((kept - update) ** 2).sum().item()
            print(f"{name:>10}: keeps {along / norm2:.3f} of the update, rounding error {(error2 / norm2) ** 0.5:.3f} "
                  f"of its norm")

    tokenizer = load_tokenizer(cfg.model.policy)
    prompts = encode_config_prompts(cfg, eval_prompts(cfg), tokenizer).input_ids

    def kl(model, other) -> float:
        """Exact KL(model || other) per answer, on answers `model` samples."""
        per_answer = []
        for ids, mask, responses in sample_batches(model, tokenizer, prompts, cfg, "cpu", "sampling"):
            seqs = Sequences.join(ids, mask, responses.ids, responses.mask)
            kl = answer_logprobs(model, other, seqs, responses, cfg.eval.temperature, cfg.eval.batch_size)[2]
            per_answer += kl.sum(1).tolist()
        return sum(per_answer) / len(per_answer)

    pairs = [("trained", "reference"), ("nearest", "reference"), ("stochastic", "reference"),
             ("nearest", "trained"), ("stochastic", "trained")]
    models["reference"] = reference
    for a, b in pairs:
        print(f"KL({a} || {b}) = {kl(models[a], models[b]):.3f} nats", flush=True)
    print(f"KL(bf16 reference || fp32 reference) = {kl(reference, load_causal_lm(cfg.model.policy).eval()):.3f} nats")

    policy, sampler = lora_policy(torch.bfloat16), load_causal_lm(cfg.model.policy, torch.bfloat16)

    @torch.no_grad()
    def nearest_sync():
        for name, weight in lora_merged_weights(policy):
            sampler.get_submodule(name).weight.copy_(weight)

    times: dict[str, list[float]] = {"nearest": [], "stochastic": []}
    for _ in range(5):
        for name, sync in (("nearest", nearest_sync),
                           ("stochastic", lambda: sync_sampler(sampler, policy, rounding_generator(0, "cpu")))):
            start = time.perf_counter()
            sync()
            times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"sampler refresh, {name}: {statistics.median(ts):.2f} s (median of 5)")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__.split("\n\n")[1])
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else None)
