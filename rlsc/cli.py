"""Command line: `rlsc train | eval | demo | ablate` (also `python -m rlsc ...`; ablate's own flags: rlsc/ablate.py).

Every config field a subcommand uses is a flag (`num_prompts` -> `--num-prompts`, booleans get
`--x/--no-x`); `--config FILE.yaml` holds the same fields, and flags given on the command line
override it. Every value is checked before the model loads or any file is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
from pathlib import Path

from .config import RESUME_MODES, RLSCConfig, load_yaml_overrides

#: How long `rlsc demo` / `make demo` takes: one number, from the recorded run in
#: benchmarks/results/demo-cpu.json (142 s on 2 idle CPU cores at 54d31ed); the README and --help
#: quote this string (tests/test_readme.py checks both).
DEMO_TIME = "about 2 minutes on 2 CPU cores"
#: `rlsc eval --max-new-tokens 0` (its default): the cap by device. On CUDA the paper's cap. On a
#: CPU a decode step of the embedded model costs about the same for 1 or 17 rows, so the time is
#: the number of steps, which the longest of a question's 16 samples sets: the paper's cap took
#: ~7 min for builtin:demo (the longest sample ~170 tokens on average), the demo's 48 about 3 min;
#: 128 keeps a builtin answer (10-40 tokens) and a short explanation and cuts the rambling samples.
EVAL_AUTO_MAX_NEW_TOKENS = {"cuda": 3072, "cpu": 128}

DESCRIPTIONS = {
    "train": "RLSC training: sample, mask, score, weigh, step.",
    "eval": "Greedy accuracy, pass@1, pass@k and maj@k per dataset (--prompts may list several, comma-separated). "
            "Writes eval_results.json and the samples into --output-dir (default runs/eval; '' for no files).",
    "demo": f"Eval before, RLSC training, eval after, on the embedded model ({DEMO_TIME}).",
    "ablate": "Weightings against untrained baselines over tasks and seeds (its own flags: rlsc ablate --help).",
}
EXAMPLES = {
    "train": "example:\n  rlsc train --model Qwen/Qwen2.5-Math-1.5B --prompts HuggingFaceH4/aime_2024 --steps 10 --output-dir runs/x\n"
             "  rlsc train --model Qwen/Qwen2.5-Math-1.5B --prompts HuggingFaceH4/aime_2024 --steps 20 --output-dir runs/x --resume\n"
             "                                                    # the same flags, more steps: continue from its checkpoint",
    "eval": "example:\n  rlsc eval --model runs/x/final --prompts HuggingFaceH4/MATH-500,examples/arithmetic.jsonl --k 16 --output-dir runs/x/eval",
    "demo": f"example:\n  rlsc demo                       # {DEMO_TIME}, results in runs/demo\n"
            "  rlsc demo --steps 5 --output-dir runs/demo5",
}


def base_config(command: str) -> RLSCConfig:
    """The defaults each subcommand starts from (shown by its --help)."""
    if command == "demo":
        from .demo import demo_config

        return demo_config()
    if command == "eval":
        return RLSCConfig(output_dir="runs/eval", max_new_tokens=0)
    return RLSCConfig()


def _add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file with config fields; flags given here override it")
    docs = RLSCConfig.field_docs()
    base = base_config(command)
    for f in dataclasses.fields(RLSCConfig):
        if command not in f.metadata["commands"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(base, f.name)
        shown = repr(default)
        help_text = f"{docs[f.name]} (default: {shown})".replace("%", "%%")
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="yes", choices=RESUME_MODES, default=argparse.SUPPRESS,
                                help=help_text + "; --resume alone means yes")
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=str, default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


class _Parser(argparse.ArgumentParser):
    """An unknown flag is reported by the subcommand's parser (its usage, not the top level's), with
    the closest flag that subcommand has (difflib), e.g. `--stpes` -> did you mean `--steps`?"""

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        commands = list(self._subparsers._group_actions[0].choices)
        if args and not args[0].startswith("-") and args[0] not in commands:
            close = difflib.get_close_matches(args[0], commands, n=1, cutoff=0.5)
            self.error(f"unknown command {args[0]!r} (choose from {', '.join(commands)})"
                       + (f"; did you mean {close[0]}?" if close else ""))
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            sub = self._subparsers._group_actions[0].choices.get(getattr(parsed, "command", None), self)
            known = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
            hints = []
            for token in extra:
                if token.startswith("--"):
                    close = difflib.get_close_matches(token.split("=", 1)[0], known, n=1, cutoff=0.6)
                    if close:
                        hints.append(f"{token.split('=', 1)[0]}: did you mean {close[0]}?")
            sub.error(f"unrecognized arguments: {' '.join(extra)}" + ("; " + "; ".join(hints) if hints else ""))
        return parsed


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rlsc", allow_abbrev=False,
                     description="RLSC (self-confidence) fine-tuning through the fused op of rlsc_kernels.",
                     epilog="rlsc CMD --help lists the flags of CMD, with its defaults and an example.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(DESCRIPTIONS) + "}")
    for name, text in DESCRIPTIONS.items():
        if name == "ablate":  # listed here; main() hands its arguments to rlsc/ablate.py before parsing
            sub.add_parser(name, help=text, add_help=False)
            continue
        p = sub.add_parser(name, help=text, description=text, epilog=EXAMPLES[name], allow_abbrev=False,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_config_flags(p, name)
    return parser


def flags_markdown() -> str:
    """docs/cli.md's table of flags: which subcommands take each one, and each one's defaults."""
    bases = {c: base_config(c) for c in ("train", "eval", "demo")}
    docs = RLSCConfig.field_docs()
    lines = ["| flag | train | eval | demo | meaning |", "|---|---|---|---|---|"]
    for f in dataclasses.fields(RLSCConfig):
        cells = []
        for c, base in bases.items():
            if c not in f.metadata["commands"]:
                cells.append("")
            else:
                cells.append(f"`{getattr(base, f.name)!r}`")
        meaning = docs[f.name].replace("|", "\\|")
        lines.append(f"| `--{f.name.replace('_', '-')}` | " + " | ".join(cells) + f" | {meaning} |")
    return "\n".join(lines)


def builtin_markdown() -> str:
    """The README's list of builtin task sets, generated from rlsc.data.BUILTINS."""
    from .data import BUILTINS, load_problems

    lines = ["| SOURCE | example question | train / test questions |", "|---|---|---|"]
    for name in BUILTINS:
        train, test = (load_problems(f"builtin:{name}", split) for split in ("train", "test"))
        lines.append(f"| `builtin:{name}` | {test[0].question} | {len(train)} / {len(test)} |")
    return "\n".join(lines)


def config_from_args(args: argparse.Namespace, base: RLSCConfig | None = None) -> RLSCConfig:
    """defaults of the subcommand (or `base`) < YAML file < flags given on the command line.
    Types are converted (and reported by flag name) by RLSCConfig.updated."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = base or base_config(args.command)
    if "config" in vars(args):
        cfg = cfg.updated(load_yaml_overrides(args.config))
    return cfg.updated(given)


def run_train(cfg: RLSCConfig) -> int:
    if cfg.engine == "trl":
        from .trl_engine import train_trl as train
    else:
        from .train import train

    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def run_eval(cfg: RLSCConfig) -> int:
    from .evaluate import evaluate_sources, format_table
    from .models import check_model_spec
    from .train import load

    check_model_spec(cfg.model)
    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    loaded = load(cfg)
    if cfg.max_new_tokens == 0:
        cap = EVAL_AUTO_MAX_NEW_TOKENS["cuda" if loaded.device.type == "cuda" else "cpu"]
        print(f"rlsc eval: completions capped at {cap} tokens on {loaded.device.type} "
              "(--max-new-tokens 0, the default; give a number to change it)", file=sys.stderr)
        cfg = dataclasses.replace(cfg, max_new_tokens=cap)
    temperature = cfg.eval_temperature if cfg.eval_temperature >= 0 else cfg.temperature
    results = evaluate_sources(
        loaded.model, loaded.tokenizer, [s for s in cfg.prompts.split(",") if s], split=cfg.split or "test",
        limit=cfg.max_prompts, template=cfg.prompt_template, k=cfg.k, temperature=temperature,
        max_new_tokens=cfg.max_new_tokens, batch_questions=cfg.eval_batch_questions,
        autocast_dtype=loaded.autocast_dtype, output_dir=out_dir, sampler=cfg.sampler, seed=cfg.seed)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_results.json").write_text(json.dumps({"model": cfg.model, "results": results}, indent=2))
    print(format_table(results))
    if out_dir is not None:
        print(f"\nresults: {out_dir / 'eval_results.json'}; every completion with its grade: {out_dir}/eval_samples_*.jsonl")
    else:
        print("\nno files written (--output-dir ''); give a directory to keep the results and samples")
    return 0


def run_demo(cfg: RLSCConfig) -> int:
    from .demo import demo

    demo(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["ablate"]:  # its own flags (tasks x methods x seeds), not the config's: see rlsc/ablate.py
        from .ablate import main as ablate_main

        return ablate_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args).validate(args.command)
        if args.command == "demo":
            return run_demo(cfg)
        return run_train(cfg) if args.command == "train" else run_eval(cfg)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError, RuntimeError) as exc:
        if os.environ.get("RLSC_DEBUG"):
            raise
        print(f"rlsc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
