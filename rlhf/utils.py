"""Small shared utilities: user errors and training faults, durable atomic writes, JSONL, fingerprints, seeding."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator


class UserError(Exception):
    """A problem the user can fix (bad input, missing file); the CLI prints it as one line and exits 2."""


def rlhf_command() -> str:
    """How to call `rlhf` again from the user's shell, for the commands that messages and reports name.

    `rlhf` when that is the program on PATH; else the console script as it was called (`.venv/bin/rlhf`
    after the quick start, which does not activate the venv); else `python -m rlhf.cli` with this
    interpreter (under `torchrun`, `accelerate launch` or in a notebook)."""
    import shlex
    import sys

    called = sys.argv[0] if sys.argv else ""
    on_path = shutil.which("rlhf")
    if Path(called).name == "rlhf" and Path(called).is_file():
        if on_path and os.path.samefile(on_path, called):
            return "rlhf"
        return shlex.quote(called)
    if on_path and Path(on_path).parent == Path(sys.executable).parent:
        return "rlhf"
    python = os.path.relpath(sys.executable)
    return f"{shlex.quote(sys.executable if python.startswith('..') else python)} -m rlhf.cli"


class TrainingFault(FloatingPointError):
    """A numerical fault that stops a stage before it saves anything: a non-finite score, loss, gradient or
    weight, or weights that exploded. The CLI prints it as one line and exits 3."""


@contextlib.contextmanager
def fault_context(where: str) -> Iterator[None]:
    """Prefix the message of a TrainingFault raised inside with `where`, e.g. the PPO update it stopped."""
    try:
        yield
    except TrainingFault as e:
        raise TrainingFault(f"{where}: {e}") from e


def warn(message: str) -> None:
    """One line on stderr about something recovered from (a damaged checkpoint skipped, a torn log line)."""
    print(f"rlhf: warning: {message}", file=sys.stderr)


def check_weights(parameters: Iterable[Any], where: str | None, hint: str, limit: float = 1e4, gather=None) -> None:
    """Raise a TrainingFault when a weight is not finite or larger than `limit` in magnitude (its message begins
    with `where`, unless None: a `fault_context` around the call names the place).

    Trained LM weights are O(1); one at 1e4 means the optimiser diverged (a learning rate of 1e30 takes every
    weight to ~1e30 in one Adam step, still finite in fp32). `gather` maps this process's largest magnitude to
    every process's (distributed runs), so all of them stop together."""
    import torch

    with torch.no_grad():
        norms = [torch.linalg.vector_norm(p.detach().float(), float("inf")) for p in parameters if p.numel()]
        worst = torch.stack(norms).max() if norms else torch.zeros(())
        if gather is not None:
            worst = gather(worst.reshape(1)).max()
        worst = worst.item()
    prefix = f"{where}: " if where is not None else ""
    if not math.isfinite(worst):
        raise TrainingFault(f"{prefix}weights are {worst} (not finite): {hint}")
    if worst > limit:
        raise TrainingFault(f"{prefix}weights exploded (largest |w| = {worst:.3g} > {limit:g}): {hint}")


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the OS.

    A training step frees and reallocates the same buffers every time (activations, gradients, the
    vocabulary-wide log-softmax and embedding gradients of ~100 MB). By default glibc serves blocks
    over 128 KiB with mmap, unmaps them on free and trims the heap, so each step page-faults its
    buffers in again; a page fault costs ~9 µs in this kind of VM, so 100k of them per fp32 PPO update
    cost ~1 s. With mmap off and trimming off, freed blocks stay mapped and are reused; resident
    memory does not shrink back after its peak. Returns False where glibc is not the allocator."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (files created, renamed or removed in it) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root`, so that a rename of `root` never exposes unwritten data."""
    for folder, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of it, even after
    a power cut: the file is fsynced before the rename and its folder after."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file the project wrote. A last line that does not parse is a write cut short (a
    kill, a power cut): it is dropped with a warning. Any other bad line is a UserError naming the line."""
    lines = Path(path).read_bytes().split(b"\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines[: last + 1]):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            if i == last:
                warn(f"{path}: dropped its last line {i + 1}, cut short by an interrupted write")
                break
            raise UserError(f"{path}:{i + 1}: not valid JSON ({e}); fix or remove that line") from None
    return rows


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` in one rename, after its files
    are fsynced (and the parent folder after the rename), so a renamed folder never holds half-written files."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        fsync_tree(tmp)  # the contents are on disk before the rename makes them visible
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fingerprint(obj: Any) -> str:
    """A stable short hash of a JSON-able object."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def set_seed(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batched(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
