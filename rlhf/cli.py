"""Command line: `rlhf run|prefs|reward|ppo|eval CONFIG [KEY=VALUE ...]`, `rlhf inspect RUN_DIR`, `rlhf bench`.

Exit codes: 0 done; 2 a user error (bad config, missing or malformed file, a judge that does not
import, a run directory that cannot be written...), found before any stage starts where it can be;
3 a training fault (a NaN or inf score, loss, gradient or weight, or weights that exploded), which
stops the stage before it saves anything; 130 interrupted. Errors and faults print one line on
stderr; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EPILOG = """overrides: dotted KEY=VALUE pairs applied over the YAML, e.g.
  ppo.kl_coef=0.1 run.output_dir=runs/try tracking.wandb=off
stages: prefs -> reward -> ppo -> eval; a finished stage is skipped while its config is unchanged.
judges: prefs.judge / ppo.reward = module:function imports that module and runs its code.
exit codes: 2 bad input (one line, before any stage starts), 3 a numerical fault in training
  (nothing saved from it; rerun with a fixed config), 130 interrupted (rerun to resume)."""

STAGE_HELP = {
    "prefs": "build preference pairs: load a dataset, or sample responses and label them with a gold judge",
    "reward": "train the reward model on the preference pairs",
    "ppo": "optimise the policy against the reward with PPO and a KL penalty to the reference",
    "eval": "compare reference and policy on held-out prompts: scores, KL, win rate, report",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="YAML config, e.g. configs/default.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. ppo.kl_coef=0.1")
    p.add_argument("--force", action="store_true", help="rerun the stage(s) even if done with this config")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description="RLHF with PPO for small causal LMs: preferences, reward model, PPO, evaluation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("run", help="run all stages in order (skipping finished ones)", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--from", dest="start", metavar="STAGE", help="rerun from this stage on")
    group.add_argument("--only", metavar="STAGE", help="run only this stage")
    for stage, text in STAGE_HELP.items():
        p = sub.add_parser(stage, help=text, description=text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_args(p)
    p = sub.add_parser("inspect", help="show a run's generations side by side in the terminal")
    p.add_argument("run_dir", help="run directory (run.output_dir)")
    p.add_argument("--n", type=int, default=10, help="rows per page (default 10)")
    p.add_argument("--sort", default="gold_diff",
                   choices=["gold_diff", "-gold_diff", "score_diff", "-score_diff", "kl", "-kl", "index"],
                   help="order rows by policy-minus-reference gold or RM score, or by KL (prefix - for ascending)")
    p.add_argument("--contains", default=None, help="only rows whose prompt or responses contain this text")
    p.add_argument("--page", type=int, default=1, help="page number (default 1)")
    p.add_argument("--step", default=None,
                   help="show the PPO samples of this update (a number, or 'last') instead of eval generations")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p = sub.add_parser("bench", help="time PPO updates by phase and compare with the machine's matmul peak")
    _add_config_args(p)
    p.add_argument("--updates", type=int, default=4, help="PPO updates to time (the first is excluded)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")
    return parser


def _run(args: argparse.Namespace) -> int:
    from rlhf.distributed import quiet_deepspeed_on_cpu

    quiet_deepspeed_on_cpu()  # before accelerate is imported
    from rlhf.config import load_config
    from rlhf.pipeline import run_pipeline

    if args.command == "inspect":
        from rlhf.inspect import show_generations

        show_generations(Path(args.run_dir), n=args.n, sort=args.sort, contains=args.contains, page=args.page,
                         step=args.step)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "bench":
        from rlhf.bench import run_bench
        from rlhf.preflight import preflight

        preflight(cfg, ["ppo"], check_output_dir=False)  # the bench writes to a scratch folder
        run_bench(cfg, updates=args.updates, json_out=args.json_out)
        return 0
    if args.command == "run":
        outputs = run_pipeline(cfg, only=args.only, start=args.start, force=args.force)
    else:
        outputs = run_pipeline(cfg, only=args.command, force=args.force)
    _summary(cfg, outputs)
    return 0


def _summary(cfg, outputs: dict[str, Path]) -> None:
    """Where the outputs are, and the command that shows the generations, each on one line to copy."""
    import shlex

    from rich.console import Console
    from rich.markup import escape

    from rlhf.utils import rlhf_command

    console = Console(stderr=True, soft_wrap=True)
    console.print(f"\n[bold]run directory[/bold]: {escape(str(cfg.run.output_dir))}")
    for stage, path in outputs.items():
        console.print(f"  {stage:<7} {escape(str(path))}")
    report = Path(cfg.run.output_dir) / "eval" / "report.html"
    if "eval" in outputs and report.exists():
        command = f"{rlhf_command()} inspect {shlex.quote(str(cfg.run.output_dir))}"
        console.print(f"  report  {escape(str(report))}\n  inspect: {escape(command)}")


def describe_os_error(e: OSError) -> str:
    """One line for an OS error on a path: what failed, where, and that the path is the user's to fix."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
    return f"{e.strerror or e}{': ' + where if where else ''} (check the path, its permissions and free space)"


def main(argv: list[str] | None = None) -> int:
    from rlhf.config import ConfigError
    from rlhf.utils import TrainingFault, UserError, keep_freed_memory

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # overrides may also follow options (`--only ppo a.b=1`)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()
    debug = getattr(args, "debug", False)
    try:
        return _run(args)
    except (ConfigError, UserError) as e:
        if debug:
            raise
        print(f"rlhf: error: {e}", file=sys.stderr)
        return 2
    except TrainingFault as e:
        if debug:
            raise
        print(f"rlhf: training fault: {e} (the stage stopped; nothing was saved from it)", file=sys.stderr)
        return 3
    except OSError as e:  # a run directory that cannot be written, a full disk, a file that vanished
        if debug:
            raise
        print(f"rlhf: error: {describe_os_error(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rlhf: interrupted; finished stages and checkpoints are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
