"""rlhf/models.py on the tiny aliases and local folders (seconds), and the embedded SmolLM2 (slow).

The tiny aliases are built in the session's tmp RLHF_CACHE (see conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from rlhf.generation import decode_responses, left_pad, sample, sample_by_inverse_cdf, stop_token_ids
from rlhf.models import (
    TINY_ALIASES,
    cache_dir,
    default_dtype,
    disable_dropout,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_model,
    same_tokenizer,
)
from rlhf.prompts import encode_prompts
from rlhf.tiny import build_tiny_model, build_tiny_tokenizer
from rlhf.utils import UserError

ARCHS = ["llama", "gpt2", "qwen2"]
ALIASES = list(TINY_ALIASES)  # tiny-llama, tiny-gpt2, tiny-qwen2


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """One local folder per architecture, built with build_tiny_model."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(root / arch, arch=arch, seed=1) for arch in ARCHS}


@pytest.fixture(params=ALIASES + [f"folder:{a}" for a in ARCHS])
def model_name(request, tiny_folders):
    """A tiny alias, or the path of a local folder made by build_tiny_model."""
    if request.param.startswith("folder:"):
        return str(tiny_folders[request.param.split(":", 1)[1]])
    return request.param


def decoder_layers(model) -> torch.nn.ModuleList:
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


def assert_prefix_masks(sampled, stop_ids, pad_id):
    """Each bool mask row is 1..1 0..0; a row shorter than R ends with a stop token; padding after it; the stop
    flags and lengths say so."""
    responses, mask = sampled.ids, sampled.mask
    B, R = responses.shape
    assert mask.dtype == torch.bool and torch.equal(sampled.lengths, mask.sum(1))
    for row, m, has_stop in zip(responses.tolist(), mask.tolist(), sampled.has_stop.tolist()):
        n = int(sum(m))
        assert m == [True] * n + [False] * (R - n)
        assert has_stop == any(t in stop_ids for t in row[:n])
        assert row[n:] == [pad_id] * (R - n)
        stops_inside = [i for i, t in enumerate(row[:n]) if t in stop_ids]
        if n < R:
            assert stops_inside == [n - 1], (row, m)  # the first stop token is kept, nothing after it
        else:
            assert stops_inside in ([], [R - 1])


# ---------------------------------------------------------------------------------------------
# aliases and folders


def test_tiny_alias_built_in_session_cache():
    path = Path(resolve_model("tiny-llama"))
    assert path == cache_dir() / "models" / "tiny-llama"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert "rlhf-cache" in str(path)  # the conftest's tmp cache, never the user's


def test_tokenizer(model_name):
    tok = load_tokenizer(model_name)
    assert tok.padding_side == "left"
    assert tok.pad_token is not None and tok.pad_token_id is not None
    assert tok.eos_token == "<eos>"
    assert stop_token_ids(tok) == [tok.eos_token_id] == [tok.convert_tokens_to_ids("<eos>")]
    assert tok.chat_template


def tokenizer_cases():
    return ALIASES + [f"folder:{a}" for a in ARCHS]


@pytest.mark.parametrize("name", tokenizer_cases())
def test_tokenizer_round_trips_words(name, tiny_folders):
    if name.startswith("folder:"):
        name = str(tiny_folders[name.split(":", 1)[1]])
    tok = load_tokenizer(name)
    ids = tok("the good day .", add_special_tokens=False)["input_ids"]
    assert ids == tok.convert_tokens_to_ids(["the", "good", "day", "."])
    assert stop_token_ids(tok, ["."]) == sorted([tok.eos_token_id, ids[-1]])


def test_tokenizer_padding_side_option():
    assert load_tokenizer("tiny-gpt2", padding_side="right").padding_side == "right"


def test_tokenizer_without_pad_token_reuses_unk(tmp_path, tiny_folders):
    folder = tmp_path / "nopad"
    shutil.copytree(tiny_folders["llama"], folder)
    for f in folder.glob("tokenizer*"):
        f.unlink()
    tok = build_tiny_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(folder)
    loaded = load_tokenizer(str(folder))
    assert loaded.pad_token == "<unk>"
    assert len(loaded) == len(tok)  # no new token added


def test_stop_token_ids_extras():
    tok = load_tokenizer("tiny-llama")
    ids = stop_token_ids(tok, [".", "!"])
    assert ids == sorted({tok.eos_token_id, tok.convert_tokens_to_ids("."), tok.convert_tokens_to_ids("!")})
    with pytest.raises(UserError, match="2 tokens"):
        stop_token_ids(tok, ["good day"])


def test_models_load_without_hub_kernels(model_name):
    """transformers 5.25 turns Hub kernels on by default where `kernels` is installed (5.25 requires it),
    and on a GPU `train()` then fetches layers from the Hub: offline that failed the reward stage on cuda. The
    loaders turn them off, and a policy put in training mode stays off."""
    policy, reward = load_causal_lm(model_name), load_reward_model(model_name)
    assert not getattr(policy, "use_kernels", False) and not getattr(reward, "use_kernels", False)
    policy.train()
    assert not getattr(policy, "use_kernels", False)


def test_causal_lm_loads_and_generates(model_name):
    tok = load_tokenizer(model_name)
    model = load_causal_lm(model_name)
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    prompts = ["the good day", "a", "tell me about the weather today", "i love my dog"] * 6
    enc = encode_prompts(prompts, tok, max_tokens=32)
    ids, attn = left_pad(enc.input_ids, tok.pad_token_id)
    assert ids.shape == attn.shape and ids.shape[0] == len(prompts)
    assert attn[:, -1].all()  # left padding: every prompt ends at the last column
    # a few frequent words as extra stop tokens, so that some rows stop early (ids looked up in the
    # vocabulary, not through stop_token_ids, which needs the text round trip that tiny-qwen2 lacks)
    words = [".", ",", "the", "a", "is", "and", "i", "you", "good", "bad"]
    stop = sorted(set(stop_token_ids(tok)) | set(tok.convert_tokens_to_ids(words)))
    assert tok.unk_token_id not in stop
    torch.manual_seed(0)
    sampled = sample(model, ids, attn, max_new_tokens=12, temperature=2.0, stop_ids=stop, pad_token_id=tok.pad_token_id)
    responses, mask = sampled.ids, sampled.mask
    assert responses.shape == mask.shape == (len(prompts), 12)
    assert responses.dtype == torch.long
    assert_prefix_masks(sampled, stop, tok.pad_token_id)
    lengths = sampled.lengths
    assert (lengths < 12).any(), "no row hit a stop token"
    assert (lengths >= 1).all()
    texts = decode_responses(tok, sampled)
    assert len(texts) == len(prompts) and all(isinstance(t, str) for t in texts)
    assert not any("<eos>" in t or "<pad>" in t for t in texts)


def test_sample_pads_when_every_row_stops_at_once():
    tok = load_tokenizer("tiny-qwen2")
    model = load_causal_lm("tiny-qwen2")
    ids, attn = left_pad(tok(["the day", "a cat is"], add_special_tokens=False)["input_ids"], tok.pad_token_id)
    every = list(range(len(tok)))  # any token ends the response
    sampled = sample(model, ids, attn, max_new_tokens=6, temperature=1.0, stop_ids=every, pad_token_id=tok.pad_token_id)
    assert sampled.ids.shape == (2, 6)
    assert sampled.mask.tolist() == [[1, 0, 0, 0, 0, 0]] * 2 and sampled.has_stop.all()
    assert (sampled.ids[:, 1:] == tok.pad_token_id).all()


def test_min_new_tokens_gives_fixed_length_responses():
    tok = load_tokenizer("tiny-qwen2")
    model = load_causal_lm("tiny-qwen2")
    ids, attn = left_pad(tok(["the day", "a cat is"], add_special_tokens=False)["input_ids"], tok.pad_token_id)
    most = [t for t in range(len(tok)) if t != tok.unk_token_id]  # nearly any token would end the response
    sampled = sample(model, ids, attn, max_new_tokens=6, temperature=1.0, stop_ids=most,
                     pad_token_id=tok.pad_token_id, min_new_tokens=6)
    assert sampled.mask.tolist() == [[1] * 6] * 2  # stop tokens were masked out until the length was reached


def within_sampling_error(counts: torch.Tensor, probs: torch.Tensor, n: int) -> bool:
    """Every empirical frequency within 5 standard errors (plus a hair) of its probability."""
    freq = counts.double() / n
    return bool(((freq - probs).abs() <= 5 * (probs * (1 - probs) / n).sqrt() + 1e-3).all())


def test_inverse_cdf_sampling_draws_from_the_tempered_softmax():
    torch.manual_seed(0)
    base = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0, -8.0],
                         [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                         [float("-inf"), 5.0, float("-inf"), 4.5, float("-inf"), float("-inf")]])
    n = 20000
    for temperature in (0.7, 1.0):
        out = sample_by_inverse_cdf(base.repeat_interleave(n, 0), temperature)
        assert ((out == 0).sum(1) == 1).all() and ((out == 0) | (out == float("-inf"))).all()
        drawn = out.argmax(1).view(3, n)
        probs = torch.softmax(base.double() / temperature, -1)
        for row in range(3):
            counts = torch.bincount(drawn[row], minlength=6)
            assert counts[probs[row] == 0].sum() == 0  # masked tokens are never drawn
            assert within_sampling_error(counts, probs[row], n), (temperature, row, counts, probs[row])


def test_sampling_follows_the_model_distribution():
    """`sample` draws the first token from softmax(logits / T) of the model (the processor is wired in)."""
    tok = load_tokenizer("tiny-qwen2")
    model = load_causal_lm("tiny-qwen2").eval()
    ids, attn = left_pad(tok(["a cat is"], add_special_tokens=False)["input_ids"], tok.pad_token_id)
    n, temperature = 4000, 0.5
    with torch.no_grad():
        probs = torch.softmax(model(ids, attention_mask=attn).logits[0, -1].double() / temperature, -1)
    torch.manual_seed(0)
    responses = sample(model, ids.repeat(n, 1), attn.repeat(n, 1), max_new_tokens=1, temperature=temperature,
                       stop_ids=[], pad_token_id=tok.pad_token_id).ids
    counts = torch.bincount(responses[:, 0], minlength=len(probs))
    assert within_sampling_error(counts, probs, n)
    flat = torch.softmax(probs.log() * temperature, -1)  # the same logits at T = 1
    assert not within_sampling_error(counts, flat, n)  # the temperature is applied


def test_set_training_attention_is_eager_on_cpu_only():
    from rlhf.models import set_training_attention

    model = load_causal_lm("tiny-llama")
    default = model.config._attn_implementation
    set_training_attention(model, "cuda")
    assert model.config._attn_implementation == default
    set_training_attention(model, "cpu")
    assert model.config._attn_implementation == "eager"


def test_keep_freed_memory_reuses_big_blocks():
    import resource
    import sys

    from rlhf.utils import keep_freed_memory

    if not sys.platform.startswith("linux"):
        assert keep_freed_memory() is False
        return
    assert keep_freed_memory() is True
    torch.ones(64 * 2**20 // 4)  # a 64 MiB block, freed at once
    small = torch.ones(16)  # allocated after it, so the freed block is not simply the heap's top
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(60 * 2**20 // 4)  # served from the freed block: no fresh pages (15k faults by default)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2000
    del small


def test_greedy_is_deterministic():
    tok = load_tokenizer("tiny-gpt2")
    model = load_causal_lm("tiny-gpt2")
    ids, attn = left_pad(tok(["the good day", "a"], add_special_tokens=False)["input_ids"], tok.pad_token_id)
    stop = stop_token_ids(tok)
    a = sample(model, ids, attn, 8, 1.0, stop, tok.pad_token_id, greedy=True)
    b = sample(model, ids, attn, 8, 1.0, stop, tok.pad_token_id, greedy=True)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.mask, b.mask)
    assert_prefix_masks(a, stop, tok.pad_token_id)


def test_left_padding_does_not_change_greedy_output():
    tok = load_tokenizer("tiny-llama")
    model = load_causal_lm("tiny-llama")
    stop = stop_token_ids(tok)
    short = tok(["a cat"], add_special_tokens=False)["input_ids"]
    long = tok(["tell me about the weather today please"], add_special_tokens=False)["input_ids"]
    alone = sample(model, *left_pad(short, tok.pad_token_id), 6, 1.0, stop, tok.pad_token_id, greedy=True)
    batched = sample(model, *left_pad(long + short, tok.pad_token_id), 6, 1.0, stop, tok.pad_token_id, greedy=True)
    assert torch.equal(alone.ids[0], batched.ids[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_reward_model_from_folder(arch, tiny_folders):
    rm = load_reward_model(str(tiny_folders[arch]))
    assert rm.config.num_labels == 1
    assert len(decoder_layers(rm)) == 2
    tok = load_tokenizer(str(tiny_folders[arch]))
    batch = tok(["the good day", "a"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = rm(**batch).logits
    assert logits.shape == (2, 1)


@pytest.mark.parametrize("name", ALIASES)
def test_reward_model_keeps_first_layers(name):
    rm = load_reward_model(name, num_hidden_layers=1)
    assert rm.config.num_hidden_layers == 1
    assert len(decoder_layers(rm)) == 1
    full = load_causal_lm(name)
    # the kept layer holds the pretrained weights of layer 0
    a = dict(decoder_layers(rm)[0].named_parameters())
    b = dict(decoder_layers(full)[0].named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_dropout_disabled(name):
    for model in (load_causal_lm(name), load_reward_model(name)):
        assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
        for key in ("attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_first_dropout"):
            value = getattr(model.config, key, None)
            assert value is None or value == 0.0, key


def test_disable_dropout_on_fresh_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=20, resid_pdrop=0.3))
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    disable_dropout(model)
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    assert model.config.resid_pdrop == 0.0 and model.config.attn_pdrop == 0.0


def test_dtype_option():
    model = load_causal_lm("tiny-llama", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_default_dtype(monkeypatch):
    monkeypatch.setenv("RLHF_CPU_BF16", "0")
    assert default_dtype("auto", "cpu") == torch.float32
    monkeypatch.setenv("RLHF_CPU_BF16", "1")  # a CPU with AMX
    assert default_dtype("auto", "cpu") == torch.bfloat16
    assert default_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert default_dtype("bfloat16", "cpu") == torch.bfloat16
    assert default_dtype("float16", "cpu") == torch.float16
    assert default_dtype("float32", "cuda") == torch.float32


def test_same_tokenizer():
    assert same_tokenizer(load_tokenizer("tiny-llama"), load_tokenizer("tiny-gpt2"))


# ---------------------------------------------------------------------------------------------
# refusals


def test_pytorch_bin_only_folder_refused(tmp_path, tiny_folders):
    """transformers >= 5 always writes safetensors, so the .bin folder is written by hand."""
    folder = tmp_path / "bin-only"
    shutil.copytree(tiny_folders["gpt2"], folder)
    (folder / "model.safetensors").unlink()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_folders["gpt2"])
    try:
        model.save_pretrained(folder, safe_serialization=False)  # honoured by transformers < 5
    except TypeError:
        pass
    if (folder / "model.safetensors").exists():
        (folder / "model.safetensors").unlink()
    if not (folder / "pytorch_model.bin").exists():
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    assert not list(folder.glob("*.safetensors"))
    for load in (load_causal_lm, load_reward_model):
        with pytest.raises(UserError, match="safetensors"):
            load(str(folder))


@pytest.mark.parametrize("kind", ["absolute", "relative", "home"])
def test_missing_folder_refused(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    name = {"absolute": str(tmp_path / "no" / "model"), "relative": "./no-model", "home": "~/no-such-model-rlhf"}[kind]
    for load in (load_causal_lm, load_tokenizer, load_reward_model):
        with pytest.raises(UserError, match="not found"):
            load(name)


def test_folder_without_config_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json"):
        load_causal_lm(str(tmp_path / "empty"))


def test_deep_relative_path_is_not_a_hub_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="not found"):
        resolve_model("runs/x/reward/model")


def test_hub_name_passes_through_and_offline_miss_is_user_error():
    assert resolve_model("someorg/some-model") == "someorg/some-model"
    with pytest.raises(UserError, match="cannot load model"):  # HF_HUB_OFFLINE=1 (conftest)
        load_causal_lm("someorg/no-such-model-rlhf-tests")
    with pytest.raises(UserError, match="cannot load tokenizer"):
        load_tokenizer("someorg/no-such-model-rlhf-tests")


def test_build_tiny_model_unknown_arch(tmp_path):
    with pytest.raises(ValueError, match="unknown tiny architecture"):
        build_tiny_model(tmp_path / "x", arch="bert")
    assert not (tmp_path / "x").exists()


def test_build_tiny_model_contents(tiny_folders):
    folder = tiny_folders["qwen2"]
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "qwen2"
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))


# ---------------------------------------------------------------------------------------------
# the embedded default model


@pytest.mark.slow
def test_smollm2_answers_capital_of_france(real_cache):
    tok = load_tokenizer("smollm2-135m-instruct")
    assert Path(resolve_model("smollm2-135m-instruct")).parent == real_cache / "models"
    assert tok.padding_side == "left" and tok.pad_token is not None
    stop = stop_token_ids(tok)
    assert tok.eos_token_id in stop and tok.convert_tokens_to_ids("<|im_end|>") in stop
    model = load_causal_lm("smollm2-135m-instruct")
    enc = encode_prompts(["What is the capital of France?"], tok, max_tokens=64)
    assert "<|im_start|>assistant" in tok.decode(enc.input_ids[0])
    ids, attn = left_pad(enc.input_ids, tok.pad_token_id)
    sampled = sample(model, ids, attn, max_new_tokens=24, temperature=1.0, stop_ids=stop,
                     pad_token_id=tok.pad_token_id, greedy=True)
    assert_prefix_masks(sampled, stop, tok.pad_token_id)
    (answer,) = decode_responses(tok, sampled)
    assert "Paris" in answer, answer
    assert sampled.lengths.item() < 24 and sampled.has_stop.item()  # a short answer that ends with the end-of-turn token
