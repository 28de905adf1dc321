"""Up-front checks of everything a run will read, done once before any stage starts.

    preflight(cfg, ["prefs", "reward", "ppo", "eval"])     # run_pipeline calls it with the stages it runs

`rlhf.config.validate` checks the values of a config; this checks what they point at, for the stages
that will run, cheapest first, so that a bad input fails within seconds, in one line, before any model
is loaded:

1. the run directory is a folder that can be written (or created);
2. judges and reward functions resolve (`prefs.judge`, `ppo.reward`); a `module:function` is imported
   here, which runs that module's code, and must be callable;
3. every prompt file and preference dataset a stage reads loads: it exists, decodes, is not empty,
   has the needed column, and (preference data) holds usable pairs;
4. model folders exist and hold safetensors weights; the policy's tokenizer loads (the embedded
   default is converted here, once); stop tokens are single tokens; at least one prompt of each set
   fits `data.max_prompt_tokens`, and enough training prompts remain for one PPO batch.

Each failure is a UserError that names the key and, for a file, the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

from reward_models.judges import get_judge, parse_reward_spec
from reward_models.prefs import load_pairs, split_by_prompt
from rlhf.config import PipelineConfig, ppo_sizes
from rlhf.generation import stop_token_ids
from rlhf.models import ALIASES, TINY_ALIASES, load_tokenizer
from rlhf.prompts import encode_config_prompts, load_prompts, load_rows
from rlhf.utils import UserError


def keyed(key: str, fn: Callable, *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)`, with the config key it serves named in front of any UserError it raises."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None


def preflight(cfg: PipelineConfig, stages: Iterable[str], check_output_dir: bool = True) -> None:
    """Check the run directory, judges, files, datasets, models and tokenization that `stages` will use."""
    stages = set(stages)
    if check_output_dir:
        check_run_dir(Path(cfg.run.output_dir))
    check_judges(cfg, stages)
    check_process_split(cfg, stages, int(os.environ.get("WORLD_SIZE", "1")))
    train, held_out = check_prompt_files(cfg, stages)
    if "prefs" in stages and cfg.prefs.source == "load":
        check_pair_dataset(cfg, "reward" in stages)
    for key, name in (("model.policy", cfg.model.policy), ("reward.backbone", cfg.reward.backbone)):
        if name is not None and (key == "model.policy" or "reward" in stages):
            check_model_folder(key, name)
    check_tokenization(cfg, stages, train, held_out)


def check_run_dir(path: Path) -> None:
    """`run.output_dir` is a writable folder, or the nearest folder above it that exists is writable."""
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(f"run.output_dir={path}: {existing} is a file, not a folder; choose another run.output_dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"run.output_dir={path}: cannot write in {existing.resolve()} (permission denied); "
                        f"choose another run.output_dir")


def check_process_split(cfg: PipelineConfig, stages: set[str], num_processes: int) -> None:
    """The batches of the training stages divide evenly among the processes of this launch."""
    if "ppo" in stages:
        ppo_sizes(cfg.ppo, num_processes)  # a ConfigError naming the setting
    if "reward" in stages and cfg.reward.batch_size % num_processes:
        raise UserError(f"reward.batch_size={cfg.reward.batch_size} must be divisible by the number of processes "
                        f"({num_processes})")


def check_judges(cfg: PipelineConfig, stages: set[str]) -> None:
    """Resolve the gold judge and the terms of `ppo.reward` the stages call (importing module:function ones)."""
    if cfg.prefs.judge and (stages & {"ppo", "eval"} or ("prefs" in stages and cfg.prefs.source == "simulate")):
        keyed("prefs.judge", get_judge, cfg.prefs.judge)
    if "ppo" in stages:
        for name, _ in parse_reward_spec(cfg.ppo.reward):
            if name != "rm":
                keyed("ppo.reward", get_judge, name)


def train_prompts_read(cfg: PipelineConfig, stages: set[str]) -> bool:
    """Whether a stage reads `data.train_prompts`: sampling for prefs, PPO, and the reward model's normalisation
    samples when the pairs were loaded rather than sampled from the policy."""
    return ("ppo" in stages or ("prefs" in stages and cfg.prefs.source == "simulate")
            or ("reward" in stages and cfg.prefs.source == "load"))


def eval_source(cfg: PipelineConfig) -> tuple[str, str, str]:
    """(key, source, split) of the eval prompts, as the eval stage reads them."""
    if cfg.eval.prompts is not None:
        return "eval.prompts", cfg.eval.prompts, cfg.data.split
    return "data.test_prompts", cfg.data.test_prompts, cfg.data.test_split


def check_prompt_files(cfg: PipelineConfig, stages: set[str]) -> tuple[list | None, list | None]:
    """The training and eval prompts the stages read (None for a set no stage reads), loaded and checked."""
    column = cfg.data.prompt_column
    train = held_out = None
    if train_prompts_read(cfg, stages):
        train = keyed("data.train_prompts", load_prompts, cfg.data.train_prompts, column, cfg.data.split)
    if "eval" in stages:
        key, source, split = eval_source(cfg)
        held_out = keyed(key, load_prompts, source, column, split, cfg.eval.num_prompts)
    return train, held_out


def check_pair_dataset(cfg: PipelineConfig, margins_needed: bool) -> None:
    """The preference dataset of `prefs.source: load` holds usable pairs, enough to hold out a test split."""
    rows = keyed("prefs.dataset", load_rows, cfg.prefs.dataset, cfg.prefs.dataset_split)
    pairs, _ = keyed("prefs.dataset", load_pairs, rows, cfg.prefs.dataset)
    if cfg.prefs.max_pairs > 0:
        pairs = pairs[: cfg.prefs.max_pairs]
    keyed("prefs.dataset", split_by_prompt, pairs, cfg.prefs.test_fraction, cfg.run.seed)
    if margins_needed and cfg.reward.use_margin and any("margin" not in p for p in pairs):
        raise UserError(f"reward.use_margin is set but {sum('margin' not in p for p in pairs)} pairs of "
                        f"{cfg.prefs.dataset} have no margin")


def check_model_folder(key: str, name: str) -> None:
    """A local model folder exists, with a config.json and safetensors weights (aliases and hub names pass)."""
    if name in ALIASES or name in TINY_ALIASES:
        return
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}: model folder {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise UserError(f"{key}: model folder {path} has no .safetensors weights (only safetensors are loaded: "
                            f"save it with save_pretrained(..., safe_serialization=True))")
    elif path.exists():
        raise UserError(f"{key}: {path} is a file; give a model folder or a hub name")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"{key}: model folder not found: {name}")


def check_tokenization(cfg: PipelineConfig, stages: set[str], train: list | None, held_out: list | None) -> None:
    """With the policy's tokenizer: stop tokens are single tokens, each prompt set keeps at least one prompt
    within `data.max_prompt_tokens`, and PPO keeps at least `ppo.batch_size` training prompts."""
    tokenizer = keyed("model.policy", load_tokenizer, cfg.model.policy, cfg.model.trust_remote_code)
    keyed("ppo.stop_tokens", stop_token_ids, tokenizer, cfg.ppo.stop_tokens)
    if "reward" in stages and cfg.reward.backbone:
        keyed("reward.backbone", load_tokenizer, cfg.reward.backbone, cfg.model.trust_remote_code)

    def encode(prompts):
        return encode_config_prompts(cfg, prompts, tokenizer)

    if train is not None:
        keyed("data.train_prompts", encode, train)
        if "ppo" in stages:
            limit = cfg.data.max_train_prompts
            enc = encode(train[:limit] if limit > 0 else train)
            if len(enc.prompts) < cfg.ppo.batch_size:
                dropped = f", {enc.dropped} dropped by data.long_prompts=drop" if enc.dropped else ""
                raise UserError(f"ppo.batch_size={cfg.ppo.batch_size} is more than the {len(enc.prompts)} training "
                                f"prompts of {cfg.data.train_prompts} (data.max_train_prompts={limit}{dropped}): "
                                f"lower ppo.batch_size or add prompts")
    if held_out is not None:
        keyed(eval_source(cfg)[0], encode, held_out)
