"""`rlsc demo` / `make demo`: eval before, RLSC training, eval after, on the embedded model, on CPU.

The task set (builtin:demo, "What is a * b?" with a in 2..30, b in 2..11) was chosen by measuring
the embedded model: its pass@1 is below its maj@16, so sharpening the mode has room to help. The
numbers are taken on the held-out test split (24 questions the training never sees).
"""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from .config import RLSCConfig
from .evaluate import evaluate_sources, format_table
from .plot import plot_before_after
from .train import load, log_to_stderr, train


def demo_config() -> RLSCConfig:
    """The demo's settings (every one can still be overridden by a flag): the paper's recipe
    (16 samples at T = 0.5, alpha 0.1, AdamW lr 1e-5, 10 steps) with one question per step and a
    48-token cap, so that eval + train + eval fits in minutes on a CPU (rlsc.cli.DEMO_TIME). Evaluation
    decodes 8 questions (8 x (16 samples + greedy) rows) per batch: with the compact loop, where
    finished rows leave the batch, that took 0.4x the time of one question per batch on the 24
    held-out questions on a 2-core CPU (benchmarks/results/eval-batch-cpu.md). The end-of-run
    checkpoint keeps the weights without AdamW's moments (0.54 GB written in 2 s instead of 1.6 GB
    in 5 s; the trained model is in final/ anyway, and a resumed demo restarts the moments)."""
    return RLSCConfig(
        model="embedded",
        prompts="builtin:demo",
        num_prompts=1,
        num_samples=16,
        max_new_tokens=48,
        temperature=0.5,
        alpha=0.1,
        weighting="rlsc",
        steps=10,
        lr=1e-5,
        micro_batch_size=16,
        device="cpu",
        precision="auto",
        output_dir="runs/demo",
        checkpoint_every=0,
        save_optimizer_state=False,
        k=16,
        eval_batch_questions=8,
        seed=0,
    )


def demo(cfg: RLSCConfig, log=log_to_stderr) -> dict:
    t_start = time.perf_counter()
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"RLSC demo: {cfg.model} on {cfg.prompts}; results in {out_dir}")
    loaded = load(cfg, log)
    eval_kwargs = dict(split="test", limit=0, template=cfg.prompt_template, k=cfg.k,
                       temperature=cfg.eval_temperature if cfg.eval_temperature >= 0 else cfg.temperature,
                       max_new_tokens=cfg.max_new_tokens, batch_questions=cfg.eval_batch_questions,
                       output_dir=out_dir, log=log, sampler=cfg.sampler, autocast_dtype=loaded.autocast_dtype)
    timings = {"load_seconds": round(time.perf_counter() - t_start, 1)}

    log("== 1/3 evaluation before training (held-out split)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    before = evaluate_sources(loaded.model, loaded.tokenizer, [cfg.prompts], tag="before", **eval_kwargs)
    timings["eval_before_seconds"] = round(time.perf_counter() - t0, 1)

    log(f"== 2/3 RLSC training: {cfg.steps} steps, {cfg.num_prompts} questions x {cfg.num_samples} samples, lr {cfg.lr}")
    t0 = time.perf_counter()
    summary = train(cfg, loaded=loaded, log=log)
    timings["train_seconds"] = round(time.perf_counter() - t0, 1)

    log("== 3/3 evaluation after training (same held-out split)")
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed + 1)
    after = evaluate_sources(loaded.model, loaded.tokenizer, [cfg.prompts], tag="after", **eval_kwargs)
    timings["eval_after_seconds"] = round(time.perf_counter() - t0, 1)
    timings["total_seconds"] = round(time.perf_counter() - t_start, 1)

    table = format_table(after, before=before)
    plot = plot_before_after(before, after, out_dir / "before_after.png",
                             title=f"{cfg.prompts} held out: before -> after {cfg.steps} RLSC steps")
    result = {
        "before": before, "after": after, "timings": timings, "train": summary, "config": cfg.to_dict(),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "machine": platform.machine()},
    }
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    (out_dir / "results.md").write_text(
        f"# RLSC demo results\n\nheld-out split of {cfg.prompts}, {cfg.k} samples per question at "
        f"T={cfg.temperature}, before -> after {cfg.steps} RLSC steps\n\n{table}\n\n"
        f"total time {timings['total_seconds']:.0f}s ({json.dumps(timings)})\n")
    print(f"\nRLSC demo ({cfg.model}, {cfg.prompts} held-out, before -> after {cfg.steps} steps):\n")
    print(table)
    print(f"\ntotal {timings['total_seconds']:.0f}s; in {out_dir}: results.md, {plot.name if plot else 'no plot'} "
          "(the table as bars), training_curves.png, metrics.jsonl")
    sys.stdout.flush()
    return result
