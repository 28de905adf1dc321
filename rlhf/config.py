"""Typed configuration of a pipeline run: one dataclass per section, loaded from YAML plus overrides.

    cfg = load_config("configs/default.yaml", ["ppo.kl_coef=0.1", "run.output_dir=runs/try"])

Every value is checked before any work starts: unknown keys (with a close match when there is
one), wrong types, values out of their range (`RANGES`), missing required values and sizes that do
not divide evenly all raise `ConfigError` with one line that names the key. What the values point
at (files, judges, the tokenizer) is checked by `rlhf.preflight`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf.utils import atomic_write_text


class ConfigError(ValueError):
    """A user error in a configuration file or override."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `wandb: off` stays the string "off"."""


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
for _ch in "tTfF":
    _Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list(_ch))


def _load_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


@dataclass
class RunConfig:
    name: str = "default"
    """Name of the run: the W&B group and the default run directory name."""
    output_dir: str = "runs/default"
    """Run directory: every stage reads and writes its artifacts under it."""
    seed: int = 0
    """Seed shared by all stages."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to run; `auto` is a GPU when one is visible, else the CPU."""
    threads: int = 0
    """torch CPU threads; 0 keeps torch's default (one per core)."""


@dataclass
class ModelConfig:
    policy: str = "smollm2-135m-instruct"
    """Policy (and reference) model: a hub name, a local folder, or the alias of the embedded default."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype: `auto` is bf16 on a GPU that supports it and fp32 otherwise."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the model's author."""
    use_chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one."""
    system_prompt: str | None = None
    """System message for chat templates; None keeps the template's own default."""


@dataclass
class DataConfig:
    train_prompts: str = "seeds/prompts/sentiment_train.jsonl"
    """Training prompts: a seeds/ file, a local JSONL/JSON/CSV/Parquet/TXT file, or a hub dataset name."""
    test_prompts: str = "seeds/prompts/sentiment_test.jsonl"
    """Held-out prompts for evaluation, same forms as `train_prompts`."""
    prompt_column: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages)."""
    split: str = "train"
    """Split to read when a prompt source is a hub dataset."""
    test_split: str = "test"
    """Split of `test_prompts` when it is a hub dataset."""
    max_prompt_tokens: int = 64
    """Prompts longer than this (after the chat template) are truncated or dropped."""
    long_prompts: Literal["truncate_left", "drop"] = "truncate_left"
    """What to do with a prompt over `max_prompt_tokens`."""
    max_train_prompts: int = 0
    """Use at most this many training prompts (0: all)."""


@dataclass
class NoiseConfig:
    bt_temperature: float = 0.0
    """Bradley-Terry annotator: P(prefer a) = sigmoid((gold_a - gold_b) / T); 0 means a noiseless choice."""
    flip_rate: float = 0.0
    """Probability that an annotator's label is flipped after the choice."""


@dataclass
class PrefsConfig:
    source: Literal["simulate", "load"] = "simulate"
    """`simulate`: sample responses and label them with the gold judge; `load`: read pairs from `dataset`."""
    dataset: str | None = None
    """Preference dataset for `source: load` (hub name or local file)."""
    dataset_split: str = "train"
    """Split of `dataset` to read."""
    num_prompts: int = 512
    """Prompts to sample responses for when simulating."""
    responses_per_prompt: int = 2
    """Responses sampled per prompt (k >= 2); every pair among them becomes a comparison."""
    max_new_tokens: int = 48
    """Response length limit when simulating."""
    temperature: float = 1.0
    """Sampling temperature when simulating."""
    batch_size: int = 32
    """Prompts per generation batch."""
    judge: str = "vader"
    """Gold judge: vader, length, keyword:<word>, or module:function for any Python function of the text."""
    min_gold_gap: float = 0.0
    """Drop simulated pairs whose gold scores differ by less than this (ties teach nothing)."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Simulated annotator noise."""
    test_fraction: float = 0.1
    """Share of prompts held out, with all their pairs, for reward-model evaluation."""
    max_pairs: int = 0
    """Keep at most this many pairs (0: all)."""


@dataclass
class RewardConfig:
    backbone: str | None = None
    """Reward-model backbone (hub name, folder or alias); None uses `model.policy`."""
    num_layers: int = 0
    """Keep only the first N transformer layers of the backbone (0: all): a cheaper RM and critic."""
    lora: bool = False
    """Train LoRA adapters (merged into the saved model) instead of all weights."""
    lora_r: int = 16
    """LoRA rank."""
    epochs: float = 1.0
    """Training epochs over the preference pairs."""
    learning_rate: float = 5e-5
    """Peak learning rate (linear decay)."""
    batch_size: int = 16
    """Per optimisation step: prompts when `group_by_prompt` (each with all its responses and pairs), else pairs;
    over all processes together (each takes batch_size / processes)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated per step."""
    group_by_prompt: bool = True
    """Batch whole prompts: each response is scored once per step and every labelled pair of its prompt
    enters the loss (InstructGPT). False: TRL's pair batches, each pair's two responses scored apart."""
    max_length: int = 128
    """Longest chosen/rejected sequence kept, in RM tokens."""
    use_margin: bool = False
    """Use the pairs' `margin` column in the loss (-log sigmoid(r_c - r_r - margin))."""
    center_rewards_coefficient: float | None = None
    """Weight of the (r_c + r_r)^2 penalty that keeps scores centred (Eisenstein et al. 2023)."""
    normalize_std: bool = True
    """Also scale scores to unit std on the reference policy's responses (the mean is always set to 0)."""
    normalize_samples: int = 128
    """Reference-policy responses generated to compute the normalisation."""


@dataclass
class PPOConfig:
    seed: int | None = None
    """Seed of this stage (prompt order, sampling, initial weights of new layers); `run.seed` when unset.
    Vary it alone to see how far PPO's result moves with its random stream, on the same pairs and reward
    model (the stages before are not rerun) and the same eval samples."""
    num_updates: int = 40
    """PPO iterations: each collects one rollout batch and optimises on it."""
    batch_size: int = 32
    """Prompts per rollout (global, across processes)."""
    mini_batch_size: int = 16
    """Rollouts per optimiser step."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per mini-batch (micro-batch = mini_batch_size / this)."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    learning_rate: float = 3e-5
    """Policy (and value) learning rate."""
    warmup_steps: int = 0
    """Linear LR warm-up, in optimiser steps, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    max_new_tokens: int = 48
    """Response length limit."""
    min_new_tokens: int = 0
    """Stop tokens are masked out before this many tokens (`max_new_tokens` gives fixed-length responses, as
    in benchmarks; the masking is not in the logprobs, so keep 0 for training)."""
    temperature: float = 1.0
    """Sampling temperature; logprobs use the same temperature."""
    stop_tokens: list[str] = field(default_factory=list)
    """Extra strings that end a response (the tokenizer's EOS always does)."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response that hit the length limit without a stop token."""
    kl_coef: float = 0.05
    """β of the per-token KL penalty (initial value when adaptive)."""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """KL estimator in the reward: k1 = log p - log p_ref, k3 = (r - 1) - log r."""
    kl_loss_coef: float = 0.0
    """Weight of the exact per-token KL(π ‖ π_ref), summed over the vocabulary at each response position and
    averaged over tokens, in the policy loss, on top of the KL penalty in the reward (0: off). It holds every
    token's probability near the reference's, not only the sampled ones'."""
    entropy_coef: float = 0.0
    """Weight of an entropy bonus in the policy loss: the policy's entropy over the vocabulary at each response
    position, averaged over tokens, is subtracted (0: off). It works against the sharpening part of the KL, and
    flattens the policy instead: in the README's study it spends more KL for less gold."""
    adaptive_kl: bool = False
    """Adapt β towards `target_kl` (Ziegler et al. 2019)."""
    target_kl: float = 6.0
    """Target sequence KL for the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon of the adaptive controller, in episodes."""
    stop_kl: float | None = None
    """End training early at the first rollout whose KL to the reference (mean over its answers, in nats)
    reaches this: the policy that sampled it is the final one, and its updates are the stage's last (null:
    all `num_updates`). PPO then spends about this much KL whatever its random stream's pace."""
    stop_kl_brake: bool = False
    """With `stop_kl`: each update's learning rate is the schedule's times 1 - KL / `stop_kl` (at most 1), from
    the KL of that update's rollout, so PPO slows down as it nears the stop instead of overshooting it."""
    land_kl: float | None = None
    """After training, scale the policy's change from the reference's weights, W_ref + α (W_policy − W_ref), so
    that its exact KL to the reference on training prompts is this many nats (rlhf.landing; α at most 1.25;
    null: the trained policy as it is). Where PPO lands varies with its random stream; this sets it."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE λ."""
    cliprange: float = 0.2
    """Policy ratio clip ε."""
    cliprange_value: float = 0.2
    """Value clip."""
    vf_coef: float = 0.1
    """Value-loss weight."""
    whiten_rewards: bool = False
    """Whiten per-token rewards over the batch before GAE."""
    score_clip: float | None = None
    """Clip reward-model scores to ±this before shaping."""
    reward: str = "rm"
    """Reward: `rm` (trained reward model), a judge name (see prefs.judge), or a weighted sum `rm:1.0,vader:0.5`."""
    value_model: Literal["critic", "head", "none"] = "critic"
    """`critic`: separate value model, initialised from the reward model when it shares the policy's tokenizer
    (else from the policy's backbone); `head`: zero-initialised value head on the policy trunk; `none`: no value
    function, each answer's baseline is the mean return of the other answers to its prompt (RLOO; needs
    `samples_per_prompt` >= 2)."""
    samples_per_prompt: int = 1
    """Answers sampled per prompt in a rollout. `batch_size` counts answers: each update draws
    batch_size / samples_per_prompt prompts."""
    critic_warmup_updates: int = 0
    """Updates at the start that train only the value function."""
    lora: bool = False
    """Train LoRA adapters on the policy; the reference is the base with adapters disabled."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    save_every: int = 10
    """Checkpoint every N updates (and at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints to keep."""
    sample_every: int = 5
    """Log a table of sample generations every N updates."""
    merge_lora: bool = True
    """Save the final policy with LoRA merged into a plain causal LM."""


@dataclass
class EvalConfig:
    prompts: str | None = None
    """Held-out prompts; None uses `data.test_prompts`."""
    num_prompts: int = 128
    """Evaluate at most this many prompts (0: all)."""
    max_new_tokens: int = 48
    """Response length limit (same as PPO by default)."""
    temperature: float = 1.0
    """Sampling temperature for both models."""
    greedy: bool = False
    """Decode greedily instead of sampling."""
    batch_size: int = 32
    """Prompts per generation batch."""
    checkpoints: bool = False
    """Also evaluate every kept PPO checkpoint (eval/checkpoints.jsonl: a curve of scores vs KL)."""
    bootstrap_samples: int = 1000
    """Bootstrap resamples for the win-rate interval."""
    best_of_n: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    """Best-of-n from the reference to set PPO against (eval/frontier.jsonl): strictly increasing n,
    n = 1 (the reference, KL 0) always included; max(n) - 1 more samples per prompt; [] turns it off."""


@dataclass
class TrackingConfig:
    wandb: Literal["auto", "online", "offline", "off"] = "auto"
    """auto: online with a key (or WANDB_MODE), offline otherwise."""
    project: str = "rlhf"
    """W&B project."""
    entity: str | None = None
    """W&B entity (team or user); None uses your default."""


@dataclass
class PipelineConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prefs: PrefsConfig = field(default_factory=PrefsConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# building and checking


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML is loose (int -> float)."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = [str(a) for a in typing.get_args(tp)]
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float and isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)  # YAML 1.1 reads 1e-5 (no dot, or no exponent sign) as a string
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{key}: expected a finite number, got {value!r}")
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            where = f"section {prefix!r}" if prefix else "the top level"
            raise ConfigError(f"unknown key {full!r} in {where}{hint}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`ppo.kl_coef=0.1` -> (["ppo", "kl_coef"], 0.1); the value is parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = _load_yaml(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a YAML file (or nothing: all defaults), apply dotted overrides, validate, return the config."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = _load_yaml(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}:{where} invalid YAML: {problem}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        data = loaded or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    cfg = _build(PipelineConfig, data)
    validate(cfg)
    cfg.run.output_dir = str(Path(cfg.run.output_dir).expanduser())  # as data and model paths expand `~`
    return cfg


def exact_div(a: int, b: int, what: str) -> int:
    if b <= 0 or a % b != 0:
        raise ConfigError(what)
    return a // b


@dataclass(frozen=True)
class PPOSizes:
    """Sizes of one PPO update, per process."""

    num_processes: int
    local_batch_size: int  # rollouts generated per process
    local_mini_batch_size: int  # rollouts per optimiser step per process
    micro_batch_size: int  # rollouts per forward/backward
    num_mini_batches: int  # optimiser steps per PPO epoch
    optimizer_steps: int  # optimiser steps over the whole run

    @property
    def keeps_rollout_forward(self) -> bool:
        """One micro-batch per epoch on one process: the rollout's policy-and-value forward is kept with
        its graph and is the first epoch's forward (the same weights and rows), one pass fewer per update."""
        return self.micro_batch_size == self.local_batch_size and self.num_processes == 1


def ppo_sizes(ppo: PPOConfig, num_processes: int = 1) -> PPOSizes:
    """Derive per-process batch sizes, checking that everything divides evenly."""
    local_batch = exact_div(
        ppo.batch_size, num_processes,
        f"ppo.batch_size={ppo.batch_size} must be divisible by the number of processes ({num_processes})",
    )
    local_mini = exact_div(
        ppo.mini_batch_size, num_processes,
        f"ppo.mini_batch_size={ppo.mini_batch_size} must be divisible by the number of processes ({num_processes})",
    )
    num_mini = exact_div(
        ppo.batch_size, ppo.mini_batch_size,
        f"ppo.batch_size={ppo.batch_size} must be a multiple of ppo.mini_batch_size={ppo.mini_batch_size}",
    )
    micro = exact_div(
        local_mini, ppo.gradient_accumulation_steps,
        f"per-process mini-batch {local_mini} (ppo.mini_batch_size / processes) must be divisible by "
        f"ppo.gradient_accumulation_steps={ppo.gradient_accumulation_steps}",
    )
    per_process = f" per process ({local_batch})" if num_processes > 1 else ""
    exact_div(local_batch, ppo.samples_per_prompt,
              f"ppo.batch_size={ppo.batch_size}{per_process} must be a multiple of "
              f"ppo.samples_per_prompt={ppo.samples_per_prompt}: each process samples whole groups of answers")
    steps = ppo.num_updates * ppo.ppo_epochs * num_mini
    return PPOSizes(num_processes, local_batch, local_mini, micro, num_mini, steps)


# The range of every numeric field: "> 0", ">= 0", ">= 2", or an interval ("[0, 1]" closed, "(0, 1)" open).
# A field set to None (optional values) is not checked. tests/test_config.py checks that every numeric
# field of the schema is listed here.
RANGES = {
    "run.seed": ">= 0", "run.threads": ">= 0", "ppo.seed": ">= 0",
    "data.max_prompt_tokens": "> 0", "data.max_train_prompts": ">= 0",
    "prefs.num_prompts": "> 0", "prefs.responses_per_prompt": ">= 2", "prefs.max_new_tokens": "> 0",
    "prefs.temperature": "> 0", "prefs.batch_size": "> 0", "prefs.min_gold_gap": ">= 0",
    "prefs.noise.bt_temperature": ">= 0", "prefs.noise.flip_rate": "[0, 0.5]", "prefs.test_fraction": "(0, 1)",
    "prefs.max_pairs": ">= 0",
    "reward.num_layers": ">= 0", "reward.lora_r": "> 0", "reward.epochs": "> 0", "reward.learning_rate": "> 0",
    "reward.batch_size": "> 0", "reward.gradient_accumulation_steps": "> 0", "reward.max_length": "> 0",
    "reward.center_rewards_coefficient": ">= 0", "reward.normalize_samples": "> 0",
    "ppo.num_updates": "> 0", "ppo.batch_size": "> 0", "ppo.mini_batch_size": "> 0",
    "ppo.gradient_accumulation_steps": "> 0", "ppo.ppo_epochs": "> 0", "ppo.learning_rate": "> 0",
    "ppo.warmup_steps": ">= 0", "ppo.max_grad_norm": "> 0", "ppo.max_new_tokens": "> 0", "ppo.min_new_tokens": ">= 0",
    "ppo.temperature": "> 0", "ppo.missing_eos_penalty": ">= 0", "ppo.kl_coef": ">= 0", "ppo.target_kl": "> 0",
    "ppo.kl_horizon": "> 0", "ppo.gamma": "[0, 1]", "ppo.lam": "[0, 1]", "ppo.cliprange": "(0, 1)",
    "ppo.cliprange_value": "> 0", "ppo.vf_coef": ">= 0", "ppo.kl_loss_coef": ">= 0", "ppo.entropy_coef": ">= 0",
    "ppo.score_clip": "> 0",
    "ppo.critic_warmup_updates": ">= 0", "ppo.samples_per_prompt": "> 0", "ppo.stop_kl": "> 0", "ppo.land_kl": "> 0",
    "ppo.lora_r": "> 0", "ppo.lora_alpha": "> 0", "ppo.save_every": "> 0", "ppo.keep_checkpoints": "> 0",
    "ppo.sample_every": "> 0",
    "eval.num_prompts": ">= 0", "eval.max_new_tokens": "> 0", "eval.temperature": "> 0", "eval.batch_size": "> 0",
    "eval.bootstrap_samples": "> 0",
}
# Strings that must not be empty.
NON_EMPTY = ("run.output_dir", "model.policy", "data.train_prompts", "data.test_prompts", "data.prompt_column",
             "data.split", "data.test_split", "ppo.reward")


def in_range(value: float, spec: str) -> bool:
    """Whether `value` lies in a RANGES spec such as "> 0", ">= 2", "[0, 0.5]" or "(0, 1)"."""
    if spec.startswith((">", "<")):
        op, bound = spec.split()
        bound = float(bound)
        return {">": value > bound, ">=": value >= bound, "<": value < bound, "<=": value <= bound}[op]
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    above = value >= lo if spec[0] == "[" else value > lo
    below = value <= hi if spec[-1] == "]" else value < hi
    return above and below


def get_value(cfg: PipelineConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: PipelineConfig) -> None:
    """Ranges (RANGES), non-empty strings, and the cross-field checks that types alone cannot express."""
    for key, spec in RANGES.items():
        value = get_value(cfg, key)
        if value is not None and not in_range(value, spec):
            raise ConfigError(f"{key} must be {spec if spec[0] in '<>' else 'in ' + spec}, got {value}")
    for key in NON_EMPTY:
        if not str(get_value(cfg, key)).strip():
            raise ConfigError(f"{key} must not be empty")
    for i, text in enumerate(cfg.ppo.stop_tokens):
        if not text:
            raise ConfigError(f"ppo.stop_tokens[{i}] is empty")
    if cfg.eval.prompts is not None and not cfg.eval.prompts.strip():
        raise ConfigError("eval.prompts must not be empty (leave it out to use data.test_prompts)")
    bon = cfg.eval.best_of_n
    if any(n < 1 for n in bon) or any(x >= y for x, y in zip(bon, bon[1:])):
        raise ConfigError(f"eval.best_of_n must be positive and strictly increasing, got {bon}")
    if cfg.prefs.source == "load" and not cfg.prefs.dataset:
        raise ConfigError("prefs.dataset is required when prefs.source is 'load'")
    if cfg.prefs.source == "simulate" and not cfg.prefs.judge.strip():
        raise ConfigError("prefs.judge is required when prefs.source is 'simulate' (it labels the pairs)")
    if cfg.reward.use_margin and cfg.prefs.source != "load":
        raise ConfigError("reward.use_margin needs pairs with a margin: set prefs.source=load with a dataset that "
                          "has a margin column, or reward.use_margin=false")
    if cfg.ppo.min_new_tokens > cfg.ppo.max_new_tokens:
        raise ConfigError(f"ppo.min_new_tokens must be in [0, ppo.max_new_tokens={cfg.ppo.max_new_tokens}], "
                          f"got {cfg.ppo.min_new_tokens}")
    if cfg.ppo.critic_warmup_updates >= cfg.ppo.num_updates:
        raise ConfigError(
            f"ppo.critic_warmup_updates={cfg.ppo.critic_warmup_updates} leaves no policy updates "
            f"(ppo.num_updates={cfg.ppo.num_updates})"
        )
    if cfg.ppo.land_kl is not None and cfg.ppo.lora and not cfg.ppo.merge_lora:
        raise ConfigError("ppo.land_kl moves the saved policy's weights, and an unmerged LoRA policy is an adapter: "
                          "set ppo.merge_lora: true (or leave ppo.land_kl unset)")
    if cfg.ppo.stop_kl_brake and cfg.ppo.stop_kl is None:
        raise ConfigError("ppo.stop_kl_brake slows PPO down as its KL nears ppo.stop_kl: set ppo.stop_kl too")
    if cfg.ppo.value_model == "none":
        if cfg.ppo.samples_per_prompt < 2:
            raise ConfigError("ppo.value_model=none takes its baseline from the other answers to the same prompt: "
                              f"set ppo.samples_per_prompt >= 2 (got {cfg.ppo.samples_per_prompt})")
        if cfg.ppo.critic_warmup_updates:
            raise ConfigError(f"ppo.critic_warmup_updates={cfg.ppo.critic_warmup_updates} warms up a value function "
                              "that ppo.value_model=none does not have: set it to 0")
    ppo_sizes(cfg.ppo, 1)


def config_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: PipelineConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), config_yaml(cfg))
