"""Memory per GPU of the PPO stage's models, on paper: Qwen2.5 0.5B / 1.5B / 7B under DDP, ZeRO-2, ZeRO-3
and FSDP2, with full fine-tuning and with LoRA, from parameter counts alone.

    python benchmarks/memory_plan.py               # 8 GPUs
    python benchmarks/memory_plan.py --gpus 2
    python benchmarks/memory_plan.py --check-smollm2   # compare with the RSS measured on this CPU

What exists at PPO time (rlhf.ppo_models.build_models and the reward stage's scorer):
- full fine-tuning: the policy (trained), a frozen reference copy, a generation copy (the "sampler",
  refreshed after every update), the critic (trained, initialised from the reward model) and the
  frozen reward model;
- LoRA (policy only, every linear layer): the policy's base weights (frozen) and its adapters
  (trained); the reference is the same base with the adapters off (no copy); the sampler, critic
  (still trained in full) and reward model as above.
Bytes per parameter: trained 16 (fp32 weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8);
frozen 2 (bf16). The reward model and critic have the policy's backbone (`reward.num_layers: 0`).
What each engine splits over the N GPUs: DDP nothing; ZeRO-2 gradients and optimizer states;
ZeRO-3 and FSDP2 also the weights of the module the engine wraps: the policy (with LoRA, its frozen
base too) and the critic or value head. The frozen reference copy and the reward model are not wrapped
and stay whole on every GPU, as does the sampler: generation needs the full weights, gathered from the
shards once per update (`rlhf.distributed.full_weights`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GIB = 2**30
ENGINES = ("DDP", "ZeRO-2", "ZeRO-3", "FSDP2")
TRAINED_BYTES = 4 + 4 + 8  # fp32 weights, fp32 gradients, AdamW exp_avg + exp_avg_sq
STATE_BYTES = 4 + 8  # the part of TRAINED_BYTES that ZeRO-2 shards: gradients and optimizer states
FROZEN_BYTES = 2  # bf16


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer's config.json that fix its parameter count."""

    hidden: int  # hidden_size
    layers: int  # num_hidden_layers
    intermediate: int  # intermediate_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads
    vocab: int  # vocab_size
    tied: bool  # tie_word_embeddings: the LM head reuses the embedding matrix
    qkv_bias: bool  # Qwen2 has biases on q/k/v, Llama none

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


# From the published config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}-Instruct.
QWEN25 = {
    "0.5B": Shape(hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, vocab=151936, tied=True, qkv_bias=True),
    "1.5B": Shape(hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, vocab=151936, tied=True,
                  qkv_bias=True),
    "7B": Shape(hidden=3584, layers=28, intermediate=18944, heads=28, kv_heads=4, vocab=152064, tied=False,
                qkv_bias=True),
}
# HuggingFaceTB/SmolLM2-135M-Instruct, the project's default policy.
SMOLLM2_135M = Shape(hidden=576, layers=30, intermediate=1536, heads=9, kv_heads=3, vocab=49152, tied=True,
                     qkv_bias=False)


def layer_params(s: Shape) -> int:
    """One decoder layer: attention q, k, v, o (+ q/k/v biases), gated MLP gate, up, down, two RMSNorms."""
    attention = 2 * s.hidden * s.hidden + 2 * s.hidden * s.kv_dim  # q, o: H x H; k, v: H x kv_dim
    bias = s.hidden + 2 * s.kv_dim if s.qkv_bias else 0
    mlp = 3 * s.hidden * s.intermediate
    return attention + bias + mlp + 2 * s.hidden


def causal_lm_params(s: Shape, layers: int | None = None) -> int:
    """Embeddings V x H + layers + final norm H + (untied only) LM head V x H."""
    n = layers if layers is not None else s.layers
    return s.vocab * s.hidden * (1 if s.tied else 2) + n * layer_params(s) + s.hidden


def scorer_params(s: Shape, layers: int | None = None) -> int:
    """Reward model / critic (AutoModelForSequenceClassification): the backbone, no LM head, a H x 1 score head."""
    n = layers if layers is not None else s.layers
    return s.vocab * s.hidden + n * layer_params(s) + s.hidden + s.hidden


def lora_params(s: Shape, r: int) -> int:
    """LoRA on every linear layer of every decoder layer (peft `all-linear` leaves the LM head out):
    r x (in + out) per matrix: q, o (H, H); k, v (H, kv_dim); gate, up (H, I); down (I, H)."""
    per_layer = r * (4 * s.hidden + 2 * (s.hidden + s.kv_dim) + 3 * (s.hidden + s.intermediate))
    return s.layers * per_layer


def ppo_memory(s: Shape, engine: str, lora: bool, gpus: int, lora_r: int = 16) -> dict[str, float]:
    """Bytes per GPU of each part of the PPO stage's models (activations and buffers not included)."""
    policy, scorer = causal_lm_params(s), scorer_params(s)
    shards_states = engine != "DDP"
    shards_weights = engine in ("ZeRO-3", "FSDP2")

    def trained(n: int) -> float:
        weights = 4 * n / (gpus if shards_weights else 1)
        return weights + STATE_BYTES * n / (gpus if shards_states else 1)

    def frozen(n: int, wrapped: bool) -> float:
        """Frozen weights: split only when they sit inside the module the engine wraps."""
        return FROZEN_BYTES * n / (gpus if shards_weights and wrapped else 1)

    parts = {
        "policy": frozen(policy, wrapped=True) + trained(lora_params(s, lora_r)) if lora else trained(policy),
        "reference": 0.0 if lora else frozen(policy, wrapped=False),
        "sampler": frozen(policy, wrapped=False),
        "critic": trained(scorer),
        "reward model": frozen(scorer, wrapped=False),
    }
    return parts


def table(gpus: int, lora_r: int = 16) -> str:
    """The Markdown table of GiB per GPU, one row per model size and training mode."""
    head = f"| model (params) | policy training | {' | '.join(ENGINES)} |"
    rows = [head, "|" + "---|" * (2 + len(ENGINES))]
    for name, shape in QWEN25.items():
        for lora in (False, True):
            cells = [f"{sum(ppo_memory(shape, e, lora, gpus, lora_r).values()) / GIB:.1f}" for e in ENGINES]
            mode = f"LoRA r={lora_r} ({lora_params(shape, lora_r) / 1e6:.1f}M)" if lora else "full"
            rows.append(f"| Qwen2.5-{name} ({causal_lm_params(shape) / 1e9:.2f}B) | {mode} | {' | '.join(cells)} |")
    return "\n".join(rows)


NOTES = """\
GiB per GPU for the weights, gradients and AdamW states of policy + reference + sampler + critic + reward
model. Not included: activations (they grow with the micro-batch, the prompt + response length and the
vocabulary: the logits of one micro-batch are micro_batch x length x vocab floats), generation's KV cache,
the gathered layer that ZeRO-3/FSDP2 hold while it runs, communication buckets, the CUDA context
(~0.5 GiB) and the allocator's fragmentation. Trained: 16 bytes/param (fp32 weights, grads, 2 AdamW
moments; DeepSpeed's bf16 mode adds a 2-byte bf16 copy of the trained weights), frozen: 2 (bf16)."""


def check_smollm2() -> None:
    """Build the default config's PPO models once (SmolLM2-135M, LoRA, 4-layer critic) and compare the RSS
    growth with the weights this script predicts for them (fp32 here: this CPU has no fast bf16)."""
    import os
    import tempfile
    from pathlib import Path

    import torch

    from rlhf.config import load_config
    from rlhf.models import default_dtype, load_reward_model, load_tokenizer
    from rlhf.ppo_models import build_models

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "default.yaml")
    dtype = default_dtype(cfg.model.dtype, "cpu")
    size = torch.finfo(dtype).bits // 8
    with tempfile.TemporaryDirectory() as reward_dir:
        rm = load_reward_model(cfg.model.policy, torch.float32, num_hidden_layers=cfg.reward.num_layers)
        rm.save_pretrained(reward_dir)
        load_tokenizer(cfg.model.policy).save_pretrained(reward_dir)
        del rm
        before = rss()
        built = build_models(cfg, Path(reward_dir), torch.device("cpu"), dtype)
        model, sampler = built.model, built.sampler
        loaded = rss() - before
        with torch.no_grad():  # weights mapped from the safetensors files count once read, as a forward would
            for p in [*model.parameters(), *sampler.parameters()]:
                p.sum()
        grown = rss() - before
    s, layers = SMOLLM2_135M, cfg.reward.num_layers
    predicted = {  # weights only: no gradient or optimizer state exists before the first update
        "policy base": size * causal_lm_params(s),
        "LoRA adapters (fp32)": 4 * lora_params(s, cfg.ppo.lora_r),
        "sampler": size * causal_lm_params(s),
        f"critic ({layers} layers, fp32)": 4 * scorer_params(s, layers),
    }
    counted = sum(p.numel() * p.element_size() for m in (model, sampler) for p in m.parameters())
    print(f"SmolLM2-135M, configs/default.yaml, {dtype}: predicted weights")
    for name, n in predicted.items():
        print(f"  {name:28s} {n / 2**20:8.1f} MiB")
    print(f"  {'total predicted':28s} {sum(predicted.values()) / 2**20:8.1f} MiB")
    print(f"  {'parameters of built models':28s} {counted / 2**20:8.1f} MiB")
    print(f"  {'RSS growth of build_models':28s} {loaded / 2**20:8.1f} MiB")
    print(f"  {'... once every weight is read':28s} {grown / 2**20:8.1f} MiB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the engines shard over (default 8)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--check-smollm2", action="store_true",
                        help="build the default PPO models on this CPU and compare RSS with the prediction")
    args = parser.parse_args(argv)
    if args.check_smollm2:
        check_smollm2()
        return
    print(f"Memory per GPU (GiB) of the PPO stage's models on {args.gpus} GPUs\n")
    print(table(args.gpus, args.lora_r))
    print("\n" + NOTES)


if __name__ == "__main__":
    main()
