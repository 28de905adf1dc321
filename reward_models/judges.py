"""Gold judges: plain Python functions of a response's text that return a float (higher is better).

    judge = get_judge("vader")          # VADER compound sentiment in [-1, 1]
    judge(["What a lovely day!"])       # -> [0.6...]

Names: `vader`, `length` (words), `keyword:WORD` (occurrences of WORD), or `module:function` for any
importable function that maps one text to a float.
"""

from __future__ import annotations

import functools
import importlib
import re
from typing import Callable

from rlhf.utils import UserError

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
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise UserError(f"judge {spec!r} cannot be imported: {e}") from None
    return lambda texts: [float(fn(t)) for t in texts]


JUDGES: dict[str, Judge] = {"vader": vader, "length": length}


def get_judge(name: str) -> Judge:
    """A judge by name (see the module docstring)."""
    if name in JUDGES:
        return JUDGES[name]
    if name.startswith("keyword:") and len(name) > len("keyword:"):
        return keyword(name.split(":", 1)[1])
    if ":" in name and not name.startswith("keyword:"):
        return _from_import(name)
    raise UserError(f"unknown judge {name!r}: use vader, length, keyword:WORD or module:function")
