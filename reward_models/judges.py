"""Gold judges: plain Python functions of a response's text that return a float (higher is better).

    judge = get_judge("vader")          # VADER compound sentiment in [-1, 1]
    judge(["What a lovely day!"])       # -> [0.6...]

Names: `vader`, `length` (words), `keyword:WORD` (occurrences of WORD), or `module:function` for any
importable function that maps one text to a float. `module:function` runs your code: the module is
imported (from the working directory or the Python path) when the config is checked, before any
stage starts. Every judge's scores are checked: a NaN or inf stops the stage with a TrainingFault.
`reward_function` turns the PPO reward spec (`ppo.reward`: `rm`, a judge, or a weighted sum) into one
scoring function.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
import re
import sys
from typing import Callable

import torch

from reward_models.model import load_scorer
from rlhf.utils import TrainingFault, UserError

Judge = Callable[[list[str]], list[float]]


@functools.lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader(texts: list[str]) -> list[float]:
    """VADER compound sentiment (Hutto & Gilbert 2014), whose lexicon was rated by human annotators."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(t)["compound"]) for t in texts]


def length(texts: list[str]) -> list[float]:
    return [float(len(t.split())) for t in texts]


def keyword(word: str) -> Judge:
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return lambda texts: [float(len(pattern.findall(t))) for t in texts]


def _from_import(spec: str) -> Judge:
    """The function `module:function`, imported now (the working directory first on the path, as with
    `python -m`); any failure to import it, or a name that is not a function, is a UserError."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # ImportError, AttributeError, and whatever the module raises as it loads (SyntaxError…)
        raise UserError(f"judge {spec!r} cannot be imported: {type(e).__name__}: {e}") from e  # --debug shows where
    if not callable(fn):
        raise UserError(f"judge {spec!r} is not a function of the text (it is {type(fn).__name__} {repr(fn)[:40]})")

    def judge(texts: list[str]) -> list[float]:
        scores = []
        for text in texts:
            try:
                value = fn(text)
            except Exception as e:
                raise UserError(f"judge {spec!r} raised {type(e).__name__}: {e} (on the response {text[:60]!r})") from e
            try:
                scores.append(float(value))
            except (TypeError, ValueError):
                raise UserError(f"judge {spec!r} returned {value!r} for {text[:60]!r}; it must return a number") from None
        return scores

    return judge


def checked(name: str, judge: Judge) -> Judge:
    """`judge`, raising a TrainingFault when a score is NaN or infinite: such a score would label pairs, or
    reward PPO, at random (NaN compares false with everything)."""
    def judge_checked(texts: list[str]) -> list[float]:
        scores = judge(texts)
        bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
        if bad:
            raise TrainingFault(f"judge {name!r} returned {scores[bad[0]]} for {len(bad)} of {len(texts)} responses "
                                f"(e.g. {texts[bad[0]][:60]!r}); it must return finite numbers")
        return scores

    return judge_checked


JUDGES: dict[str, Judge] = {"vader": vader, "length": length}


def get_judge(name: str) -> Judge:
    """A judge by name (see the module docstring), its scores checked to be finite."""
    if name in JUDGES:
        return checked(name, JUDGES[name])
    if name.startswith("keyword:") and len(name) > len("keyword:"):
        return checked(name, keyword(name.split(":", 1)[1]))
    if ":" in name and not name.startswith("keyword:"):
        return checked(name, _from_import(name))
    raise UserError(f"unknown judge {name!r}: use vader, length, keyword:WORD or module:function")


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """`rm`, `vader`, or `rm:1.0,vader:0.5` -> [(name, weight), ...]."""
    parts = []
    for item in spec.split(","):
        name, _, weight = item.strip().rpartition(":") if item.count(":") and _is_number(item.rsplit(":", 1)[1]) \
            else (item.strip(), "", "1")
        try:
            parts.append((name, float(weight)))
        except ValueError:
            raise UserError(f"ppo.reward: bad weight in {item!r}") from None
        if not name:
            raise UserError(f"ppo.reward: empty term in {spec!r}")
    return parts


def _is_number(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def reward_function(cfg, reward_dir, device, dtype) -> Callable[[list, list[str]], torch.Tensor]:
    """The PPO reward `ppo.reward` as one function (prompts, texts) -> scores (B,) on `device`: the weighted sum
    of the trained reward model in `reward_dir` ("rm") and of judges."""
    parts = []
    for name, weight in parse_reward_spec(cfg.ppo.reward):
        if name == "rm":
            parts.append((weight, load_scorer(reward_dir, cfg, device, dtype)))
        else:
            judge = get_judge(name)
            parts.append((weight, lambda p, t, judge=judge: torch.tensor(judge(t), dtype=torch.float32)))

    def score_fn(prompts, texts):
        return sum(w * fn(prompts, texts).float().to(device) for w, fn in parts)

    return score_fn
