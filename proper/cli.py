"""The `proper` command (console script and `python -m proper`): demo, train, eval, generate, bench."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Optional, Sequence

log = logging.getLogger("proper")


def _cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(quick=args.quick, skip_model=args.op_only, users=args.users)


def _cmd_bench(args) -> int:
    sys.path.insert(0, args.repo)
    try:
        runner = importlib.import_module("benchmarks.run")
    except ImportError as e:
        print(f"proper bench: the benchmarks/ folder of a source checkout is needed ({e}); "
              f"run it from the repository root or pass --repo", file=sys.stderr)
        return 2
    return runner.main(["--quick", "--out", args.out] + (["--no-model"] if args.no_model else []))


def _delegate(module: str, func: str):
    """Subcommands implemented elsewhere in the package, imported only when used."""

    def run(args) -> int:
        mod = importlib.import_module(module)
        return getattr(mod, func)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proper", description="PROPER personalised LLMs: routed multi-LoRA "
                                "kernels and the three-stage model layer")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: the op on mixed users, then personalised generation "
                                    "for several users in one batch on the embedded SmolLM2")
    d.add_argument("--quick", action="store_true", help="smaller sizes (CI smoke run)")
    d.add_argument("--op-only", action="store_true", help="only the layer-level op part")
    d.add_argument("--users", type=int, default=4, help="users to personalise in the model part")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="a quick subset of the benchmark suite; prints the table")
    b.add_argument("--out", default="bench_results/quick")
    b.add_argument("--repo", default=".", help="repository root holding benchmarks/")
    b.add_argument("--no-model", action="store_true", help="layer-level cases only")
    b.set_defaults(func=_cmd_bench)

    for name, module, func, help_ in (
            ("train", "proper.train", "cli_train", "three-stage PROPER training on per-user data"),
            ("eval", "proper.train", "cli_eval", "evaluate a trained run directory"),
            ("generate", "proper.generate", "cli_generate", "generate for (user, prompt) pairs")):
        sp = sub.add_parser(name, help=help_, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_delegate(module, func))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
