"""Stage bookkeeping: which settings and files each stage reads, its fingerprint, and its `_done.json`.

A leaf module: the stages and the orchestrator (`rlhf.pipeline`) import it; it imports no stage.

A stage's fingerprint hashes, chained with the fingerprint of the stage before it:
- the config fields it reads (`STAGE_INPUTS`), except those that cannot change a result (`NO_EFFECT`:
  logging and checkpoint cadence, tracking, threads, the device);
- the contents of every local file or folder those fields name (prompt sets, preference datasets,
  model folders, the GGUF file of the embedded default, the source file of a `module:function`
  judge) and, for a hub name, the revision in the local hub cache when there is one.

A finished stage writes `<stage>/_done.json`: its fingerprint, the settings and sources it hashed, the
`id` of this execution and the ids of the upstream executions it read. A stage is done when its
fingerprint is current and the stages before it are still the executions it read: an upstream stage
that was recomputed (`--force`) makes every later stage stale even when no setting changed. A stage
finished before a setting was added to the schema (`ADDED_SETTINGS`) stays done while that setting
holds the value that computes what the stage computed and its other settings, its sources and the
stages before it are unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from reward_models.judges import parse_reward_spec
from rlhf.config import PipelineConfig
from rlhf.models import ALIASES
from rlhf.prompts import resolve_path
from rlhf.utils import UserError, atomic_write_json, fingerprint, rlhf_command

STAGES = ("prefs", "reward", "ppo", "eval")
MARKER = "_done.json"

# Config fields each stage reads (a section name stands for all its fields), beyond those of the stages
# before it, whose fingerprints are chained in. tests/test_stages.py runs every stage with a config that
# records what it reads and fails on a field that is not covered here.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "prefs": ("run.seed", "model", "data.train_prompts", "data.prompt_column", "data.split",
              "data.max_prompt_tokens", "data.long_prompts", "prefs", "ppo.stop_tokens"),
    "reward": ("reward", "ppo.max_new_tokens", "ppo.temperature"),
    "ppo": ("ppo", "data.max_train_prompts"),
    "eval": ("eval", "data.test_prompts", "data.test_split"),
}
# Fields that change no result: they never make a stage rerun, and a killed PPO run resumes across them.
NO_EFFECT = ("run.name", "run.output_dir", "run.device", "run.threads", "ppo.sample_every", "ppo.save_every",
             "ppo.keep_checkpoints", "tracking")
# Settings added after runs were made, each with the value that computes what those runs computed: a finished
# stage whose record lacks one of them, now at that value, is still done (its fingerprint differs, its work not).
ADDED_SETTINGS = {"ppo.kl_loss_coef": 0.0, "ppo.samples_per_prompt": 1, "ppo.stop_kl": None, "ppo.stop_kl_brake": False,
                  "ppo.entropy_coef": 0.0, "ppo.land_kl": None}
# Fields that name files, folders, modules or hub repositories, whose contents enter the fingerprint.
SOURCE_FIELDS = {"model.policy": "model", "reward.backbone": "model", "data.train_prompts": "data",
                 "data.test_prompts": "data", "eval.prompts": "data", "prefs.dataset": "data",
                 "prefs.judge": "judge", "ppo.reward": "reward"}


def _covers(entry: str, key: str) -> bool:
    return key == entry or key.startswith(entry + ".")


def no_effect(key: str) -> bool:
    return any(_covers(entry, key) for entry in NO_EFFECT)


def reads(stage: str, key: str) -> bool:
    """Whether the fingerprint of `stage` covers the config field `key` (its own inputs or an earlier stage's)."""
    upto = STAGES[: STAGES.index(stage) + 1]
    return no_effect(key) or any(_covers(entry, key) for s in upto for entry in STAGE_INPUTS[s])


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: value}


def stage_inputs(cfg: PipelineConfig, stage: str) -> dict[str, Any]:
    """The stage's own config inputs as {dotted field: value}, fields of no effect left out."""
    d = cfg.to_dict()
    out = {}
    for entry in STAGE_INPUTS[stage]:
        node: Any = d
        for part in entry.split("."):
            node = node[part]
        out.update({k: v for k, v in _flatten(node, entry).items() if not no_effect(k)})
    return out


# ---------------------------------------------------------------------------------------------
# contents of the files a stage reads


_SEEN: dict[str, list] = {}  # this process's hashes, shared by every FileHashes


class FileHashes:
    """sha256 of files, reused while a file's size and mtime are unchanged (the cache is kept in markers)."""

    def __init__(self, known: dict[str, list] | None = None):
        self.known = _SEEN
        self.known.update(known or {})
        self.used: dict[str, list] = {}

    def file(self, path: Path) -> str:
        path = Path(path).resolve()
        st = path.stat()
        key = str(path)
        entry = self.known.get(key)
        if not (entry and entry[0] == st.st_size and entry[1] == st.st_mtime_ns):
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            entry = [st.st_size, st.st_mtime_ns, digest.hexdigest()]
            self.known[key] = entry
        self.used[key] = entry
        return entry[2]

    def folder(self, path: Path) -> str:
        """A hash of every file's relative path and contents (hidden files and folders left out)."""
        path = Path(path)
        items = []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                if not name.startswith("."):
                    full = Path(root) / name
                    items.append([str(full.relative_to(path)), self.file(full)])
        return fingerprint(items)

    def path(self, path: Path) -> str:
        return self.folder(path) if Path(path).is_dir() else self.file(path)


def _hub_revision(name: str, repo_type: str) -> str | None:
    """The commit of a hub repository in the local hub cache, if it is there (never asks the network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("config.json", "README.md"):
            found = try_to_load_from_cache(name, filename, repo_type=repo_type)
            if isinstance(found, str) and "/snapshots/" in found:
                return found.split("/snapshots/")[1].split("/")[0]
    except Exception:  # not a repo id, no cache: the name alone identifies it
        return None
    return None


def _module_source(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None) if spec else None
    return Path(origin) if origin and Path(origin).is_file() else None


def source_digest(kind: str, value: Any, hashes: FileHashes) -> str | None:
    """What identifies the contents behind a file, folder, model, judge or reward field; None: the value alone."""
    if not isinstance(value, str) or not value:
        return None
    if kind == "reward":  # `rm`, a judge, or a weighted sum of them: `rm:1.0,mymodule:fn:0.5`
        digests = [source_digest("judge", name, hashes) for name, _ in parse_reward_spec(value)]
        return fingerprint(digests) if any(digests) else None
    if kind == "judge":
        module, sep, _ = value.partition(":")
        if not sep or module in ("keyword",):
            return None
        source = _module_source(module)
        return hashes.file(source) if source else None
    if kind == "model":
        if value in ALIASES:
            package, filename = ALIASES[value]
            spec = importlib.util.find_spec(package)
            if spec and spec.submodule_search_locations:
                gguf = Path(list(spec.submodule_search_locations)[0]) / filename
                return hashes.file(gguf) if gguf.is_file() else None
            return None
        path = Path(value).expanduser()
        if path.exists():
            return hashes.path(path)
        return _hub_revision(value, "model")
    if kind == "data":
        path = resolve_path(value)
        if path is not None:
            return hashes.file(path)
        folder = Path(value).expanduser()
        if folder.is_dir():
            return hashes.folder(folder)
        return _hub_revision(value, "dataset")
    raise ValueError(f"unknown source kind {kind!r}")


def stage_sources(cfg: PipelineConfig, stage: str, hashes: FileHashes) -> dict[str, str]:
    inputs = stage_inputs(cfg, stage)
    out = {}
    for key, kind in SOURCE_FIELDS.items():
        if key in inputs:
            digest = source_digest(kind, inputs[key], hashes)
            if digest is not None:
                out[key] = digest
    return out


# ---------------------------------------------------------------------------------------------
# fingerprints and markers


def read_marker(run_dir: Path, stage: str) -> dict | None:
    try:
        marker = json.loads((Path(run_dir) / stage / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def known_hashes(run_dir: Path | None) -> FileHashes:
    known: dict[str, list] = {}
    if run_dir is not None:
        for stage in STAGES:
            marker = read_marker(run_dir, stage) or {}
            if isinstance(marker.get("file_hashes"), dict):
                known.update(marker["file_hashes"])
    return FileHashes(known)


def stage_records(cfg: PipelineConfig, run_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """Per stage: `inputs`, `sources` and the chained `fingerprint`, with the `hashes` cache used."""
    hashes = known_hashes(run_dir)
    previous = fingerprint({"seed": cfg.run.seed})
    out = {}
    for stage in STAGES:
        inputs, sources = stage_inputs(cfg, stage), stage_sources(cfg, stage, hashes)
        previous = fingerprint({"previous": previous, **inputs, "sources": sources})
        out[stage] = {"inputs": inputs, "sources": sources, "fingerprint": previous, "hashes": hashes}
    return out


def stage_fingerprints(cfg: PipelineConfig, run_dir: Path | None = None) -> dict[str, str]:
    return {stage: r["fingerprint"] for stage, r in stage_records(cfg, run_dir).items()}


def upstream_ids(run_dir: Path, stage: str) -> dict[str, str | None]:
    """The execution ids of the finished stages before `stage` (None where one has not finished)."""
    return {s: (read_marker(run_dir, s) or {}).get("id") for s in STAGES[: STAGES.index(stage)]}


def stage_identity(cfg: PipelineConfig, run_dir: Path, stage: str) -> str:
    """The fingerprint of `stage` together with the upstream executions it reads: what a PPO checkpoint
    must match to be resumed."""
    return fingerprint({"fingerprint": stage_fingerprints(cfg, run_dir)[stage], "upstream": upstream_ids(run_dir, stage)})


def why_not_done(cfg: PipelineConfig, run_dir: Path, stage: str, records: dict | None = None) -> str | None:
    """None when `stage` is done with this config and these upstream outputs, else the reason in words."""
    marker = read_marker(run_dir, stage)
    if marker is None:
        return "has not finished"
    records = records or stage_records(cfg, run_dir)
    record = records[stage]
    if marker.get("fingerprint") != record["fingerprint"]:
        if not same_work(marker, record):
            return "was run with other settings" + changed_settings(marker, record)
        for s in STAGES[: STAGES.index(stage)]:  # what the chained fingerprint covers: the stages before
            if (why := why_not_done(cfg, run_dir, s, records)) is not None:
                return f"reads the {s} stage, which {why}"
    recorded = marker.get("upstream", {})
    for s, current in upstream_ids(run_dir, stage).items():
        if current is None:
            return f"needs the {s} stage, which has not finished"
        if recorded.get(s) != current:
            return f"read outputs of the {s} stage that have been recomputed since"
    return None


def added_at_neutral(key: str, value) -> bool:
    """Whether `key` is a setting added to the schema since some runs (`ADDED_SETTINGS`), at the value that
    computes what those runs computed."""
    return key in ADDED_SETTINGS and value == ADDED_SETTINGS[key]


def changed_settings(marker: dict, record: dict) -> str:
    """What differs between a finished stage's record and the current one, in words (up to three items); a
    setting added since the stage ran counts only away from the value that computes what it computed."""
    old_inputs, old_sources = marker.get("inputs", {}), marker.get("sources", {})
    changed = [f"{k}: {old_inputs.get(k)!r} -> {v!r}" for k, v in record["inputs"].items()
               if k in old_inputs and old_inputs[k] != v]
    changed += [f"{k}: a setting the earlier run did not have, now {v!r}" for k, v in record["inputs"].items()
                if old_inputs and k not in old_inputs and not added_at_neutral(k, v)]
    changed += [f"contents of {k} ({record['inputs'][k]})" for k, v in record["sources"].items()
                if old_sources.get(k) != v and k in old_sources]
    return f" ({'; '.join(changed[:3])})" if changed else " (in this or an earlier stage)"


def same_work(marker: dict, record: dict) -> bool:
    """Whether a finished stage's recorded settings and sources are the current ones, once the settings added
    since it ran (`ADDED_SETTINGS`), at the value that computes what it computed, are left out."""
    old = marker.get("inputs")
    if not isinstance(old, dict) or marker.get("sources") != record["sources"]:
        return False
    current = {k: v for k, v in record["inputs"].items() if k in old or not added_at_neutral(k, v)}
    return json.loads(json.dumps(current)) == old  # as the marker stores them (lists, not tuples)


def is_done(cfg: PipelineConfig, run_dir: Path, stage: str) -> bool:
    return why_not_done(cfg, run_dir, stage) is None


def require_done(cfg: PipelineConfig, run_dir: Path, stage: str, needed_by: str) -> Path:
    """The folder of an upstream stage, or a UserError that says what to run first."""
    why = why_not_done(cfg, run_dir, stage)
    if why is not None:
        rlhf = rlhf_command()
        raise UserError(f"the {needed_by} stage needs the {stage} stage, which {why} in {run_dir}: "
                        f"run `{rlhf} {stage} CONFIG` (or `{rlhf} run CONFIG`) first")
    return Path(run_dir) / stage


def marker_for(cfg: PipelineConfig, run_dir: Path, stage: str, seconds: float) -> dict[str, Any]:
    record = stage_records(cfg, run_dir)[stage]
    return {"fingerprint": record["fingerprint"], "id": uuid.uuid4().hex, "upstream": upstream_ids(run_dir, stage),
            "inputs": record["inputs"], "sources": record["sources"], "file_hashes": record["hashes"].used,
            "seconds": round(seconds, 1), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}


def write_marker(folder: Path, marker: dict[str, Any]) -> None:
    atomic_write_json(Path(folder) / MARKER, marker)
