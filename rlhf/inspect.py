"""Look at a run: the terminal view behind `rlhf inspect RUN`, and loaders/plots for notebooks.

Everything reads the run directory's plain files (no W&B):
- `show_generations(run_dir, ...)`: eval generations (or the PPO samples of one update) side by
  side in the terminal, sorted, filtered and paged. Needs only `rich`.
- `load_run(run_dir)`: the run's metrics and generations as pandas DataFrames (pandas is in the
  `dev`/`notebook` extras); `plot_curves(run)`, `top_changes(generations)` and `side_by_side(...)`
  for notebooks/inspect_generations.ipynb.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rlhf.eval_math import METRICS
from rlhf.report import draw_curves, new_figure
from rlhf.utils import UserError, read_jsonl, rlhf_command

SORTS = ("gold_diff", "-gold_diff", "score_diff", "-score_diff", "kl", "-kl", "index")


# ---------------------------------------------------------------------------------------------
# files


def _run_dir(run_dir: Path | str) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    return run_dir


def _read(path: Path, what: str, stage: str) -> list[dict[str, Any]]:
    if not path.is_file():
        rlhf = rlhf_command()
        raise UserError(f"{path} not found: the {stage} stage has not written {what} in {path.parent.parent}; "
                        f"run `{rlhf} {stage} CONFIG` (or `{rlhf} run CONFIG`) with run.output_dir={path.parent.parent}")
    try:
        return read_jsonl(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSONL ({e})") from None


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _diff(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return None if a is None or b is None else a - b


def generation_rows(run_dir: Path | str) -> list[dict[str, Any]]:
    """eval/generations.jsonl with `index` (file order), `score_diff` and `gold_diff` (policy − reference)."""
    rows = _read(_run_dir(run_dir) / "eval" / "generations.jsonl", "generations", "eval")
    for i, r in enumerate(rows):
        r["index"] = i
        r["score_diff"] = _diff(r.get("policy_score"), r.get("ref_score"))
        r["gold_diff"] = _diff(r.get("policy_gold"), r.get("ref_gold"))
    return rows


def _sort_rows(rows: list[dict[str, Any]], sort: str, keys: dict[str, str]) -> list[dict[str, Any]]:
    """Sort by `keys[name]`; no minus: biggest first, minus: smallest first. Missing values go last."""
    if sort not in SORTS:
        raise UserError(f"unknown sort {sort!r}; choose one of {', '.join(SORTS)}")
    if sort == "index":
        return sorted(rows, key=lambda r: r["index"])
    ascending = sort.startswith("-")
    field = keys[sort.lstrip("-")]
    present = [r for r in rows if _num(r.get(field)) is not None]
    missing = [r for r in rows if _num(r.get(field)) is None]
    # stable: ties keep file order
    present.sort(key=lambda r: (r[field] if ascending else -r[field], r["index"]))
    return present + missing


def _filter(rows: list[dict[str, Any]], contains: str | None, fields: tuple[str, ...]) -> list[dict[str, Any]]:
    if not contains:
        return rows
    needle = contains.casefold()
    return [r for r in rows if any(needle in str(r.get(f) or "").casefold() for f in fields)]


def _page(rows: list, n: int, page: int) -> tuple[list, int, int, int]:
    """(rows of the page, pages, first, last) with 1-based first/last positions."""
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    pages = max(1, math.ceil(len(rows) / n))
    if page < 1 or page > pages:
        raise UserError(f"page {page} does not exist: {len(rows)} rows make {pages} page(s) of {n}")
    first = (page - 1) * n
    chunk = rows[first:first + n]
    return chunk, pages, first + 1, first + len(chunk)


def _footer(page: int, pages: int, first: int, last: int, total: int) -> str:
    text = f"page {page}/{pages}, rows {first}-{last} of {total}"
    return text + (f"; next: --page {page + 1}" if page < pages else "; last page")


# ---------------------------------------------------------------------------------------------
# terminal view


def _fmt(x: Any, signed: bool = False) -> str:
    v = _num(x)
    if v is None:
        return "—"
    return f"{v:+.3g}" if signed else f"{v:.3g}"


def _signed_text(label: str, x: Any):
    from rich.text import Text

    v = _num(x)
    style = "green" if v is not None and v > 0 else "red" if v is not None and v < 0 else "dim"
    return Text.assemble((f"{label} ", "bold"), (_fmt(x, signed=True), style))


def _body(text: Any, contains: str | None):
    from rich.text import Text

    t = Text(str(text if text is not None else ""))  # a Text, so brackets in model output are not markup
    if contains:
        t.highlight_words([contains], style="bold reverse", case_sensitive=False)
    return t


def _generation_table(r: dict[str, Any], contains: str | None):
    from rich import box
    from rich.table import Table
    from rich.text import Text

    title = Text.assemble((f"#{r['index']}  ", "bold cyan"), _signed_text("Δgold", r.get("gold_diff")),
                          "   ", _signed_text("ΔRM", r.get("score_diff")), "   ",
                          ("KL ", "bold"), _fmt(r.get("kl")))
    table = Table(title=title, title_justify="left", box=box.ROUNDED, expand=True, show_lines=False)
    has_gold = r.get("ref_gold") is not None or r.get("policy_gold") is not None

    def header(name: str, who: str) -> Text:
        parts = f"RM {_fmt(r.get(f'{who}_score'))}"
        if has_gold:
            parts += f" · gold {_fmt(r.get(f'{who}_gold'))}"
        if r.get(f"{who}_length") is not None:
            parts += f" · {_fmt(r.get(f'{who}_length'))} tok"
        return Text.assemble((name, "bold"), "\n", (parts, "dim"))

    table.add_column(Text("prompt\n", style="bold"), ratio=2)
    table.add_column(header("reference", "ref"), ratio=3)
    table.add_column(header("policy", "policy"), ratio=3)
    table.add_row(_body(r.get("prompt"), contains), _body(r.get("ref_response"), contains),
                  _body(r.get("policy_response"), contains))
    return table


def _samples_table(rows: list[dict[str, Any]], step: int, contains: str | None):
    from rich import box
    from rich.table import Table

    table = Table(title=f"PPO samples of update {step}", title_justify="left", box=box.ROUNDED, expand=True,
                  show_lines=True)
    table.add_column("#", justify="right", style="cyan", no_wrap=True)
    table.add_column("query", ratio=2)
    table.add_column("response", ratio=3)
    for name in ("score", "gold", "kl", "reward"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r["index"]), _body(r.get("query"), contains), _body(r.get("response"), contains),
                      _fmt(r.get("score")), _fmt(r.get("gold")), _fmt(r.get("kl")), _fmt(r.get("reward")))
    return table


def _parse_step(step: Any, available: list[int]) -> int:
    if isinstance(step, str) and step.strip().lower() in ("last", "latest", "-1"):
        return available[-1]
    try:
        value = int(step)
    except (TypeError, ValueError):
        raise UserError(f"--step must be an update number or 'last', got {step!r}") from None
    if value not in available:
        shown = ", ".join(map(str, available[:20])) + (", ..." if len(available) > 20 else "")
        raise UserError(f"no PPO samples for update {value}; updates with samples: {shown}")
    return value


def show_generations(run_dir: Path | str, n: int = 10, sort: str = "gold_diff", contains: str | None = None,
                     page: int = 1, step: int | str | None = None, console=None) -> None:
    """Print eval generations (or, with `step`, the PPO samples of that update) side by side.

    sort: `gold_diff` / `score_diff` (policy minus reference) or `kl`, biggest first; a leading `-`
    sorts smallest first; `index` keeps file order. `contains` keeps rows whose prompt or responses
    contain the text (case-insensitive). `n` rows per page, `page` from 1.
    """
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    run_dir = _run_dir(run_dir)
    if step is not None:
        _show_samples(run_dir, n, sort, contains, page, step, console)
        return
    rows = generation_rows(run_dir)
    notes = []
    if sort.lstrip("-") == "gold_diff" and all(r["gold_diff"] is None for r in rows):
        notes.append("no gold scores in this run (no gold judge): sorted by RM score difference instead")
        sort = sort.replace("gold_diff", "score_diff")
    rows = _sort_rows(rows, sort, {"gold_diff": "gold_diff", "score_diff": "score_diff", "kl": "kl"})
    total_all = len(rows)
    rows = _filter(rows, contains, ("prompt", "ref_response", "policy_response"))
    for note in notes:
        console.print(Text(note, style="yellow"))
    if not rows:
        console.print(Text(f"no generations contain {contains!r} (of {total_all} in {run_dir})", style="yellow")
                      if contains else Text(f"no generations in {run_dir}", style="yellow"))
        return
    chunk, pages, first, last = _page(rows, n, page)
    what = f"{run_dir / 'eval' / 'generations.jsonl'}: sorted by {sort}"
    if contains:
        what += f", containing {contains!r} ({len(rows)} of {total_all})"
    console.print(Text(what, style="dim"))
    for r in chunk:
        console.print(_generation_table(r, contains))
    console.print(Text(_footer(page, pages, first, last, len(rows)), style="bold"))


def _show_samples(run_dir: Path, n: int, sort: str, contains: str | None, page: int, step: Any, console) -> None:
    from rich.text import Text

    rows = _read(run_dir / "ppo" / "samples.jsonl", "PPO samples", "ppo")
    available = sorted({r.get("step") for r in rows if isinstance(r.get("step"), int)})
    if not available:
        raise UserError(f"{run_dir / 'ppo' / 'samples.jsonl'} holds no samples")
    update = _parse_step(step, available)
    rows = [r for r in rows if r.get("step") == update]
    for i, r in enumerate(rows):
        r["index"] = i
    # no reference responses here: the diffs sort by the sample's own gold / RM score
    if sort.lstrip("-") == "gold_diff" and all(_num(r.get("gold")) is None for r in rows):
        sort = sort.replace("gold_diff", "score_diff")
    rows = _sort_rows(rows, sort, {"gold_diff": "gold", "score_diff": "score", "kl": "kl"})
    total_all = len(rows)
    rows = _filter(rows, contains, ("query", "response"))
    if not rows:
        console.print(Text(f"no samples of update {update} contain {contains!r} (of {total_all})", style="yellow"))
        return
    chunk, pages, first, last = _page(rows, n, page)
    console.print(_samples_table(chunk, update, contains))
    console.print(Text(_footer(page, pages, first, last, len(rows)), style="bold"))


# ---------------------------------------------------------------------------------------------
# notebooks (pandas)


def _pandas():
    try:
        import pandas as pd
    except ImportError:
        raise UserError("load_run needs pandas: pip install pandas (or, in the project folder, "
                        "pip install -e '.[notebook]')") from None
    return pd


def load_run(run_dir: Path | str) -> dict:
    """The run's files as pandas objects; a missing file gives an empty frame.

    - `ppo_metrics`: one row per PPO update (ppo/metrics.jsonl), indexed by nothing, with a `step` column;
    - `samples`: ppo/samples.jsonl (step, query, response, score, kl, gold, reward);
    - `generations`: eval/generations.jsonl plus `score_diff` and `gold_diff` (policy − reference);
    - `eval_metrics`: eval/metrics.json as a Series.
    """
    pd = _pandas()
    run_dir = _run_dir(run_dir)

    def frame(path: Path):
        try:
            return pd.DataFrame(read_jsonl(path))
        except FileNotFoundError:
            return pd.DataFrame()

    generations = frame(run_dir / "eval" / "generations.jsonl")
    if not generations.empty:
        for what in ("score", "gold"):
            if {f"policy_{what}", f"ref_{what}"} <= set(generations.columns):
                generations[f"{what}_diff"] = (pd.to_numeric(generations[f"policy_{what}"], errors="coerce")
                                               - pd.to_numeric(generations[f"ref_{what}"], errors="coerce"))
    try:
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    except FileNotFoundError:
        metrics = {}
    order = [k for k in METRICS if k in metrics] + [k for k in metrics if k not in METRICS]
    metrics = {k: metrics[k] for k in order}
    return {
        "ppo_metrics": frame(run_dir / "ppo" / "metrics.jsonl"),
        "samples": frame(run_dir / "ppo" / "samples.jsonl"),
        "generations": generations,
        "eval_metrics": pd.Series(metrics, dtype=object, name="value"),
    }


def plot_curves(run: dict):
    """A matplotlib Figure of RM score, gold score and KL over PPO updates (and scores against KL)."""
    metrics = run.get("ppo_metrics")
    rows = [] if metrics is None or metrics.empty else metrics.to_dict("records")
    eval_metrics = run.get("eval_metrics")
    fig = new_figure(13, 4.2)
    notes = draw_curves(fig, rows, None if eval_metrics is None else dict(eval_metrics))
    if notes:
        fig.suptitle("; ".join(notes), fontsize=9, color="#a66")
    return fig


def top_changes(generations, n: int = 5, by: str = "gold"):
    """(improvements, regressions): the `n` prompts where policy minus reference `by` score
    ("gold" or "score") rose most, and the `n` where it fell most (only strict changes)."""
    if by not in ("gold", "score"):
        raise ValueError(f"by must be 'gold' or 'score', got {by!r}")
    pd = _pandas()
    diff = f"{by}_diff"
    g = generations.copy()
    if diff not in g.columns:
        if {f"policy_{by}", f"ref_{by}"} - set(g.columns):
            raise UserError(f"the generations have no {by} scores")
        g[diff] = pd.to_numeric(g[f"policy_{by}"], errors="coerce") - pd.to_numeric(g[f"ref_{by}"], errors="coerce")
    if g[diff].isna().all():
        raise UserError(f"the generations have no {by} scores (no gold judge?); try by='score'")
    columns = [c for c in ("prompt", "ref_response", "policy_response", f"ref_{by}", f"policy_{by}", diff, "kl")
               if c in g.columns]
    g = g[columns]
    improvements = g[g[diff] > 0].sort_values(diff, ascending=False, kind="stable").head(n)
    regressions = g[g[diff] < 0].sort_values(diff, ascending=True, kind="stable").head(n)
    return improvements, regressions


class side_by_side:  # noqa: N801 (used like a function in notebooks)
    """Show DataFrames next to each other in a notebook: `side_by_side(a, b, titles=("a", "b"))`."""

    def __init__(self, *frames, titles: tuple[str, ...] = ()):
        self.frames, self.titles = frames, titles

    def _repr_html_(self) -> str:
        import html

        cells = []
        for i, f in enumerate(self.frames):
            title = html.escape(self.titles[i]) if i < len(self.titles) else ""
            body = f.to_html(escape=True) if len(f) else "<p><i>none</i></p>"
            cells.append(f'<div style="flex:1;min-width:0;overflow-x:auto"><h4>{title}</h4>{body}</div>')
        return '<div style="display:flex;gap:16px;align-items:flex-start">' + "".join(cells) + "</div>"

    def __repr__(self) -> str:
        out = []
        for i, f in enumerate(self.frames):
            out.append((self.titles[i] if i < len(self.titles) else f"frame {i}") + "\n" + f.to_string())
        return "\n\n".join(out)
