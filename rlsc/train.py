"""`rlsc train`: the loop around the step (prompts, logging, checkpoints, final save, plot).

The step itself lives in step.py and reads like Algorithm 1; everything here sits beside it.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import checkpoint_path, load_checkpoint, remove_stale_temporaries, restore, save_checkpoint
from .config import RLSCConfig, parse_filter_eps
from .data import Problem, default_template, load_problems
from .guard import PROBE_BEST_CHECKPOINT, PROBE_METRICS, HeldOutEval, Probe, guard_from_config
from .models import (apply_lora, check_model_spec, enable_activation_checkpointing, load_model, load_tokenizer,
                     resolve_device, resolve_precision)
from .plot import plot_training_curves, read_metrics
from .precision import choose_cpu_precision
from .objectives import make_update
from .sampling import chat_prompt, encode_prompts
from .step import LossOptions, check_head_matches_forward, rlsc_step

METRICS = "metrics.jsonl"


@dataclass
class Loaded:
    model: object
    tokenizer: object
    device: torch.device
    precision: str

    @property
    def autocast_dtype(self):
        return torch.bfloat16 if self.precision == "bf16-autocast" else None


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def load(cfg: RLSCConfig, log=log_to_stderr) -> Loaded:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, device=device, precision=precision)
    model.eval()
    if cfg.precision == "auto" and device.type == "cpu":
        precision, why = choose_cpu_precision(model)
        log(f"--precision auto: {precision} ({why})")
    if cfg.liger_kernels:
        from .liger import apply_liger_kernels

        log(f"Liger-Kernel body kernels: {', '.join(apply_liger_kernels(model, device))}")
    log(f"loaded model {cfg.model!r} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
        f"{precision}, {device}, attention {model.config._attn_implementation}) in {time.perf_counter() - t0:.1f}s")
    return Loaded(model, tokenizer, device, precision)


def prepare_for_training(loaded: Loaded, cfg: RLSCConfig, log=log_to_stderr) -> None:
    if cfg.lora_rank > 0:
        loaded.model = apply_lora(loaded.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        n = sum(p.numel() for p in loaded.model.parameters() if p.requires_grad)
        log(f"LoRA rank {cfg.lora_rank}: {n / 1e6:.2f}M trainable parameters")
    if cfg.gradient_checkpointing:
        enable_activation_checkpointing(loaded.model)


def build_optimizer(model, cfg: RLSCConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, with the multi-tensor (foreach) implementation on every
    device: torch picks it by default on CUDA only; on a CPU it is bitwise the per-parameter loop's
    update and took 0.45 s per step of the embedded model against 0.6-1.0 s (2-core AMD EPYC).
    (The fused CPU kernel, 0.08 s, rounds differently and is not used.)"""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, foreach=True)


def loss_options(cfg: RLSCConfig, loaded: Loaded) -> LossOptions:
    return LossOptions(temperature=cfg.temperature, alpha=cfg.alpha, weighting=cfg.weighting,
                       filter_eps=parse_filter_eps(cfg.filter_eps), backend=cfg.backend, micro_batch_size=cfg.micro_batch_size,
                       max_grad_norm=cfg.max_grad_norm, autocast_dtype=loaded.autocast_dtype,
                       sampler=cfg.sampler, mask_truncated=cfg.mask_truncated, share_prompts=cfg.share_prompts)


def prompts_for_step(problems: list[Problem], step: int, k: int, seed: int) -> list[Problem]:
    """The K questions of a step: walk through seeded per-epoch shuffles of the prompt set.

    A pure function of (step, seed), so a resumed run poses the same questions as an
    uninterrupted one without storing any data-loader state."""
    out = []
    for i in range(step * k, step * k + k):
        epoch, pos = divmod(i, len(problems))
        order = list(range(len(problems)))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        out.append(problems[order[pos]])
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS (kB on Linux)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Keeps the metric rows of finished, checkpointed steps only (a crash may have logged more)."""
    rows = [r for r in read_metrics(path) if r["step"] <= last_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(_json_line(r) for r in rows))
    os.replace(tmp, path)


class NonFiniteSteps(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient."""


def train(cfg: RLSCConfig, loaded: Loaded | None = None, log=log_to_stderr) -> dict:
    """Runs cfg.steps RLSC steps (resuming if asked) and returns a summary dict.

    Everything that can be checked without the model (values, prompts, the model spec, the
    checkpoint --resume asks for) is checked before the model loads or a file is written. A
    process killed at any moment loses at most the step in flight: checkpoints are atomic, and
    on resume the metrics are cut back to the checkpointed step."""
    cfg.validate("train")
    out_dir = Path(cfg.output_dir)
    problems = load_problems(cfg.prompts, split=cfg.split or "train", limit=cfg.max_prompts)
    template = cfg.prompt_template or default_template(cfg.prompts)
    has_checkpoint = checkpoint_path(out_dir).is_file()
    if cfg.resume == "yes" and not has_checkpoint:
        raise FileNotFoundError(f"--resume: there is no checkpoint in {out_dir} (use --resume auto to start "
                                "afresh when there is none; a run shorter than --checkpoint-every that saved "
                                "final/ writes none)")
    if loaded is None:
        check_model_spec(cfg.model)
    log(f"training on {cfg.prompts}: {len(problems)} questions, {cfg.num_prompts} x {cfg.num_samples} samples per step")

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    loaded = loaded or load(cfg, log)
    prepare_for_training(loaded, cfg, log)
    model, tokenizer = loaded.model, loaded.tokenizer
    check_head_matches_forward(model, probe_ids(tokenizer, problems[0], template, loaded.device),
                               loaded.autocast_dtype)
    optimizer = build_optimizer(model, cfg)
    opts = loss_options(cfg, loaded)

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    metrics_path = out_dir / METRICS
    start = 0
    payload = load_checkpoint(out_dir) if cfg.resume != "no" else None
    if payload is not None:
        start = restore(payload, model=model, optimizer=optimizer)
        _truncate_metrics(metrics_path, start)
        log(f"resumed from {out_dir / 'checkpoint.pt'} at step {start}"
            + ("" if "optimizer" in payload else " (no optimizer state in it: AdamW's moments restart)"))
    else:
        if cfg.resume == "auto":
            log(f"--resume auto: no checkpoint in {out_dir}, starting from step 0")
        elif has_checkpoint:
            log(f"starting afresh: the checkpoint in {out_dir} will be overwritten (pass --resume to continue it)")
        metrics_path.write_text("")
    (out_dir / "config.json").write_text(cfg.to_json())
    history = read_metrics(metrics_path)
    skipped_total = sum(bool(r.get("skipped")) for r in history)
    skipped_in_a_row = 0
    for r in reversed(history):
        if not r.get("skipped"):
            break
        skipped_in_a_row += 1
    # label-free objectives, diagnostics and the collapse guard (rlsc/objectives.py, rlsc/guard.py)
    held_out = HeldOutEval(cfg, out_dir, log) if cfg.eval_every > 0 else None
    if held_out is not None and start == 0:
        held_out.evaluate(model, tokenizer, 0, loaded.autocast_dtype)  # the starting point (eval.jsonl)
    probe = Probe(cfg, out_dir, log, resumed=start > 0) if cfg.probe_every > 0 else None
    if probe is not None and start == 0:
        probe.evaluate(model, tokenizer, 0, loaded.autocast_dtype)  # the pseudo-labels and the start
    guard = guard_from_config(cfg, history, probe.start if probe is not None else None)
    update = make_update(cfg.objective, tokenizer, guard)

    for step in range(start, cfg.steps):
        if loaded.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(loaded.device)
        batch = prompts_for_step(problems, step, cfg.num_prompts, cfg.seed)
        stats, gen_s, train_s = rlsc_step(model, tokenizer, optimizer, batch, template=template,
                                          num_samples=cfg.num_samples, max_new_tokens=cfg.max_new_tokens, opts=opts,
                                          update=update)
        skipped_total += stats.skipped
        skipped_in_a_row = skipped_in_a_row + 1 if stats.skipped else 0
        row = {
            "step": step + 1,
            "loss": stats.loss,
            "skipped": stats.skipped,
            "skipped_steps": skipped_total,
            "mean_seq_logp": float(stats.seq_logp.mean()),
            "min_seq_logp": float(stats.seq_logp.min()),
            "max_seq_logp": float(stats.seq_logp.max()),
            "mean_weight": float(stats.seq_weight.mean()),
            "max_weight": float(stats.seq_weight.max()),
            "frac_weight_underflow": stats.frac_weight_underflow,
            "mean_completion_tokens": float(stats.n_tokens.float().mean()),
            "frac_capped": float(stats.capped.float().mean()),
            "frac_eos_only": float((stats.n_tokens == 1).float().mean()),
            "mean_token_entropy": stats.mean_token_entropy,
            "grad_norm": stats.grad_norm,
            "gen_seconds": round(gen_s, 3),
            "train_seconds": round(train_s, 3),
            "peak_memory_mb": round(_peak_memory_mb(loaded.device), 1),
            "samples": len(stats.seq_logp),
            "questions": [p.id for p in batch],
            **stats.extra,
        }
        guard_stop = stats.extra.get("guard_stop")
        if held_out is not None and not guard_stop and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            row.update(held_out.evaluate(model, tokenizer, step + 1, loaded.autocast_dtype))
        probe_stop = None
        if probe is not None and not guard_stop and ((step + 1) % cfg.probe_every == 0 or step + 1 == cfg.steps):
            measured = probe.evaluate(model, tokenizer, step + 1, loaded.autocast_dtype)
            row.update(measured)
            # the probe_* rules (the step's rules were checked before its update)
            probe_stop = guard.check({k: measured[k] for k in PROBE_METRICS}) if guard is not None else None
            if probe_stop:
                row["guard_stop"] = probe_stop
        with open(metrics_path, "a") as fh:
            fh.write(_json_line(row))
        log(f"step {step + 1}/{cfg.steps}: loss {row['loss']:.4g}  mean log p {row['mean_seq_logp']:.2f}  "
            f"mean w {row['mean_weight']:.3f}  underflow {row['frac_weight_underflow']:.2f}  "
            f"tokens {row['mean_completion_tokens']:.1f}  entropy {row['mean_token_entropy']:.3f}  "
            f"gen {gen_s:.1f}s train {train_s:.1f}s" + ("  SKIPPED (non-finite loss or gradient)" if stats.skipped else ""))
        if skipped_in_a_row >= cfg.max_consecutive_skips:
            raise NonFiniteSteps(
                f"{skipped_in_a_row} steps in a row (up to step {step + 1}) had a non-finite loss or gradient and were "
                f"skipped; stopping. The weights are those of the last applied step. Try a lower --lr, --max-grad-norm, "
                f"or --precision fp32 (--max-consecutive-skips sets how many skips in a row are tolerated)")
        if guard_stop or probe_stop:
            # a step's rule: its update was not applied (the weights are those after `step` updates);
            # a probe's rule: the probe judged the weights after this step's update
            kept = step if guard_stop else step + 1
            log(f"collapse guard: stopping {'before' if guard_stop else 'after'} the update of step {step + 1}: "
                f"{guard_stop or probe_stop}" + (f"; the best weights by probe_majority (step {probe.state['best']['step']}) "
                                                 f"are in {out_dir / PROBE_BEST_CHECKPOINT}"
                                                 if probe is not None and probe.state.get("best") else ""))
            save_checkpoint(out_dir, model=model, optimizer=optimizer if cfg.save_optimizer_state else None,
                            step=kept, config=cfg.to_dict())
            break
        last = step + 1 == cfg.steps
        if (cfg.checkpoint_every > 0 and (step + 1) % cfg.checkpoint_every == 0) or (last and _checkpoint_at_end(cfg)):
            save_checkpoint(out_dir, model=model, optimizer=optimizer if cfg.save_optimizer_state else None,
                            step=step + 1, config=cfg.to_dict())

    plot = plot_training_curves(metrics_path, out_dir / "training_curves.png", title=f"RLSC on {cfg.prompts}")
    final_dir = None
    if cfg.save_final_model:
        final_dir = save_final(model, tokenizer, out_dir / "final")
        log(f"saved the trained model to {final_dir}")
    return {"metrics": str(metrics_path), "plot": str(plot) if plot else None,
            "final_model": str(final_dir) if final_dir else None, "steps": cfg.steps,
            "probe_best": dict(probe.state["best"], path=str(out_dir / PROBE_BEST_CHECKPOINT))
            if probe is not None and probe.state.get("best") else None}


def probe_ids(tokenizer, problem: Problem, template: str, device) -> torch.Tensor:
    """The last 32 tokens of a real prompt [1, <=32]: input of the start-of-run checks (both engines)."""
    ids = encode_prompts(tokenizer, [chat_prompt(tokenizer, problem.question, template)])[0][-32:]
    return torch.tensor([ids], dtype=torch.long, device=device)


def _json_line(row: dict) -> str:
    """One metrics row; non-finite floats (a skipped step's loss) as null, so the file stays JSON."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean) + "\n"


def _checkpoint_at_end(cfg: RLSCConfig) -> bool:
    """After the last step, a checkpoint (for a later --resume with more --steps), except for a run
    shorter than --checkpoint-every that saves its final model: a smoke run keeps final/ only, not
    another copy of the weights with AdamW's moments (three times their size). Such a run had no
    checkpoint to lose anyway; without final/ the checkpoint is written, so no run ends with nothing."""
    return cfg.checkpoint_every == 0 or cfg.steps >= cfg.checkpoint_every or not cfg.save_final_model


def save_final(model, tokenizer, path: Path) -> Path:
    """save_pretrained (LoRA adapters merged into the weights) plus the tokenizer."""
    to_save = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    to_save.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
