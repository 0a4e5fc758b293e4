"""One RLSC training step, generation excluded: the naive step (Algorithm 1: full logits) against
ours (the model body's hidden states + rlsc_kernels.linear_rlsc_loss), on a randomly initialised
model with the Qwen2.5-Math-1.5B configuration (no download).

Both steps do the same work: forward of the body, the RLSC loss (T = 0.5, alpha = 0.1, weights
exp(L_s) + alpha detached, mean over sequences), backward, AdamW step (lr 1e-5), zero_grad.
Reported: median step time with spread (CUDA events), and peak memory (absolute, and above the
memory held before the step: model, gradients' absence, optimizer state).

Realism: the untied lm_head is scaled so the model's mean token entropy at T matches the measured
one (the Qwen2.5-Math-1.5B checkpoint ties it to the embedding; untying adds V x D parameters to
both variants alike), and the completion tokens are samples from the model's own softmax at T
given the (random) context, drawn in one no-grad pass. Gradient checkpointing is on by default,
as an RL trainer at 16 x 1088 tokens would use it.

    python -m benchmarks.train_step                        # GPU: Qwen2.5-Math-1.5B shape, 16 x (64 + 1024)
    python -m benchmarks.train_step --model tiny --n-seqs 4 --completion-len 32 --prompt-len 8   # CPU
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from rlsc.provenance import git_commit

from .compare import _error_text, device_name
from .inputs import ALPHA, TEMPERATURE, default_target_entropy, fit_logit_scale, sample_targets
from .timing import _quantile, cleanup

MODELS = {
    # Qwen/Qwen2.5-Math-1.5B config.json (tie_word_embeddings untied here, see the docstring)
    "qwen2.5-math-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                              num_key_value_heads=2, vocab_size=151936, max_position_embeddings=4096,
                              rope_theta=10000.0, rms_norm_eps=1e-6, hidden_act="silu"),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512, rope_theta=10000.0,
                 rms_norm_eps=1e-6, hidden_act="silu"),
}


def build_model(name: str, layers: int | None, device, dtype, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = dict(MODELS[name])
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    config = Qwen2Config(**cfg, tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.to(dtype), cfg


@torch.no_grad()
def make_batch(model, n_seqs, prompt_len, completion_len, temperature, target_entropy, device, seed=0):
    """Random context ids [B, P+L]; head scaled to the target entropy; targets [B, L] sampled at T."""
    g = torch.Generator(device=device).manual_seed(seed)
    V = model.config.vocab_size
    ids = torch.randint(0, V, (n_seqs, prompt_len + completion_len), generator=g, device=device)
    hidden = model.model(input_ids=ids).last_hidden_state[:, prompt_len - 1 : prompt_len + completion_len - 1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    W = model.lm_head.weight
    probe = (hidden[:256].float() @ W.float().T) / temperature
    W.mul_(fit_logit_scale(probe, target_entropy))
    targets, entropy = sample_targets(hidden, W, temperature, g)
    return ids, targets.reshape(n_seqs, completion_len), entropy


def naive_loss(model, ids, targets, prompt_len, temperature, alpha):
    """Algorithm 1: full logits of the completion positions, fp32 log_softmax, gather, weights, loss."""
    L = targets.shape[1]
    logits = model(input_ids=ids, logits_to_keep=L + 1).logits[:, :-1]  # [B, L, V]: positions P-1 .. P+L-2
    logp = torch.log_softmax(logits.float() / temperature, -1).gather(-1, targets[..., None])[..., 0]
    seq_logp = logp.sum(-1)
    w = torch.exp(seq_logp.detach().double().clamp(max=0)).float() + alpha
    return -(w * seq_logp).mean()


def fused_loss(model, ids, targets, prompt_len, temperature, alpha):
    import rlsc_kernels as rk

    L = targets.shape[1]
    hidden = model.model(input_ids=ids).last_hidden_state[:, prompt_len - 1 : prompt_len + L - 1]
    mask = torch.ones_like(targets, dtype=torch.bool)
    return rk.linear_rlsc_loss(hidden, model.lm_head.weight, targets, completion_mask=mask, temperature=temperature,
                               alpha=alpha, reduction="mean").loss


def run_variant(name, loss_fn, model, batch, args, device) -> dict:
    ids, targets = batch
    row = {"variant": name}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    cuda = device.type == "cuda"

    def step():
        loss = loss_fn(model, ids, targets, args.prompt_len, TEMPERATURE, ALPHA)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    try:
        row["loss"] = float(step())  # warm-up: allocates the optimizer state, compiles/autotunes
        cleanup(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            start_mem = torch.cuda.memory_allocated(device)
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            if cuda:
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
            step()
            if cuda:
                e1.record()
                torch.cuda.synchronize(device)
                times.append(e0.elapsed_time(e1))
            else:
                times.append((time.perf_counter() - t0) * 1e3)
        row.update(median_ms=_quantile(times, 0.5), p20_ms=_quantile(times, 0.2), p80_ms=_quantile(times, 0.8),
                   reps=len(times))
        if cuda:
            peak = torch.cuda.max_memory_allocated(device)
            row["peak_mem_mb"] = peak / 2**20
            row["peak_above_start_mb"] = (peak - start_mem) / 2**20
    except Exception as e:  # noqa: BLE001
        row["error"] = _error_text(e)
        del e
    del opt
    model.zero_grad(set_to_none=True)
    cleanup(device)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-math-1.5b", choices=sorted(MODELS))
    ap.add_argument("--layers", type=int, default=None, help="override the number of layers")
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--completion-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-grad-checkpointing", action="store_true")
    ap.add_argument("--variants", default="fused,naive")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="bfloat16 (GPU default) or float32 (CPU default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.prompt_len < 1:
        raise SystemExit("--prompt-len must be >= 1 (the first completion token is predicted from the prompt)")
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float32": torch.float32}[args.dtype]
    out = args.out or Path(__file__).parent / "results" / f"train_step-{device.type}.json"
    t0 = time.time()
    model, cfg = build_model(args.model, args.layers, device, dtype)
    model.train()
    if not args.no_grad_checkpointing:
        import warnings

        with warnings.catch_warnings():  # renamed activation_checkpointing_enable in newer transformers
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, targets, entropy = make_batch(model, args.n_seqs, args.prompt_len, args.completion_len, TEMPERATURE,
                                       default_target_entropy(), device)
    print(f"# model {args.model} ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B params) ready in "
          f"{time.time() - t0:.1f} s; batch {args.n_seqs} x ({args.prompt_len} + {args.completion_len}); "
          f"mean token entropy {entropy:.3f} nats at T={TEMPERATURE}", flush=True)
    doc = {"device": device_name(device), "torch": torch.__version__, "commit": git_commit(),
           "date": datetime.date.today().isoformat(),
           "config": {"model": args.model, **cfg, "tie_word_embeddings": False, "n_seqs": args.n_seqs,
                      "prompt_len": args.prompt_len, "completion_len": args.completion_len, "dtype": str(dtype),
                      "grad_checkpointing": not args.no_grad_checkpointing, "optimizer": "AdamW lr 1e-5",
                      "temperature": TEMPERATURE, "alpha": ALPHA, "mean_token_entropy": round(entropy, 4)},
           "results": []}
    fns = {"naive": naive_loss, "fused": fused_loss}
    # Every variant starts from the same weights (the optimizer steps of one would change the other's loss).
    initial = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    for v in args.variants.split(","):
        model.load_state_dict(initial)
        row = run_variant(v, fns[v], model, (ids, targets), args, device)
        doc["results"].append(row)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    print(f"# wrote {out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())
