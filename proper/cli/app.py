"""The `proper` command (console script and `python -m proper`): demo, train, eval, generate, bench."""
from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from .export import add_export_arguments, run_export_args
from .train import add_train_arguments, run_train_args

log = logging.getLogger("proper")


def _cmd_demo(args) -> int:
    from .demo import run_demo   # the demo pulls in the whole stack: only for this verb

    return run_demo(quick=args.quick, skip_model=args.op_only, users=args.users, out=args.out)


def _cmd_bench(args) -> int:
    from ..bench.suite import main as suite_main   # packaged: works from any install

    return suite_main(["--quick", "--out", args.out] + (["--no-model"] if args.no_model else []))


def _cmd_generate(args) -> int:
    import torch

    from .. import ProperConfig, apply_proper, from_pretrained, generate_for_users, get_state, load_smollm2

    if args.max_new_tokens < 1:
        print(f"proper generate: --max-new-tokens must be >= 1, got {args.max_new_tokens}", file=sys.stderr)
        return 2
    if args.model_dir and not (Path(args.model_dir) / "proper_config.json").is_file():
        print(f"proper generate: --model-dir {args.model_dir!r} is not a saved proper model (no proper_config.json "
              f"there; use a folder from proper train --out DIR/stages/user or proper.save_pretrained)",
              file=sys.stderr)
        return 2
    pairs = []
    for item in args.pair:
        uid, sep, prompt = item.partition(":")
        try:
            pairs.append((int(uid), prompt))
        except ValueError:
            sep = ""
        if not sep:
            print(f"proper generate: --pair must look like USER_ID:PROMPT (USER_ID -1 = no user), got {item!r}",
                  file=sys.stderr)
            return 2
    if any(u < -1 for u, _ in pairs):
        print(f"proper generate: user ids must be >= -1 (-1 = no user), got {min(u for u, _ in pairs)}",
              file=sys.stderr)
        return 2
    if not args.model_dir and any(u >= 0 for u, _ in pairs):
        print("proper generate: user ids need a personalised model: pass --model-dir (from proper train or "
              "proper.save_pretrained); use -1 for the base model", file=sys.stderr)
        return 2
    model, tok = load_smollm2()
    if args.model_dir:
        try:
            model = from_pretrained(model, args.model_dir)
        except (ValueError, FileNotFoundError) as e:
            print(f"proper generate: {e}", file=sys.stderr)
            return 2
        n = get_state(model).cfg.num_users
        bad = [u for u, _ in pairs if u >= n]
        if bad:
            print(f"proper generate: user id {bad[0]} is out of range: the model in {args.model_dir} has {n} users "
                  f"(ids 0..{n - 1}; -1 = no user)", file=sys.stderr)
            return 2
    else:
        model = apply_proper(model, ProperConfig(num_users=1, lora_router=False))  # adapters at zero: base
    with torch.no_grad():
        texts = generate_for_users(model, tok, pairs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                   temperature=args.temperature, top_p=args.top_p, seed=args.seed, chat=args.chat)
    for (uid, prompt), text in zip(pairs, texts):
        print(f"[user {uid}] {prompt}\n  -> {text.strip()}")
    return 0


def _cmd_eval(args) -> int:
    """One run folder: its systems table (and with --report its markdown + plot). Several (one per seed): each
    one's systems table, and with --report the multi-seed report (printed without --report)."""
    from ..training import summary_table
    from ..training.report import load_metrics, write_report
    from ..training.results import multi_seed_report

    try:
        metrics = [load_metrics(d) for d in args.run_dir]
    except FileNotFoundError as e:
        print(f"proper eval: {e}", file=sys.stderr)
        return 2
    for d, m in zip(args.run_dir, metrics):
        print((f"{d}:\n" if len(metrics) > 1 else "") + summary_table(m))
    if len(metrics) == 1 and args.decision == "argmax":
        if args.report:
            print(f"report: {write_report(args.run_dir[0], args.report, metrics=metrics[0])}")
        return 0
    # several runs, or one run under --decision median: the per-seed report, whose tables take that rule
    text = multi_seed_report(args.run_dir, decision=args.decision)
    if not args.report:
        print("\n" + text)
        return 0
    out = Path(args.report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"report: {out}")
    return 0


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
    d.add_argument("--out", default=None, help="folder for the demo's training run (default: a temp folder)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="a quick subset of the benchmark suite; prints the table")
    b.add_argument("--out", default="bench_results/quick")
    b.add_argument("--no-model", action="store_true", help="layer-level cases only")
    b.set_defaults(func=_cmd_bench)

    g = sub.add_parser("generate", help="generate for (user, prompt) pairs in one batch")
    g.add_argument("--pair", action="append", required=True, metavar="USER_ID:PROMPT",
                   help="repeatable; USER_ID -1 = no user adapter")
    g.add_argument("--model-dir", help="a saved proper model (proper train --out DIR / save_pretrained)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.set_defaults(func=_cmd_generate)

    t = add_train_arguments(sub.add_parser("train", help="three-stage PROPER training on per-user data"))
    t.set_defaults(func=run_train_args)
    e = sub.add_parser("eval", help="print the systems table of trained run directories (several: one per seed)")
    e.add_argument("run_dir", nargs="+", help="a run folder (proper train --out DIR); several for the multi-seed "
                                              "report")
    e.add_argument("--report", metavar="FILE.md", help="one run: write markdown tables, paired intervals and a PNG of "
                   "error by profile size; several runs: write the multi-seed report (MAE/RMSE per seed, paired "
                   "intervals of proper against each baseline per seed and profile bucket)")
    e.add_argument("--decision", choices=("argmax", "median"), default="argmax",
                   help="the LLM systems' rating in the multi-seed report: the argmax of the five-rating distribution "
                        "(the LaMP protocol, default) or its median (the Bayes decision for absolute error; runs "
                        "that recorded it); one run with 'median' gets the same report for that run alone")
    e.set_defaults(func=_cmd_eval)
    x = add_export_arguments(sub.add_parser("export", help="users as standard peft LoRA folders (exact), for vLLM, "
                                                           "LoRAX, S-LoRA or peft"))
    x.set_defaults(func=run_export_args)
    return p


def _attach_option_values(argv: Sequence[str], options=("--pair", "--users")) -> List[str]:
    """``--pair -1:text`` -> ``--pair=-1:text``: argparse would take a value that starts with '-' for an option.
    Only values that start with a negative number are attached (``--pair --model-dir`` stays an error)."""
    out: List[str] = []
    for i, a in enumerate(argv):
        if i and argv[i - 1] in options and re.match(r"-\d", a) and out and out[-1] == argv[i - 1]:
            out[-1] = f"{argv[i - 1]}={a}"
        else:
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_attach_option_values(argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"\nproper {args.command}: interrupted" + (" (continue with --resume)" if args.command == "train"
                                                          else ""), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
