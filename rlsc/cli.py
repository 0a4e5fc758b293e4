"""Command line: `rlsc train | eval | demo` (also `python -m rlsc ...`).

Every config field is a flag (`num_prompts` -> `--num-prompts`, booleans get `--x/--no-x`);
`--config FILE.yaml` holds the same fields, and flags given on the command line override it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from .config import RLSCConfig, load_yaml_overrides


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="YAML file with config fields; flags given here override it")
    docs = RLSCConfig.field_docs()
    for f in dataclasses.fields(RLSCConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = f"{docs[f.name]} (default: {default!r})"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, type=type(default), default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlsc", allow_abbrev=False, description="RLSC (self-confidence) fine-tuning through the fused op of rlsc_kernels.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,eval,demo}")
    for name, help_text in (
        ("train", "RLSC training: sample, mask, score, weigh, step"),
        ("eval", "greedy accuracy, pass@1, pass@k and maj@k per dataset (--prompts may list several, comma-separated)"),
        ("demo", "eval before, RLSC training, eval after, on the embedded model (CPU, minutes)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
        _add_config_flags(p)
    return parser


def config_from_args(args: argparse.Namespace, base: RLSCConfig | None = None) -> RLSCConfig:
    """defaults (or `base`) < YAML file < flags given on the command line."""
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    cfg = base or RLSCConfig()
    if "config" in vars(args):
        cfg = cfg.updated(load_yaml_overrides(args.config))
    return cfg.updated(given)


def run_train(cfg: RLSCConfig) -> int:
    from .train import train

    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def run_eval(cfg: RLSCConfig) -> int:
    from .evaluate import evaluate_sources, format_table
    from .train import load

    out_dir = Path(cfg.output_dir) if cfg.output_dir else None
    loaded = load(cfg)
    temperature = cfg.eval_temperature if cfg.eval_temperature >= 0 else cfg.temperature
    results = evaluate_sources(
        loaded.model, loaded.tokenizer, [s for s in cfg.prompts.split(",") if s], split=cfg.split or "test",
        limit=cfg.max_prompts, template=cfg.prompt_template, k=cfg.k, temperature=temperature,
        max_new_tokens=cfg.max_new_tokens, batch_questions=cfg.eval_batch_questions,
        autocast_dtype=loaded.autocast_dtype, output_dir=out_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "eval_results.json").write_text(json.dumps({"model": cfg.model, "results": results}, indent=2))
    print(format_table(results))
    return 0


def run_demo(cfg: RLSCConfig) -> int:
    from .demo import demo

    demo(cfg)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import demo_config

            cfg = config_from_args(args, base=demo_config())
            return run_demo(cfg)
        cfg = config_from_args(args)
        if args.command == "eval" and "output_dir" not in vars(args):
            cfg = dataclasses.replace(cfg, output_dir="")
        return run_train(cfg) if args.command == "train" else run_eval(cfg)
    except (ValueError, FileNotFoundError, ImportError, NotImplementedError, RuntimeError) as exc:
        if os.environ.get("RLSC_DEBUG"):
            raise
        print(f"rlsc {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
