"""`rlhf bench CONFIG`: time PPO updates of a config and relate each phase to the limit of what it does.

    rlhf bench configs/default.yaml --updates 5

Runs the real PPO stage for N updates in a scratch run directory (reusing the config's trained
reward model when there is one, else an untrained one of the configured shape; every update trains
the policy, as after `ppo.critic_warmup_updates`), then prints the
median seconds per update (first update excluded) by phase, generated tokens per second, peak
memory, and how far each phase is from its limit:

- forward (score) and train phases: FLOP/s, with FLOPs counted from the model shapes and token
  counts, as a share of the measured matmul throughput. `*_share_of_peak` divides by the fp32
  (bf16 on GPU) peak; `*_share_of_dtype_peak` by the peak of the dtype the run's matmuls use
  (`matmul_peak_dtype`: the run's `model.dtype`, which the trained fp32 weights reach through
  autocast and the frozen models and generation copy are stored in).
- generate phase: decoding one token per row streams every weight of the generation model once, so

      bytes per decode step = parameters read in full × bytes of the run's dtype
      tokens/s limit        = memory bandwidth / bytes per decode step × rows sampled per step

  with the parameters counted once when the embedding and LM head are tied (an untied input
  embedding is left out: a step reads one row of it per sequence), the bandwidth measured on large
  tensor copies, and the rows the batch each process samples (`ppo.batch_size` / processes).
  `generate_share_of_bandwidth_limit` is the measured generated tokens/s over that limit. The KV
  cache, activations and the prompt's prefill are not counted, so the limit is an upper bound.
"""

from __future__ import annotations

import json
import resource
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from rlhf.config import PipelineConfig, ppo_sizes
from rlhf.models import default_dtype, load_reward_model, load_tokenizer, resolve_model, stage_device
from rlhf.ppo import run_ppo
from rlhf.ppo_models import reuses_sampling_logprobs
from rlhf.stages import is_done, marker_for, write_marker
from rlhf.utils import UserError, read_jsonl


def best_seconds(device: str, work, repeats: int) -> float:
    """The shortest of `repeats` timings of `work()`, waiting for the device before and after each."""
    best = float("inf")
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        work()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def matmul_peak(device: str = "cpu", dtype=torch.float32, n: int = 2048, repeats: int = 10) -> float:
    """Measured dense matmul throughput in FLOP/s (best of `repeats`)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    return 2 * n**3 / best_seconds(device, lambda: a @ b, repeats)


def memory_bandwidth(device: str = "cpu", mib: int = 256, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: the best of `repeats` copies of a `mib` MiB tensor, counting
    the bytes read and the bytes written. The tensor should be far larger than the caches to measure memory."""
    src = torch.ones(mib * 2**20 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # the first copy touches the destination's pages
    return 2 * src.nbytes / best_seconds(device, lambda: dst.copy_(src), repeats)


def decode_step_bytes(config, dtype: torch.dtype, trust_remote_code: bool = False) -> int:
    """Bytes of weights one decode step reads: every parameter of the model in `dtype`, a tied embedding / LM
    head once, less an untied input embedding (a step reads one row of it per sequence). The model is built
    on the meta device, so nothing is allocated."""
    from transformers import AutoModelForCausalLM  # transformers takes seconds to import: only the bench needs it

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    params = sum(p.numel() for p in model.parameters())  # tied parameters are listed once
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or embedding.weight is not head.weight:
        params -= embedding.weight.numel()
    return params * torch.empty((), dtype=dtype).element_size()


def sampling_limit(bandwidth: float, step_bytes: int, rows: int) -> float:
    """Generated tokens/s if decoding only streamed the weights: `bandwidth / step_bytes` decode steps per
    second, each adding one token to each of `rows` sequences."""
    return bandwidth / step_bytes * rows


def format_figure(value) -> str:
    """A table cell: three decimals, or three significant digits for figures below 0.1 (small shares)."""
    if isinstance(value, float):
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.1 else f"{value:.3g}"
    return str(value)


def forward_flops_per_token(config) -> float:
    """2 × (non-embedding matmul parameters) per token: attention and MLP projections of every layer."""
    c = config.get_text_config()
    h, layers = c.hidden_size, c.num_hidden_layers
    heads = c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or h // heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    mlp_mats = 3 if getattr(c, "model_type", "") in ("llama", "qwen2", "mistral", "gemma") else 2
    attn = h * heads * head_dim * 2 + h * kv * head_dim * 2
    return 2.0 * layers * (attn + mlp_mats * h * inter)


def untrained_reward_model(cfg: PipelineConfig, out: Path) -> None:
    """A reward model / critic folder with the policy's backbone and a seeded random score head."""
    torch.manual_seed(cfg.run.seed)
    model = load_reward_model(cfg.model.policy, torch.float32, cfg.model.trust_remote_code, cfg.reward.num_layers)
    model.config.pad_token_id = load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code).pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(cfg.model.policy, cfg.model.trust_remote_code).save_pretrained(out)


def run_bench(cfg: PipelineConfig, updates: int = 4, json_out: str | None = None) -> dict:
    from transformers import AutoConfig  # transformers takes seconds to import: only the bench itself needs it here

    if updates < 2:
        raise UserError("--updates must be at least 2 (the first update is excluded)")
    console = Console(stderr=True)
    src = Path(cfg.run.output_dir)
    scratch = Path(tempfile.mkdtemp(prefix="rlhf-bench-"))
    try:
        bench_cfg = replace(cfg, run=replace(cfg.run, output_dir=str(scratch)),
                            ppo=replace(cfg.ppo, num_updates=updates, save_every=10**6, sample_every=10**6,
                                        critic_warmup_updates=0),
                            tracking=replace(cfg.tracking, wandb="off"))
        reward_dir = scratch / "reward"
        if is_done(cfg, src, "reward"):
            shutil.copytree(src / "reward", reward_dir)
        else:  # timing only: an untrained RM of the configured shape (the policy's first reward.num_layers)
            console.print(f"[yellow]no trained reward model in {src}: timing with an untrained one[/yellow]")
            untrained_reward_model(cfg, reward_dir / "model")
        for stage in ("prefs", "reward"):  # the PPO stage checks that its inputs are finished
            write_marker(scratch / stage, marker_for(bench_cfg, scratch, stage, 0.0))
        run_ppo(bench_cfg, scratch, scratch / "ppo")
        rows = read_jsonl(scratch / "ppo" / "metrics.jsonl")[1:]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    device = stage_device(cfg)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    run_dtype = default_dtype(cfg.model.dtype, device)  # the matmuls' dtype (autocast), and generation's
    peak = matmul_peak(device, dtype)
    dtype_peak = peak if run_dtype == dtype else matmul_peak(device, run_dtype)
    bandwidth = memory_bandwidth(device)
    med = {k: statistics.median(r[f"time/{k}"] for r in rows) for k in ("update", "generate", "forward", "score", "train")}
    med["other"] = med["update"] - med["generate"] - med["forward"] - med["score"] - med["train"]
    policy_cfg = AutoConfig.from_pretrained(resolve_model(cfg.model.policy))
    text_cfg = policy_cfg.get_text_config()
    pc = cfg.ppo
    # every position of the padded (B, P + R) batch is computed; the LM head only on the R response positions
    seq_tokens = pc.batch_size * statistics.median(r["val/sequence_width"] for r in rows)
    policy_fwd = (forward_flops_per_token(policy_cfg) * seq_tokens
                  + 2.0 * text_cfg.hidden_size * text_cfg.vocab_size * pc.batch_size * pc.max_new_tokens)
    critic_layers = cfg.reward.num_layers or text_cfg.num_hidden_layers
    critic_fwd = (forward_flops_per_token(policy_cfg) * seq_tokens * critic_layers / text_cfg.num_hidden_layers
                  if pc.value_model == "critic" else 0.0)
    # policy with values, and reference; an fp32 policy that samples itself with a critic (or without a value
    # function) reuses generation's logprobs and skips its forward (rlhf.rollout)
    reuses_generation = reuses_sampling_logprobs(pc, run_dtype)
    forward_flops = (1 if reuses_generation else 2) * policy_fwd + critic_fwd
    # backward ≈ 2× forward (input and weight gradients); with LoRA the policy skips its weight gradients
    train_flops = pc.ppo_epochs * ((2.0 if pc.lora else 3.0) * policy_fwd + 3.0 * critic_fwd)
    if ppo_sizes(pc).keeps_rollout_forward:  # the first epoch starts from the rollout's forward
        train_flops -= (0.0 if reuses_generation else policy_fwd) + critic_fwd
    # generation decodes from a copy of the policy in the run's dtype (or the fp32 policy itself), one process here
    tokens_limit = sampling_limit(bandwidth, decode_step_bytes(policy_cfg, run_dtype, cfg.model.trust_remote_code),
                                  ppo_sizes(pc).local_batch_size)
    tokens_per_second = statistics.median(r["tokens_per_second"] for r in rows)
    train_per_second, forward_per_second = train_flops / med["train"], forward_flops / med["forward"]
    result = {
        "seconds_per_update": med["update"], **{f"seconds_{k}": v for k, v in med.items() if k != "update"},
        "generated_tokens_per_second": tokens_per_second,
        "response_length": statistics.median(r["val/response_length"] for r in rows),
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "matmul_peak_gflops": peak / 1e9,
        "train_gflops_per_second": train_per_second / 1e9,
        "forward_gflops_per_second": forward_per_second / 1e9,
        "train_share_of_peak": train_per_second / peak,
        "forward_share_of_peak": forward_per_second / peak,
        "matmul_peak_dtype": str(run_dtype).replace("torch.", ""),
        "dtype_matmul_peak_gflops": dtype_peak / 1e9,
        "train_share_of_dtype_peak": train_per_second / dtype_peak,
        "forward_share_of_dtype_peak": forward_per_second / dtype_peak,
        "memory_bandwidth_gbs": bandwidth / 1e9,
        "generate_tokens_per_second_limit": tokens_limit,
        "generate_share_of_bandwidth_limit": tokens_per_second / tokens_limit,
        "device": device, "dtype": str(dtype).replace("torch.", ""), "updates_timed": len(rows),
    }
    if device == "cuda":
        result["peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    per_update = [round(r["time/update"], 3) for r in rows]
    table = Table(title=f"PPO benchmark: {cfg.model.policy}, batch {pc.batch_size}, {len(rows)} updates timed")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for k, v in result.items():
        table.add_row(k, format_figure(v))
    Console().print(table)
    if json_out:
        Path(json_out).write_text(json.dumps({**result, "per_update_seconds": per_update}, indent=2))
    return result
