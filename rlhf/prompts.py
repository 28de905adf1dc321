"""Prompt sets: read them from seeds/, local files or hub datasets, and encode them for generation.

    prompts = load_prompts("seeds/prompts/sentiment_train.jsonl")
    encoded = encode_prompts(prompts, tokenizer, max_tokens=64)   # chat template, limit applied
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf.utils import UserError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def resolve_path(source: str) -> Path | None:
    """A local file for `source` (relative to the working directory, then to the project), or None."""
    for base in (Path.cwd(), PROJECT_ROOT):
        path = (base / source).expanduser()
        if path.is_file():
            return path
    return None


def read_text(path: Path) -> str:
    """A local file's text; a file that cannot be read or is not UTF-8 is a UserError naming it."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def parse_json_rows(path: Path, text: str) -> list[dict[str, Any]]:
    """Rows of a JSON list of objects or of JSON lines (one object per line, whatever the suffix);
    a line that does not parse is named by its number."""
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except ValueError as e:
            raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        lines = None
    else:
        rows, lines = [], []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise UserError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); "
                                f"fix or remove the line") from None
            lines.append(number)
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            where = f"line {lines[i]}" if lines is not None else f"item {i + 1}"
            raise UserError(f"{path}: {where} is a {type(row).__name__}, not an object of named columns")
    return rows


def load_rows(source: str, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/CSV/Parquet/TXT file or of a hub dataset split. A local file that is
    empty, not UTF-8 or not valid JSON is a UserError naming the file (and the line)."""
    path = resolve_path(source)
    if path is not None:
        kind = FILE_KINDS.get(path.suffix.lower())
        if kind is None:
            raise UserError(f"{path}: unsupported file type {path.suffix!r} (use {', '.join(FILE_KINDS)})")
        text = read_text(path) if kind != "parquet" else None
        if text is not None and not text.strip():
            raise UserError(f"{path} is empty")
        if kind == "text":
            return [{"text": line.strip()} for line in text.splitlines() if line.strip()]
        if kind == "json":
            return parse_json_rows(path, text)
        import datasets

        try:
            ds = datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as e:
            raise UserError(f"{path}: cannot read as {kind}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
        return ds.to_list()
    if source.startswith((".", "/", "~")) or Path(source).suffix.lower() in FILE_KINDS:
        raise UserError(f"prompt or data file not found: {source}")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:
        raise UserError(f"cannot load dataset {source!r} split {split!r}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}") from None
    return ds.to_list()


def load_prompts(source: str, column: str = "prompt", split: str = "train", limit: int = 0) -> list[Any]:
    """Prompts as plain strings or chat message lists; malformed rows are an error naming the row."""
    rows = load_rows(source, split)
    if rows and column not in rows[0] and "text" in rows[0] and len(rows[0]) == 1:
        column = "text"  # a plain-text file: one prompt per line
    prompts = []
    for i, row in enumerate(rows):
        if column not in row:
            raise UserError(f"{source}: row {i + 1} has no column {column!r} (columns: {', '.join(row)}); "
                            f"set data.prompt_column")
        value = row[column]
        if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value) and value:
            if value[-1].get("role") == "assistant":
                value = value[:-1]
            prompts.append(value)
        elif isinstance(value, str) and value.strip():
            prompts.append(value.strip())
        else:
            raise UserError(f"{source}: row {i + 1} column {column!r} is not a prompt string or a list of messages")
    if not prompts:
        raise UserError(f"{source}: no prompts found")
    return prompts[:limit] if limit > 0 else prompts


def prompt_text(prompt: Any) -> str:
    """The user-facing text of a prompt (the last user message of a conversation)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return users[-1] if users else prompt[-1]["content"]


def to_messages(prompt: Any, system_prompt: str | None) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and messages[0].get("role") != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_prompt(prompt: Any, tokenizer, use_chat_template: bool = True, system_prompt: str | None = None) -> str:
    """The text the model is conditioned on: the chat template with a generation prompt, when there is one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(to_messages(prompt, system_prompt), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) + "\nassistant:"


@dataclass
class EncodedPrompts:
    prompts: list[Any]  # the prompts kept, as given
    input_ids: list[list[int]]  # their token ids, each at most max_tokens long
    truncated: int  # prompts cut from the left to fit
    dropped: int  # prompts dropped for being too long


def encode_prompts(prompts: list[Any], tokenizer, max_tokens: int, long_prompts: str = "truncate_left",
                   use_chat_template: bool = True, system_prompt: str | None = None) -> EncodedPrompts:
    """Tokenise prompts for generation, truncating from the left or dropping those over `max_tokens`."""
    texts = [render_prompt(p, tokenizer, use_chat_template, system_prompt) for p in prompts]
    templated = use_chat_template and getattr(tokenizer, "chat_template", None)
    ids = tokenizer(texts, add_special_tokens=not templated)["input_ids"]
    kept, kept_ids, truncated, dropped = [], [], 0, 0
    for prompt, seq in zip(prompts, ids):
        if len(seq) > max_tokens:
            if long_prompts == "drop":
                dropped += 1
                continue
            seq = seq[-max_tokens:]
            truncated += 1
        kept.append(prompt)
        kept_ids.append(seq)
    if not kept:
        raise UserError(f"all {len(prompts)} prompts are longer than data.max_prompt_tokens={max_tokens} tokens")
    return EncodedPrompts(kept, kept_ids, truncated, dropped)


def encode_config_prompts(cfg, prompts: list[Any], tokenizer) -> EncodedPrompts:
    """`encode_prompts` with the config's prompt limit, long-prompt rule, chat template and system prompt."""
    return encode_prompts(prompts, tokenizer, cfg.data.max_prompt_tokens, cfg.data.long_prompts,
                          cfg.model.use_chat_template, cfg.model.system_prompt)
