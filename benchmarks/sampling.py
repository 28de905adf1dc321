"""Time `rlhf.generation.sample` (its own decode loop) against `sample_with_generate` (HF `generate`,
the path it replaced) on the default model, at the shapes of the prefs, PPO and eval stages.

    python benchmarks/sampling.py                        # batch 32 and 8, 32 new tokens, 5 rounds, 2 threads
    python benchmarks/sampling.py --batch 32 --rounds 9
    python benchmarks/sampling.py --profile              # where one call spends its time, for both paths
    python benchmarks/sampling.py --check                # same draws with every option (logprobs, greedy, ...)
    python benchmarks/sampling.py --dtype bfloat16       # the dtype generation uses on GPUs and AMX CPUs

Each round runs both paths once from the same seed, in alternating order (old, new, then new, old), so
that drift of a shared machine hits both alike; the two must draw the same tokens, which is checked.
Prompts are the first training prompts of the default config, encoded as the stages encode them.
tokens/s counts rows x new tokens, the work both paths do. On a shared machine the CPU time of the process
(with --threads 1) is steadier than the wall time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rlhf import generation
from rlhf.generation import left_pad, sample, sample_with_generate, stop_token_ids
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.prompts import encode_prompts

PROMPTS = Path(__file__).resolve().parent.parent / "seeds" / "prompts" / "sentiment_train.jsonl"
PATHS = {"old": sample_with_generate, "new": sample}


def prompt_batch(tok, batch: int, max_tokens: int = 64):
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()[:batch]]
    return left_pad(encode_prompts(prompts, tok, max_tokens=max_tokens).input_ids, tok.pad_token_id)


def timed_call(fn, model, ids, mask, args, seed: int):
    """(wall seconds, CPU seconds of this process, Responses) of one call from `seed`."""
    torch.manual_seed(seed)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(model, ids, mask, args.new_tokens, 1.0, args.stop_ids, args.pad_token_id)
    return time.perf_counter() - t0, time.process_time() - c0, out


def compare(model, tok, batch: int, args) -> None:
    ids, mask = prompt_batch(tok, batch)
    wall, cpu = {"old": [], "new": []}, {"old": [], "new": []}
    for seed in range(args.rounds):
        outs = {}
        for name in ("old", "new") if seed % 2 == 0 else ("new", "old"):
            seconds, cpu_seconds, outs[name] = timed_call(PATHS[name], model, ids, mask, args, seed)
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
        old, new = outs["old"], outs["new"]
        if not (torch.equal(old.ids, new.ids) and torch.equal(old.mask, new.mask)):
            raise SystemExit(f"batch {batch}, seed {seed}: the two paths drew different tokens")
    work = batch * args.new_tokens
    old, new = statistics.median(wall["old"]), statistics.median(wall["new"])
    print(f"batch {batch} x {args.new_tokens} new tokens, prompts {ids.shape[1]} wide, {args.rounds} rounds, "
          f"same tokens in every round")
    print(f"  wall (median): old {old:.3f} s ({work / old:.0f} tokens/s), new {new:.3f} s ({work / new:.0f} "
          f"tokens/s), new/old {new / old:.3f}")
    old_cpu, new_cpu = statistics.median(cpu["old"]), statistics.median(cpu["new"])
    print(f"  CPU time of this process (median): old {old_cpu:.3f} s, new {new_cpu:.3f} s, "
          f"new/old {new_cpu / old_cpu:.3f}")
    for name in ("old", "new"):
        print(f"  {name} wall:", " ".join(f"{t:.3f}" for t in wall[name]))


CHECKS = {"sampled": {}, "logprobs": {"return_logprobs": True}, "greedy": {"greedy": True},
          "T=0.7, min_new_tokens=8, logprobs": {"temperature": 0.7, "min_new_tokens": 8, "return_logprobs": True}}


def check(model, tok, batch: int, args) -> None:
    """Both paths from the same seeds with each option: the same tokens, masks and logprobs, to the last bit."""
    ids, mask = prompt_batch(tok, batch)
    for label, options in CHECKS.items():
        options = dict(options)
        temperature = options.pop("temperature", 1.0)
        for seed in range(args.rounds):
            outs = []
            for fn in (sample_with_generate, sample):
                torch.manual_seed(seed)
                outs.append(fn(model, ids, mask, args.new_tokens, temperature, args.stop_ids, args.pad_token_id,
                               **options))
            old, new = outs
            same = torch.equal(old.ids, new.ids) and torch.equal(old.mask, new.mask)
            if old.logprobs is not None:
                same = same and torch.equal(old.logprobs, new.logprobs)
            print(f"batch {batch}, {label}, seed {seed}: {'same' if same else 'DIFFERENT'} "
                  f"(lengths {new.lengths.min().item()}..{new.lengths.max().item()}, "
                  f"{new.has_stop.sum().item()} of {batch} rows stopped)", flush=True)
            if not same:
                raise SystemExit(1)


def profile(model, tok, batch: int, args) -> None:
    """Split one call into the prefill forward, the decode forwards (the LM head inside them counted apart),
    the draws, and the rest (the loop around them)."""
    ids, mask = prompt_batch(tok, batch)
    spent, started = {}, {}

    def start(key):
        started[key] = time.perf_counter()

    def stop(key, started_as=None):
        spent[key] = spent.get(key, 0.0) + time.perf_counter() - started[started_as or key]

    def stop_forward(module, args, kwargs, out):
        stop("prefill" if kwargs["input_ids"].shape[1] > 1 else "decode", "forward")

    hooks = [model.register_forward_pre_hook(lambda m, a, k: start("forward"), with_kwargs=True),
             model.register_forward_hook(stop_forward, with_kwargs=True),
             model.lm_head.register_forward_pre_hook(lambda m, a: start("lm_head")),
             model.lm_head.register_forward_hook(lambda m, a, o: stop("lm_head"))]
    draw = generation.draw_by_inverse_cdf

    def timed_draw(scores, temperature):
        start("draw")
        tokens = draw(scores, temperature)
        stop("draw")
        return tokens

    generation.draw_by_inverse_cdf = timed_draw
    try:
        for seed in range(args.rounds):
            for name in ("old", "new") if seed % 2 == 0 else ("new", "old"):
                spent.clear()
                total, _, _ = timed_call(PATHS[name], model, ids, mask, args, seed)
                rest = total - spent["prefill"] - spent.get("decode", 0.0) - spent.get("draw", 0.0)
                print(f"batch {batch} {name}: total {total:.3f} s = prefill forward {spent['prefill']:.3f} "
                      f"+ decode forwards {spent.get('decode', 0.0):.3f} + draws {spent.get('draw', 0.0):.3f} "
                      f"+ the rest {rest:.3f}; LM head (within the forwards) {spent['lm_head']:.3f}")
    finally:
        generation.draw_by_inverse_cdf = draw
        for hook in hooks:
            hook.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, nargs="+", default=[32, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--profile", action="store_true", help="time the parts of one call instead")
    parser.add_argument("--check", action="store_true", help="compare the draws of every option instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model)
    model = load_causal_lm(args.model, getattr(torch, args.dtype)).eval()
    args.stop_ids, args.pad_token_id = stop_token_ids(tok), tok.pad_token_id
    print(f"{args.model}: {model.dtype}, {model.config._attn_implementation} attention, "
          f"{torch.get_num_threads()} threads")
    sample(model, *prompt_batch(tok, 2), 2, 1.0, args.stop_ids, args.pad_token_id)  # warm-up
    for batch in args.batch:
        (profile if args.profile else check if args.check else compare)(model, tok, batch, args)


if __name__ == "__main__":
    main()
