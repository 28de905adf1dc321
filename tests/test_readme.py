"""The README's commands, tried as a new user would after the quick start, so that none rots silently.

Every command of the README's shell blocks, and every inline `.venv/bin/...` command, must match one
entry of COMMANDS below, which says how this test treats it:
- run as written, in the project folder, with `.venv/bin/` the bin folder of this interpreter and
  `runs/default` the session's tiny run (tests/conftest.py), the stand-in for the default run;
- checked without its side effect (an installer, a browser, a notebook server): what it would use is
  there, or an earlier README command installs it;
- skipped by design with the reason (a GPU, several GPUs, the peer's venv).
A README command that matches no entry fails `test_every_readme_command_is_covered`: whoever adds or
changes one says here how it is checked. The quick start never activates `.venv`, so a tool that the
venv provides must be called as `.venv/bin/TOOL`.

The rest checks what the CLI names elsewhere: each inline `rlhf ...` of the README and each example in
`--help` parses and loads; the commands that a run prints, that its report shows and that error
messages suggest work.
"""

from __future__ import annotations

import html
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from rlhf.cli import build_parser
from rlhf.config import load_config

PROJECT_ROOT = Path(__file__).resolve().parent.parent
README = PROJECT_ROOT / "README.md"
BIN = Path(sys.executable).parent  # `.venv/bin` of the quick start when the tests run as it says
NOTEBOOK = "notebooks/inspect_generations.ipynb"
SYSTEM_TOOLS = {"python", "python3", "bash"}  # on PATH without the venv
# The packages, any of which brings a `jupyter SUBCOMMAND` (jupyter-notebook depends on nbconvert).
JUPYTER_PROVIDERS = {"notebook": {"jupyter", "notebook"}, "nbconvert": {"jupyter", "notebook", "nbconvert"}}


# ---------------------------------------------------------------------------------------------
# the README's commands


def readme_commands(text: str) -> list[str]:
    """The commands of the README's shell blocks (comments dropped, `\\` continuations joined,
    `&&` chains split), then its inline `.venv/bin/...` commands."""
    commands = []
    for block in re.findall(r"^```(?:bash|sh|shell)\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line).strip()
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    commands += [" ".join(span.split()) for span in re.findall(r"`(\.venv/bin/[^`]+)`", text)]
    return list(dict.fromkeys(commands))  # each once, where it first appears


def pyproject_extras() -> dict[str, set[str]]:
    """Optional-dependency groups of pyproject.toml: extra -> names of the packages it requires."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    return {extra: {re.match(r"[A-Za-z0-9_.-]+", req).group().lower() for req in reqs}
            for extra, reqs in project.get("optional-dependencies", {}).items()}


def installed_extras(commands: list[str]) -> set[str]:
    """The extras that `.venv/bin/pip install -e '.[EXTRA,...]'` commands among `commands` install."""
    extras = set()
    for command in commands:
        m = re.fullmatch(r"\.venv/bin/pip install -e '?\.\[([\w,-]+)\]'?", command)
        if m:
            extras |= set(m.group(1).split(","))
    return extras


def executable_problem(command: str) -> str | None:
    """Why the command's program would not be found after the quick start, or None."""
    words = [w for w in shlex.split(command) if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # VAR=value prefixes
    program = words[0]
    if program.startswith(".venv/bin/"):
        if (BIN / program.removeprefix(".venv/bin/")).exists():
            return None
        return f"{program} is not installed by scripts/setup.sh"
    if "/" not in program and program not in SYSTEM_TOOLS and (BIN / program).exists():
        return f"`{program}` lives in .venv/bin, which the quick start does not put on PATH: write .venv/bin/{program}"
    return None


@dataclass
class Context:
    """What a check needs: the README's commands before this one, and the session's tiny run on demand."""
    earlier: list[str]
    request: pytest.FixtureRequest

    @property
    def run_dir(self) -> Path:
        return self.request.getfixturevalue("tiny_run_dir")

    def shell(self, command: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
        """The README command as written, `.venv/bin/` and `runs/default` mapped as the module docstring says."""
        command = command.replace(".venv/bin/", f"{shlex.quote(str(BIN))}/").replace("runs/default", shlex.quote(str(self.run_dir)))
        return subprocess.run(command, shell=True, executable="/bin/bash", cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "COLUMNS": "200", **(env or {})})


def check_setup(command: str, ctx: Context) -> None:
    proc = subprocess.run(["bash", "-n", "scripts/setup.sh"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def check_default_run(command: str, ctx: Context) -> None:
    load_config(PROJECT_ROOT / "configs" / "default.yaml", [])  # the config it names loads
    check_tiny_run(command, ctx)


def check_tiny_run(command: str, ctx: Context) -> None:
    tiny_run = ctx.request.getfixturevalue("tiny_run")
    assert tiny_run.command[-4:-2] == ["run", str(PROJECT_ROOT / "configs" / "tiny.yaml")], tiny_run.command
    assert (tiny_run.run_dir / "eval" / "report.html").is_file()


def check_inspect(command: str, ctx: Context) -> None:
    from rlhf.inspect import generation_rows

    proc = ctx.shell(command)
    assert proc.returncode == 0, proc.stderr
    rows = generation_rows(ctx.run_dir)
    shown = [int(i) for i in re.findall(r"^#(\d+)\s+Δgold", proc.stdout, re.M)]
    assert shown and rows[shown[0]]["gold_diff"] == max(r["gold_diff"] for r in rows), proc.stdout[:2000]


def check_memory_plan(command: str, ctx: Context) -> None:
    """As written (without `ctx.shell`, which would build the tiny run it does not need); every row it
    prints is in the README's table."""
    proc = subprocess.run(command.replace(".venv/bin/", f"{BIN}/"), shell=True, cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| Qwen2.5-")]
    assert rows and all(row in README.read_text() for row in rows), proc.stdout


def check_report_exists(command: str, ctx: Context) -> None:
    path = ctx.run_dir / shlex.split(command)[-1].removeprefix("runs/default/")
    assert path.is_file() and path.read_text().startswith("<!DOCTYPE html>"), path


def check_extra(command: str, ctx: Context) -> None:
    extras = pyproject_extras()
    named = installed_extras([command])
    assert named and named <= set(extras), f"{command}: pyproject.toml has the extras {sorted(extras)}"


def jupyter_available(subcommand: str, ctx: Context) -> bool:
    """True when `jupyter SUBCOMMAND` is installed here; else an earlier README command must install it."""
    if (BIN / f"jupyter-{subcommand}").exists():
        return True
    extras = pyproject_extras()
    brought = set().union(*(extras.get(e, set()) for e in installed_extras(ctx.earlier)))
    assert brought & JUPYTER_PROVIDERS[subcommand], \
        f"`jupyter {subcommand}` is not installed by scripts/setup.sh, and no README command before it installs it"
    return False


def execute_notebook(path: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """Run the notebook as Jupyter and nbconvert do (the kernel starts in the notebook's folder), on
    `run_dir` named relative to the project folder, as a user names runs. Returns the executed notebook."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("pandas")
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("RLHF_RUN_DIR", os.path.relpath(run_dir, PROJECT_ROOT))
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    return nb


def check_notebook_server(command: str, ctx: Context) -> None:
    assert (PROJECT_ROOT / shlex.split(command)[-1]).is_file()
    if jupyter_available("notebook", ctx):
        proc = ctx.shell(".venv/bin/jupyter notebook --version")
        assert proc.returncode == 0, proc.stderr


def check_nbconvert(command: str, ctx: Context) -> None:
    """As written where nbconvert is installed; else the notebook is executed the way nbconvert does it."""
    run_dir = ctx.run_dir
    if jupyter_available("nbconvert", ctx):
        proc = ctx.shell(command, env={"RLHF_RUN_DIR": os.path.relpath(run_dir, PROJECT_ROOT)})
        assert proc.returncode == 0, proc.stderr
        page = (run_dir / (Path(NOTEBOOK).stem + ".html")).read_text()
        assert "data:image/png" in page and "improvements" in page and "policy_gold" in page
        return
    nb = execute_notebook(PROJECT_ROOT / NOTEBOOK, run_dir, ctx.request.getfixturevalue("monkeypatch"))
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "plot_curves(run) showed no figure"
    pages = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("improvements" in h and "regressions" in h for h in pages) and any("policy_gold" in h for h in pages)


def check_wandb_sync(command: str, ctx: Context) -> None:
    proc = ctx.shell(".venv/bin/wandb sync --help")
    assert proc.returncode == 0 and "offline" in proc.stdout, proc.stderr


@dataclass(frozen=True)
class Rule:
    pattern: str                 # a regular expression the whole command matches
    how: str                     # what is run or checked instead of it, or why it is skipped
    check: Callable[[str, Context], None] | None = None  # None: skipped by design


COMMANDS = [
    Rule(r"bash scripts/setup\.sh", "made the environment this test runs in (CI runs it first); its syntax is "
         "checked", check_setup),
    Rule(r"\.venv/bin/rlhf run configs/default\.yaml", "the default run takes 10-17 min on 2 cores: the config "
         "loads, and the tiny run stands in for it", check_default_run),
    Rule(r"\.venv/bin/rlhf run configs/tiny\.yaml", "the session's tiny run is this command", check_tiny_run),
    Rule(r"\.venv/bin/python -m pytest -q", "the command that runs this test"),
    Rule(r"\.venv/bin/rlhf inspect runs/default", "run on the tiny run", check_inspect),
    Rule(r"xdg-open runs/default/eval/report\.html", "opens a browser: the file it opens is checked",
         check_report_exists),
    Rule(r"\.venv/bin/pip install -e '\.\[[\w,-]+\]'", "installs packages: the extras it names are checked in "
         "pyproject.toml", check_extra),
    Rule(rf"\.venv/bin/jupyter notebook {NOTEBOOK}", "starts a notebook server and a browser: the notebook "
         "exists, `jupyter notebook` is installed or an earlier command installs it", check_notebook_server),
    Rule(rf"\.venv/bin/jupyter nbconvert --execute --to html {NOTEBOOK} --output-dir runs/default",
         "run as written where nbconvert is installed, else the notebook runs as nbconvert runs it; on the "
         "tiny run either way", check_nbconvert),
    Rule(r"\.venv/bin/wandb sync runs/<name>/wandb/offline-\*", "needs the W&B service and an account: "
         "`wandb sync --help` instead", check_wandb_sync),
    Rule(r"\.venv/bin/accelerate launch --config_file configs/accelerate/zero3\.yaml --num_processes 2 "
         r"-m rlhf\.cli ppo configs/tiny\.yaml",
         "tests/test_distributed.py launches the same command for every shipped config (tests/distributed_launch.py) "
         "on a copy of a tiny run"),
    Rule(r"\.venv/bin/torchrun --nproc_per_node 2 -m rlhf\.cli ppo configs/tiny\.yaml",
         "two CPU processes over gloo: tests/test_ppo.py::test_two_cpu_processes runs the same command"),
    Rule(r"\.venv/bin/python benchmarks/memory_plan\.py --gpus 8", "as written, its table against the README's",
         check_memory_plan),
    Rule(r"\.venv/bin/python benchmarks/ppo_study\.py runs/default( \S+)*", "reruns PPO and eval on the default "
         "run (tens of minutes on 2 cores): tests/test_ppo_study.py runs the script on the tiny run"),
    Rule(r"python -m venv \.peer-venv", "the peer's venv (TRL 1.12 and a second torch, downloaded)"),
    Rule(r"\.peer-venv/bin/pip install .*", "the peer's venv (TRL 1.12 and a second torch, downloaded)"),
    Rule(r"bash benchmarks/side_by_side\.sh .*", "needs the peer's venv, and tens of minutes"),
]

README_COMMANDS = readme_commands(README.read_text())


def rule_for(command: str) -> Rule | None:
    return next((r for r in COMMANDS if re.fullmatch(r.pattern, command)), None)


def test_the_readme_has_commands():
    assert len(README_COMMANDS) >= 8 and ".venv/bin/rlhf inspect runs/default" in README_COMMANDS


def test_every_readme_command_is_covered():
    unknown = [c for c in README_COMMANDS if rule_for(c) is None]
    assert not unknown, f"README commands this test does not know how to check (add them to COMMANDS): {unknown}"


@pytest.mark.parametrize("index", range(len(README_COMMANDS)), ids=[c[:70] for c in README_COMMANDS])
def test_readme_command(index, request):
    command = README_COMMANDS[index]
    problem = executable_problem(command)
    assert problem is None, problem
    rule = rule_for(command)
    if rule is None:
        pytest.fail(f"no entry in COMMANDS for {command!r}")
    if rule.check is None:
        for path, name in re.findall(r"(tests/\w+\.py)::(\w+)", rule.how):  # a test said to cover it exists
            assert f"def {name}(" in (PROJECT_ROOT / path).read_text(), rule.how
        pytest.skip(f"by design: {rule.how}")
    rule.check(command, Context(README_COMMANDS[:index], request))


# ---------------------------------------------------------------------------------------------
# what the README, --help, a run and error messages name


def subcommands() -> set[str]:
    parser = build_parser()
    return set(next(a for a in parser._actions if a.dest == "command").choices)


def parse_cli(command: str) -> None:
    """Parse `rlhf ...` as the CLI does and load its config and overrides (no model is built)."""
    words = shlex.split(command)[1:]
    try:
        args, extra = build_parser().parse_known_args(words)
    except SystemExit:
        pytest.fail(f"`{command}` does not parse (see the usage error above)")
    assert not [w for w in extra if w.startswith("-") or "=" not in w], f"`{command}`: unknown arguments {extra}"
    if hasattr(args, "config"):
        assert (PROJECT_ROOT / args.config).is_file(), f"`{command}`: no such config {args.config}"
        load_config(PROJECT_ROOT / args.config, [*args.overrides, *extra])


def test_notebook_is_committed_without_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(PROJECT_ROOT / NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code), \
        "commit the notebook with its outputs cleared"


def test_readme_inline_rlhf_commands_parse():
    """Each inline `rlhf ...` of the README names a real command whose options parse and whose config and
    overrides load; placeholders become examples (CONFIG: the tiny config) and `[optional parts]` go."""
    examples = {"CONFIG": "configs/tiny.yaml", "RUN_DIR": "runs/tiny", "STAGE": "ppo", "N": "2"}
    spans = [" ".join(s.split()) for s in re.findall(r"`(rlhf [^`]+)`", README.read_text())]
    assert len(spans) >= 10
    for span in spans:
        command = re.sub(r"\s*\[[^]]*\]", "", span)
        command = " ".join(examples.get(w, w) for w in command.split())
        if len(command.split()) == 2:  # a name (`rlhf run takes --from ...`)
            assert command.split()[1] in subcommands(), span
        else:
            parse_cli(command)


def test_help_names_what_exists():
    """Every `--help`: the configs it names exist, its KEY=VALUE examples load, the commands it names exist."""
    base = [str(BIN / "rlhf")] if (BIN / "rlhf").exists() else [sys.executable, "-m", "rlhf.cli"]
    for command in ["", *sorted(subcommands())]:
        proc = subprocess.run([*base, *command.split(), "--help"], capture_output=True, text=True, timeout=60,
                              cwd=PROJECT_ROOT)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        for path in re.findall(r"\bconfigs/[\w./-]+\.yaml", text):
            assert (PROJECT_ROOT / path).is_file(), f"rlhf {command} --help names {path}"
        overrides = re.findall(r"\b[a-z_]+\.[a-z_.]+=\S+", text)
        load_config(PROJECT_ROOT / "configs" / "tiny.yaml", overrides)
        for name in re.findall(r"\brlhf (\w+)", text):
            assert name in subcommands(), f"rlhf {command} --help names `rlhf {name}`"


def test_commands_a_run_prints_and_its_report_shows(tiny_run):
    """The `inspect:` line printed at the end of `rlhf run` and the report's "All rows" command, as shown."""
    printed = re.search(r"^  inspect: (.+)$", tiny_run.proc.stderr, re.M)
    assert printed, tiny_run.proc.stderr[-2000:]
    page = (tiny_run.run_dir / "eval" / "report.html").read_text()
    shown = re.search(r"All rows: <code>(.+?)</code>", page)
    assert shown
    for command in (printed.group(1), html.unescape(shown.group(1))):
        proc = subprocess.run(command, shell=True, executable="/bin/bash", cwd=PROJECT_ROOT, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0 and "page 1/" in proc.stdout, (command, proc.stderr)


def test_error_messages_name_commands_that_work(tmp_path):
    """The commands that user errors suggest exist, called the way the user called `rlhf`: after the
    quick start, `.venv/bin/rlhf` (the venv is not on PATH)."""
    script = BIN / "rlhf"
    if not script.exists():
        pytest.skip("no console script next to this interpreter")
    cwd, env = BIN.parent.parent, {**os.environ, "PATH": "/usr/bin:/bin"}  # the folder that holds the venv
    called = os.path.relpath(script, cwd)
    (tmp_path / "run").mkdir()
    proc = subprocess.run([called, "inspect", str(tmp_path / "run")], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    suggested = re.findall(r"`(\S+) (\w+) CONFIG`", proc.stderr)
    assert suggested == [(called, "eval"), (called, "run")], proc.stderr
    for program, name in suggested:
        proc = subprocess.run([program, name, "--help"], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr

    proc = subprocess.run([called, "ppo", str(PROJECT_ROOT / "configs" / "tiny.yaml"),
                           f"run.output_dir={tmp_path / 'run'}"], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    named = re.findall(r"`\S*rlhf(?:\.cli)? (\w+) CONFIG`", proc.stderr)
    assert named and set(named) <= subcommands(), proc.stderr


def test_pandas_message_names_an_extra_that_exists(monkeypatch):
    from rlhf.inspect import _pandas
    from rlhf.utils import UserError

    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(UserError) as e:
        _pandas()
    extras = re.findall(r"pip install -e '\.\[(\w+)\]'", str(e.value))
    assert extras and set(extras) <= set(pyproject_extras()) and "pandas" in pyproject_extras()[extras[0]]
