"""Whole RLSC steps (sample + update) under an emulated GPU memory budget: what fits in 24 / 16 GB.

A randomly initialised model of the Qwen2.5-Math-1.5B shape (benchmarks/train_step.py's config,
untied head; no download) in bf16, gradient checkpointing on, AdamW (lr 1e-5, states in bf16 like
the weights). One step = sample n_samples completions of exactly L tokens (random weights never
emit EOS, so the lengths are forced: no EOS stops a row) with the thin trainer's static-cache
sampler (rlsc/decoding.py; CUDA graphs on CUDA), then the update over micro-batches with
gradients accumulated exactly: ours (the body's hidden states + rlsc_kernels.linear_rlsc_loss)
or naive (Algorithm 1: full logits, fp32 log_softmax, gather), full fine-tuning or LoRA r16.

The budget is emulated with torch.cuda.set_per_process_memory_fraction(budget / total): an
allocation beyond it raises OutOfMemoryError, caught and recorded as "does not fit". Generation
is run once per (mode, length), uncapped -- it depends on neither the budget, the head nor the
micro-batch -- and its peak plus the optimizer state (a real step samples while the AdamW state of
the previous step is alive) is checked against each budget. The static sampler keeps its KV cache
(and CUDA graph pool) alive through the update, as the thin trainer does, so that memory counts. Each row: fits, peak memory, generation
seconds, update seconds (one warm-up update, then the median of --reps). Micro-batch sizes are
tried from the largest down; by default the sweep of a (budget, mode, length, head) stops at the
first size that fits (--all-micro-batches runs them all).

Also (--rollouts): generation of n_samples x L at the same shape through transformers' eager
`generate` (sampling, forced length), the dynamic KV-cache loop and the static-cache loop, for the
3x target; and (--liger) the update with Liger-Kernel's body kernels, run last because Liger patches
transformers' Qwen2 module for every later model.

    python -m benchmarks.memory_budget                       # GPU: the full sweep, json + png
    python -m benchmarks.memory_budget --shape tiny --layers 1 --n-samples 4 --completion-lens 8,16 \\
        --micro-batches 4,2 --prompt-len 4 --device cpu      # CPU smoke run (no budget: peaks unknown)
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from rlsc.provenance import git_commit

from .compare import _error_text, device_name
from .inputs import ALPHA, TEMPERATURE
from .timing import _quantile
from .train_step import build_model

HEADS = ("ours", "naive")
MODES = ("full", "lora16")


# ------------------------------------------------------------------ the two heads (per micro-batch)
def ours_loss(model, ids, targets, prompt_len, scale):
    import rlsc_kernels as rk

    L = targets.shape[1]
    hidden = model.model(input_ids=ids).last_hidden_state[:, prompt_len - 1: prompt_len + L - 1]
    mask = torch.ones_like(targets, dtype=torch.bool)
    return rk.linear_rlsc_loss(hidden, model.lm_head.weight, targets, completion_mask=mask, temperature=TEMPERATURE,
                               alpha=ALPHA, reduction="mean").loss * scale


def naive_loss(model, ids, targets, prompt_len, scale):
    """Algorithm 1: logits of the completion positions, fp32 log_softmax / T, gather, (p + alpha) weights."""
    L = targets.shape[1]
    logits = model(input_ids=ids, logits_to_keep=L + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / TEMPERATURE, -1).gather(-1, targets[..., None])[..., 0]
    seq_logp = logp.sum(-1)
    w = torch.exp(seq_logp.detach().double().clamp(max=0)).float() + ALPHA
    return -(w * seq_logp).mean() * scale


LOSSES = {"ours": ours_loss, "naive": naive_loss}


def update(model, opt, loss_fn, ids, targets, prompt_len, micro_batch) -> float:
    """One optimizer step over all samples, micro-batch by micro-batch (mean over sequences overall)."""
    n = ids.shape[0]
    total = 0.0
    for s in range(0, n, micro_batch):
        loss = loss_fn(model, ids[s:s + micro_batch], targets[s:s + micro_batch], prompt_len,
                       min(micro_batch, n - s) / n)
        loss.backward()
        total += float(loss.detach())
    opt.step()
    opt.zero_grad(set_to_none=True)
    return total


# ------------------------------------------------------------------ helpers
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def set_budget(device, budget_gb):
    """Caps this process's CUDA allocations at budget_gb (None: the whole device). No-op on CPU."""
    if device.type != "cuda":
        return
    total = torch.cuda.get_device_properties(device).total_memory
    frac = 1.0 if budget_gb is None else min(1.0, budget_gb * 2**30 / total)
    torch.cuda.set_per_process_memory_fraction(frac, device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def prepare(model_name, layers, mode, device, dtype, grad_ckpt=True):
    """(model, trainable params, inner causal LM) for a mode: full fine-tuning or LoRA r16 (peft)."""
    import warnings

    model, cfg = build_model(model_name, layers, device, dtype)
    model.config.use_cache = True
    inner = model
    if mode == "lora16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
        inner = model.base_model.model
    elif mode != "full":
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if grad_ckpt:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, inner, cfg


def generate(model, prompt_ids, length, sampler, device) -> tuple[torch.Tensor, float]:
    """Completion block [B, length] of forced length (no EOS) and its wall seconds."""
    from rlsc.decoding import decode

    mask = torch.ones_like(prompt_ids, dtype=torch.bool)
    kw = dict(max_new_tokens=length, temperature=TEMPERATURE, eos_ids=[], pad_id=0)
    model.eval()
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        if sampler == "static":
            out = decode(model, prompt_ids, mask, sampler="static", compile=device.type == "cuda", **kw)
        elif sampler == "dynamic":
            out = decode(model, prompt_ids, mask, sampler="dynamic", **kw)
        elif sampler == "generate":  # transformers' eager generate, sampling at T, forced length
            out = model.generate(input_ids=prompt_ids, attention_mask=mask.long(), do_sample=True,
                                 temperature=TEMPERATURE, top_k=0, top_p=1.0, max_new_tokens=length,
                                 min_new_tokens=length, eos_token_id=None, pad_token_id=0)[:, prompt_ids.shape[1]:]
        else:
            raise ValueError(f"sampler must be static, dynamic or generate, got {sampler!r}")
    _sync(device)
    model.train()
    return out, time.perf_counter() - t0


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


# ------------------------------------------------------------------ the sweep
def run_group(args, device, dtype, budgets, mode, length, heads, rows, write, deadline, liger=False):
    """All rows of one (mode, length): one model and one generation (no cap: it does not depend on
    the budget, the head or the micro-batch), then for each budget each head's micro-batch sweep."""
    set_budget(device, None)
    _free(device)
    base = {"mode": mode, "completion_len": length, "n_samples": args.n_samples, "prompt_len": args.prompt_len,
            "liger": liger}
    model = inner = None
    try:
        model, params, inner, _ = prepare(args.shape, args.layers, mode, device, dtype, not args.no_grad_checkpointing)
        if liger:
            from rlsc.liger import apply_liger_kernels

            apply_liger_kernels(inner, device)
        g = torch.Generator(device="cpu").manual_seed(0)
        prompt = torch.randint(0, inner.config.vocab_size, (args.n_samples, args.prompt_len), generator=g).to(device)
        _free(device)
        weights_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None
        if args.gen_warmup:  # compile / record the graphs outside the timing (a trainer pays this once)
            generate(inner, prompt, min(length, 8), args.sampler, device)
        _free(device)
        completion, gen_s = generate(inner, prompt, length, args.sampler, device)
        gen_peak = _peak_mb(device)
    except Exception as e:  # noqa: BLE001
        error = "generation: " + _error_text(e)
        del e
        for budget in budgets:
            for head in heads:
                rows.append({**base, "budget_gb": budget, "head": head + ("+liger" if liger else ""),
                             "micro_batch": None, "fits": None, "error": error})
        write()
        del model, inner
        _free(device)
        return
    ids = torch.cat([prompt, completion], 1)
    targets = completion
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for budget in budgets:
        set_budget(device, budget)
        for head in heads:
            for mb in args.micro_batches:
                if time.time() > deadline:
                    rows.append({**base, "budget_gb": budget, "head": head, "micro_batch": mb, "fits": None,
                                 "error": "skipped: time budget"})
                    continue
                model.load_state_dict(initial)  # every row starts from the same weights
                row = {**base, "budget_gb": budget, "head": head + ("+liger" if liger else ""), "micro_batch": mb,
                       "gen_seconds": gen_s, "gen_peak_mb": gen_peak, "weights_mb": weights_mb}
                opt = torch.optim.AdamW(params, lr=1e-5)
                try:
                    _free(device)
                    row["loss"] = update(inner, opt, LOSSES[head], ids, targets, args.prompt_len, mb)  # warm-up
                    _sync(device)
                    times = []
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        update(inner, opt, LOSSES[head], ids, targets, args.prompt_len, mb)
                        _sync(device)
                        times.append(time.perf_counter() - t0)
                    row["update_seconds"] = _quantile(times, 0.5)
                    row["update_peak_mb"] = _peak_mb(device)
                    row["optimizer_state_mb"] = state_bytes(opt) / 2**20
                    if device.type == "cuda":  # sampling runs while the optimizer state is alive
                        row["peak_mb"] = max(row["update_peak_mb"], gen_peak + row["optimizer_state_mb"])
                        row["fits"] = budget is None or row["peak_mb"] <= budget * 1024
                    else:
                        row["peak_mb"], row["fits"] = None, True
                    row["step_seconds"] = gen_s + row["update_seconds"]
                except Exception as e:  # noqa: BLE001
                    row["fits"] = False if is_oom(e) else None
                    row["error"] = _error_text(e)
                    row["peak_mb"] = _peak_mb(device)
                    del e
                opt.zero_grad(set_to_none=True)
                del opt
                model.zero_grad(set_to_none=True)
                _free(device)
                rows.append(row)
                write()
                print(json.dumps(row), flush=True)
                if row.get("fits") and not args.all_micro_batches:
                    break
    set_budget(device, None)
    from rlsc.decoding import release_static_decoders

    release_static_decoders(inner)
    del model, inner, initial
    _free(device)


def rollout_rows(args, device, dtype, length, write, rows):
    """Generation only, n_samples x length, eager generate vs the dynamic loop vs the static loop."""
    set_budget(device, None)
    model, _, inner, _ = prepare(args.shape, args.layers, "full", device, dtype, grad_ckpt=False)
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, inner.config.vocab_size, (args.n_samples, args.prompt_len), generator=g).to(device)
    for sampler in ("generate", "dynamic", "static"):
        row = {"rollout": sampler, "n_samples": args.n_samples, "completion_len": length, "prompt_len": args.prompt_len}
        try:
            generate(model, prompt, min(length, 8), sampler, device)  # warm-up (compiles the static graph)
            _free(device)
            out, secs = generate(model, prompt, length, sampler, device)
            row.update(seconds=secs, tokens=int(out.numel()), peak_mb=_peak_mb(device),
                       ms_per_token_step=secs / max(out.shape[1], 1) * 1e3)
        except Exception as e:  # noqa: BLE001
            row["error"] = _error_text(e)
            del e
        rows.append(row)
        write()
        print(json.dumps(row), flush=True)
    base = next((r["seconds"] for r in rows if r.get("rollout") == "generate" and "seconds" in r), None)
    for r in rows:
        if base and "seconds" in r:
            r["speedup_vs_generate"] = base / r["seconds"]
    del model
    _free(device)


def headline(rows: list[dict], budget_gb: float = 24) -> str:
    """One sentence: the largest configuration each head trains within budget_gb (from the rows)."""
    parts = []
    heads = []
    for r in rows:
        if "head" in r and r["head"] not in heads:
            heads.append(r["head"])
    for head in heads:
        ok = [r for r in rows if r.get("head") == head and r.get("budget_gb") == budget_gb and r.get("fits")]
        if not ok:
            parts.append(f"{head} trains no configuration tried")
            continue
        # largest: full fine-tuning over LoRA, then the longest completions, then the largest micro-batch
        best = max(ok, key=lambda r: (r["mode"] == "full", r["completion_len"], r["micro_batch"]))
        what = "full fine-tuning" if best["mode"] == "full" else "LoRA r16"
        parts.append(f"{head} trains {what} at {best['n_samples']} x {best['completion_len']} tokens with micro-batch "
                     f"{best['micro_batch']} (peak {best['peak_mb'] / 1024:.1f} GB, step {best['step_seconds']:.1f} s)"
                     if best.get("peak_mb") is not None else
                     f"{head} trains {what} at {best['n_samples']} x {best['completion_len']} tokens with micro-batch "
                     f"{best['micro_batch']}")
    where = f"In {budget_gb:g} GB" if budget_gb is not None else "Without a memory budget (CPU)"
    return f"{where}: " + ("; ".join(parts) if parts else "no rows") + "."


def plot(doc: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["results"] if "head" in r and r.get("micro_batch") is not None]
    budgets = sorted({r["budget_gb"] for r in rows if r["budget_gb"] is not None}, reverse=True) or [None]
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4.5), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        sel = [r for r in rows if r["budget_gb"] == budget]
        labels = sorted({(r["head"], r["mode"], r["completion_len"]) for r in sel})
        for i, (head, mode, length) in enumerate(labels):
            pts = [r for r in sel if (r["head"], r["mode"], r["completion_len"]) == (head, mode, length)]
            for r in pts:
                y = r.get("peak_mb") or 0
                ax.scatter(i, y / 1024, marker="o" if r.get("fits") else "x",
                           color="tab:green" if r.get("fits") else "tab:red")
                ax.annotate(f"mb{r['micro_batch']}", (i, y / 1024), fontsize=7, xytext=(4, 0), textcoords="offset points")
        if budget is not None:
            ax.axhline(budget, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{h}\n{m}\n{n}" for h, m, n in labels], fontsize=7)
        ax.set_ylabel("peak memory of the step (GB; x = out of memory)")
        ax.set_title(f"budget {budget} GB" if budget is not None else "no budget")
    fig.suptitle(doc.get("headline", ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None):
    from .train_step import MODELS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-math-1.5b", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--budgets-gb", default="24,16", help="comma-separated budgets (CUDA only; ignored on CPU)")
    ap.add_argument("--completion-lens", default="1024,3072")
    ap.add_argument("--micro-batches", default="16,8,4,2,1", help="tried in this order")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--modes", default="full,lora16")
    ap.add_argument("--heads", default="ours,naive")
    ap.add_argument("--sampler", default="static", choices=("static", "dynamic", "generate"))
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--all-micro-batches", action="store_true")
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    ap.add_argument("--no-gen-warmup", dest="gen_warmup", action="store_false")
    ap.add_argument("--rollouts", action="store_true", help="also time generate / dynamic / static generation")
    ap.add_argument("--rollout-len", type=int, default=1024)
    ap.add_argument("--liger", action="store_true", help="also the update with Liger's body kernels (CUDA; run last)")
    ap.add_argument("--liger-only", action="store_true", help="skip the budget sweep: rollouts and Liger rows only")
    ap.add_argument("--time-budget-s", type=float, default=1e9, help="rows not started by then are skipped")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    args = ap.parse_args(argv)
    args.micro_batches = _ints(args.micro_batches)
    if args.prompt_len < 1 or args.n_samples < 1 or not args.micro_batches or min(args.micro_batches) < 1:
        raise SystemExit("--prompt-len, --n-samples and every --micro-batches entry must be >= 1")
    heads = [h for h in args.heads.split(",") if h]
    modes = [m for m in args.modes.split(",") if m]
    for name, got, allowed in (("--heads", heads, HEADS), ("--modes", modes, MODES)):
        if not got or any(x not in allowed for x in got):
            raise SystemExit(f"{name} expects a comma-separated subset of {', '.join(allowed)}, got {got}")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    budgets = [float(b) for b in args.budgets_gb.split(",") if b] if device.type == "cuda" else [None]
    out = args.out or Path(__file__).parent / "results" / f"memory_budget-{device.type}.json"
    png = args.png or out.with_suffix(".png")
    deadline = time.time() + args.time_budget_s
    doc = {"device": device_name(device), "torch": torch.__version__, "commit": git_commit(),
           "date": datetime.date.today().isoformat(),
           "config": {"shape": args.shape, "layers": args.layers, "dtype": str(dtype), "sampler": args.sampler,
                      "grad_checkpointing": not args.no_grad_checkpointing, "optimizer": "AdamW lr 1e-5",
                      "temperature": TEMPERATURE, "alpha": ALPHA, "budgets_gb": budgets,
                      "total_gb": (torch.cuda.get_device_properties(device).total_memory / 2**30
                                   if device.type == "cuda" else None)},
           "results": [], "rollouts": []}

    def write():
        doc["headline"] = headline(doc["results"], 24) if 24.0 in budgets else headline(doc["results"], budgets[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")

    t0 = time.time()
    if not args.liger_only:
        for mode in modes:
            for length in _ints(args.completion_lens):
                if time.time() > deadline:
                    doc["results"].append({"budget_gb": None, "mode": mode, "completion_len": length,
                                           "fits": None, "error": "skipped: time budget"})
                    continue
                run_group(args, device, dtype, budgets, mode, length, heads, doc["results"], write, deadline)
    if args.rollouts and time.time() < deadline:
        rollout_rows(args, device, dtype, args.rollout_len, write, doc["rollouts"])
    if args.liger:  # the update with and without Liger at n_samples x rollout_len, full FT, no budget
        for liger in (False, True):
            if time.time() < deadline:
                run_group(args, device, dtype, [None], "full", args.rollout_len, ["ours"] if liger else ["ours", "naive"],
                          doc["results"], write, deadline, liger=liger)
    set_budget(device, None)
    write()
    try:
        plot(doc, png)
        print(f"# wrote {png}")
    except Exception as e:  # noqa: BLE001
        print(f"# plot failed: {_error_text(e)}")
    print(f"# {doc['headline']}")
    print(f"# wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
