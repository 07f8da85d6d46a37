"""The `greentune` command: parses arguments and calls the library; nothing else.

A `UserError` becomes one line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from greentune.cli_types import OneLineParser, count, real
from greentune.errors import UserError, is_user_os_error, os_error_line
from greentune.formats import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS, EXPORT_QUANT_HELP
from greentune.recipe import MAX_EXPERTS
from greentune.train.signals import Stopped, exit_code


def _cmd_train(ns) -> int:
    from greentune.train import launch

    if ns.nproc is not None and ns.nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {ns.nproc}")
    if launch.wanted(ns.nproc):
        argv = (
            ["--verbose"] * ns.verbose
            + ["train", ns.recipe]
            + (["--run-dir", ns.run_dir] if ns.run_dir else [])
        )
        return launch.launch(argv + ["--resume"] * ns.resume + ["--quiet"] * ns.quiet, ns.nproc)
    from greentune.pipeline import train
    from greentune.train.signals import raise_on_sigterm

    raise_on_sigterm()  # outside the training loop (which checkpoints first) SIGTERM still cleans up
    result = launch.run_rank(
        lambda: train(ns.recipe, run_dir=ns.run_dir, resume=ns.resume, progress=not ns.quiet)
    )
    if isinstance(result, int):  # this rank lost its peers
        return result
    if result.signal:
        print(
            f"greentune: {result.stopped} after step {result.steps}, with a checkpoint; continue with "
            "--resume",
            file=sys.stderr,
        )
        return exit_code(result.signal)
    if result.stopped:
        print(f"stopped at step {result.steps}: {result.stopped}; continue with --resume")
        return 0
    ppl = f"{result.eval_ppl:.3f}" if result.eval_ppl is not None else "n/a"
    print(
        f"trained {result.steps} steps, {result.tokens:,} tokens in {result.seconds:.1f} s; "
        f"eval perplexity {ppl}; run dir {result.run_dir}"
    )
    return 0


def _cmd_eval(ns) -> int:
    from greentune.inference import run_eval_command

    return run_eval_command(ns)


def _cmd_demo(ns) -> int:
    from greentune.demo.run import run_demo

    run_demo(out_dir=Path(ns.out), quick=ns.quick)
    return 0


def _cmd_meter(ns) -> int:
    from greentune.energy.command import run_meter

    argv = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
    return run_meter(argv, region=ns.region, as_json=ns.json)


def _cmd_report(ns) -> int:
    from greentune.report import write_report

    json_path, html_path = write_report(Path(ns.run_dir))
    print(f"wrote {html_path} and {json_path}")
    return 0


def _cmd_upcycle(ns) -> int:
    from greentune.moe import upcycle

    out = upcycle(ns.model_dir, ns.out, experts=ns.experts, top_k=ns.top_k, seed=ns.seed, force=ns.force)
    print(f"wrote a {ns.experts}-expert top-{ns.top_k} Mixtral-architecture model to {out}")
    return 0


def _cmd_export(ns) -> int:
    from greentune.export.command import export_target

    for path in export_target(Path(ns.target), ns.format, ns.quant, Path(ns.out) if ns.out else None):
        print(f"wrote {path}")
    return 0


def _version_line() -> str:
    """`greentune X.Y.Z (torch A, transformers B, Python C)`: what a bug report needs."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from greentune import __version__

    def ver(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (
        f"greentune {__version__} (torch {ver('torch')}, transformers {ver('transformers')}, "
        f"Python {platform.python_version()})"
    )


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    """`greentune eval`'s engine and throughput options (greentune.inference)."""
    p.add_argument(
        "--engine",
        choices=["torch", "llamacpp"],
        default="torch",
        help="torch: the PyTorch model; llamacpp: the exported GGUF in llama.cpp (xllamacpp)",
    )
    p.add_argument(
        "--prompt-tokens",
        type=count(1),
        default=None,
        help="prompt length for prompt processing (default 256, shortened to fit the model)",
    )
    p.add_argument(
        "--gen-tokens",
        type=count(1),
        default=None,
        help="greedy tokens per generation (default 128, shortened to fit the model)",
    )
    p.add_argument("--threads", type=count(1, 1024), default=None, help="CPU threads (default: all usable)")
    p.add_argument(
        "--seconds",
        type=real(0, 3600),
        default=2.0,
        help="meter each of prompt/generation at least this long",
    )
    p.add_argument(
        "--gguf", default=None, metavar="QUANT", help="which of a run's exported GGUFs (f16, q4_k_m, ...)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="greentune", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=_version_line())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)

    p = sub.add_parser("demo", help="the whole pipeline on a built-in small model and real text")
    p.add_argument("--out", default="runs/demo", help="folder for the demo's runs (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="fewer steps (for tests)")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="run a recipe: reuse → adapt → train → merge → export → report")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--run-dir", default=None, help="default runs/<recipe name>")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=count(1),
        default=None,
        metavar="N",
        help="train on N processes of this machine through torchrun (one per GPU; gloo on CPU)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="perplexity, tokens/s, J/token and memory of a run, model folder or GGUF")
    p.add_argument("target", help="run dir, HF model folder, Hub id ORG/NAME[@REVISION] or .gguf file")
    p.add_argument("--data", required=True, help=".jsonl / .parquet / .csv / .txt / folder of .txt")
    p.add_argument(
        "--max-seq-len",
        type=count(1, 10**7),
        default=None,
        help="default: the run's, else 512; at most the model's positions",
    )
    p.add_argument("--batch-size", type=count(1, 65536), default=8)
    p.add_argument("--json", action="store_true")
    _add_inference_arguments(p)
    p.set_defaults(func=_cmd_eval)

    from greentune.plan.command import add_plan_arguments, run_plan

    p = sub.add_parser("plan", help="memory / time / kWh / kgCO2e / litres of each technique, before running")
    add_plan_arguments(p)
    p.set_defaults(func=run_plan)

    p = sub.add_parser(
        "upcycle", help="dense Llama/Mistral checkpoint -> Mixtral-architecture MoE (same outputs at init)"
    )
    p.add_argument("model_dir")
    p.add_argument("--experts", type=count(2, MAX_EXPERTS), default=8, help=f"2 to {MAX_EXPERTS} (default 8)")
    p.add_argument("--top-k", type=count(1, MAX_EXPERTS), default=2)
    p.add_argument("--out", required=True, help="output folder (an existing one only if greentune wrote it)")
    p.add_argument(
        "--force", action="store_true", help="replace an existing --out folder greentune did not write"
    )
    p.add_argument("--seed", type=count(0, 2**63 - 1), default=0, help="router initialisation seed")
    p.set_defaults(func=_cmd_upcycle)

    p = sub.add_parser(
        "export", help="a run or model folder to GGUF (llama.cpp/Ollama/LM Studio), MLX or merged HF"
    )
    p.add_argument("target", help="run dir, HF model folder or Hub id ORG/NAME[@REVISION]")
    p.add_argument("--format", choices=list(EXPORT_FORMATS), default=DEFAULT_EXPORT_FORMAT)
    p.add_argument("--quant", default=None, help=EXPORT_QUANT_HELP)
    p.add_argument(
        "--out",
        default=None,
        help="output folder, or FILE.gguf for a GGUF (default: RUN_DIR/export or MODEL_DIR-export)",
    )
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("report", help="write report.html + report.json for a run dir")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("meter", help="energy, carbon and water of any command: greentune meter -- CMD ...")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text (on stderr)")
    p.add_argument("--region", default=None, help="grid region (ISO code, default world)")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    p.set_defaults(func=_cmd_meter)
    return parser


def _quiet_transformers(verbose: bool) -> None:
    """transformers' own weight-loading bars and notices would drown greentune's output."""
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except UserError as err:
        print(f"greentune: error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if ns.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    _quiet_transformers(ns.verbose)
    try:
        return ns.func(ns)
    except UserError as err:
        print(f"greentune: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if not is_user_os_error(err):  # a bug or a broken machine: keep the traceback
            raise
        print(f"greentune: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("greentune: interrupted", file=sys.stderr)
        return 130
    except Stopped as err:  # SIGTERM outside the training loop
        print(f"greentune: stopped by {err}", file=sys.stderr)
        return exit_code(err.signum)


if __name__ == "__main__":
    raise SystemExit(main())
