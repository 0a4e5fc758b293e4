"""TRL's fused LM head against ours, through a whole Hugging Face model: a GRPO-style scoring pass.

One pass = what GRPOTrainer does per micro-batch: model(input_ids, attention_mask, labels,
fused_lm_head=True) with the prompt and padding labelled -100, per-token log-probs and entropies,
then backward of the policy-gradient surrogate -sum(adv * log_probs) / n_tokens through the whole
model (random weights, gradient checkpointing as RL trainers run it at this length). Rows:
    trl        TRL's add_fused_lm_head on TRL's ChunkedLogProbFunction (Triton on CUDA, torch on CPU)
    rlsc-trl   the same TRL wrapper after rlsc_kernels.integrations.trl.enable(): our op inside
    rlsc       rlsc_kernels.integrations.transformers.add_fused_lm_head
    naive      the model's own logits, log_softmax, gather (--naive; materialises [B, T, V])
Time: median and 20/80th percentiles of whole passes (benchmarks/timing.py). Peak memory: above
what was allocated before the pass (weights, inputs), so it includes the gradients of the
weights, the activations and the head's buffers; the rows differ by the head only.

    python -m benchmarks.trl_head --device cuda --shape qwen2.5-1.5b --out benchmarks/results/trl_head-cuda.json
    python -m benchmarks.trl_head --device cpu --shape cpu-small --out benchmarks/results/trl_head-cpu.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

import torch

from rlsc.provenance import git_commit

from .timing import cleanup, peak_memory_mb, time_call

# Qwen2.5-1.5B: the real shape (tied embeddings, V = 151936), 16 x 1024 completion tokens.
# cpu-small: the same vocabulary (the head is what differs between rows) on a 2-layer, 256-wide
# body, 4 x 256 completion tokens, so that a pass takes seconds on a few CPU cores.
SHAPES = {
    "qwen2.5-1.5b": dict(config=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                     num_attention_heads=12, num_key_value_heads=2),
                         batch=16, prompt=128, completion=1024, dtype="bfloat16"),
    "cpu-small": dict(config=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2),
                      batch=4, prompt=32, completion=256, dtype="float32"),
}
VOCAB = 151936
TEMPERATURE = 0.7


def build_model(shape: dict, device: torch.device, checkpointing: bool):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, tie_word_embeddings=True, max_position_embeddings=4096,
                      attn_implementation="sdpa", use_cache=False, **shape["config"])
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg).to(getattr(torch, shape["dtype"]))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def make_batch(shape: dict, device: torch.device):
    """GRPO-style batch: a prompt, then a completion right-padded to a varying length."""
    gen = torch.Generator().manual_seed(1)
    B, P, C = shape["batch"], shape["prompt"], shape["completion"]
    ids = torch.randint(0, VOCAB, (B, P + C), generator=gen)
    lengths = C - torch.randint(0, C // 4, (B,), generator=gen)
    mask = (torch.arange(P + C)[None, :] < (P + lengths)[:, None]).long()
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :P] = -100
    advantages = torch.randn(B, generator=gen)
    return ids.to(device), mask.to(device), labels.to(device), advantages.to(device)


def unpatch(model):
    from rlsc_kernels.integrations import trl as rk_trl
    from rlsc_kernels.integrations.transformers import remove_fused_lm_head

    remove_fused_lm_head(model)
    model.__dict__.pop("forward", None)  # TRL's patch is an instance attribute
    rk_trl.disable()


def patch(model, impl: str):
    unpatch(model)
    outputs = ("log_probs", "entropy")
    if impl in ("trl", "rlsc-trl"):
        from trl.trainer.utils import add_fused_lm_head as trl_head

        if impl == "rlsc-trl":
            from rlsc_kernels.integrations import trl as rk_trl

            rk_trl.enable()
        trl_head(model, temperature=TEMPERATURE, outputs=outputs)
    elif impl == "rlsc":
        from rlsc_kernels.integrations.transformers import add_fused_lm_head

        add_fused_lm_head(model, temperature=TEMPERATURE, outputs=outputs)
    elif impl != "naive":
        raise ValueError(f"unknown implementation {impl!r}")


def scoring_pass(model, impl, ids, mask, labels, advantages):
    """Forward + backward of one GRPO-style micro-batch; returns the detached per-token log-probs."""
    if impl == "naive":
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / TEMPERATURE
        logp_all = torch.log_softmax(logits, -1)
        y = labels[:, 1:]
        log_probs = logp_all.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1) * (y != -100)
    else:
        log_probs = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    scored = labels[:, 1:] != -100
    loss = -(log_probs * advantages[:, None] * scored).sum() / scored.sum()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return log_probs.detach()


def environment(device: torch.device) -> dict:
    import transformers

    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "machine": platform.machine(), "cpu_count": os.cpu_count(),
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    for name in ("trl", "triton"):
        try:
            env[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            env[name] = None
    env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    env["commit"] = git_commit()
    try:  # which of our backends backend="auto" picks for this device (CPU: native if built, else torch)
        from rlsc_kernels import backends

        env["rlsc_auto_backend"] = backends.resolve("auto", torch.empty(1, 1, device=device))
    except Exception as exc:  # noqa: BLE001
        env["rlsc_auto_backend"] = f"unknown ({type(exc).__name__})"
    try:
        env["load_average"] = os.getloadavg()
    except OSError:
        pass
    return env


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="default: qwen2.5-1.5b on CUDA, cpu-small on CPU")
    parser.add_argument("--impls", default="trl,rlsc-trl,rlsc", help="comma-separated rows (also: naive)")
    parser.add_argument("--naive", action="store_true", help="add the full-logits row")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation (more memory)")
    parser.add_argument("--target-ms", type=float, default=3000.0, help="time budget per row for the timed passes")
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. shared cores)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    shape_name = args.shape or ("qwen2.5-1.5b" if device.type == "cuda" else "cpu-small")
    shape = SHAPES[shape_name]
    impls = [i for i in args.impls.split(",") if i] + (["naive"] if args.naive else [])
    model = build_model(shape, device, checkpointing=not args.no_checkpointing)
    ids, mask, labels, advantages = make_batch(shape, device)
    result = {"benchmark": "trl_head", "shape": shape_name, **{k: v for k, v in shape.items() if k != "config"},
              "model": shape["config"] | {"vocab_size": VOCAB}, "temperature": TEMPERATURE,
              "scored_tokens": int((labels[:, 1:] != -100).sum()), "gradient_checkpointing": not args.no_checkpointing,
              "env": environment(device), "note": args.note, "rows": []}
    reference = None
    for impl in impls:
        row = {"impl": impl}
        try:
            patch(model, impl)
            run = lambda: scoring_pass(model, impl, ids, mask, labels, advantages)  # noqa: E731
            row.update(time_call(run, device, warmup=1, target_ms=args.target_ms, min_reps=3, max_reps=10))
            peak, log_probs = peak_memory_mb(run, device)
            row["peak_mb"] = round(peak, 1)
            if reference is None:
                reference = log_probs.float()
            row["max_abs_logp_diff_vs_first_row"] = float((log_probs.float() - reference).abs().max())
        except Exception as exc:  # noqa: BLE001 - a failing row is recorded, the others still run
            row["error"] = f"{type(exc).__name__}: {exc}"[:500]
        finally:
            unpatch(model)
            cleanup(device)
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
