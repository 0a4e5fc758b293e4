"""--precision auto on a CPU: bf16-autocast only where it is measured faster (rlsc.train.load)."""
from __future__ import annotations

import time

import torch

from rlsc_kernels.backends import native

from . import decoding

#: bf16-autocast is chosen on a CPU only where a decode step measures at most this share of fp32's
CPU_BF16_MAX_RATIO = 0.9


def choose_cpu_precision(model, *, rows: int = 16, prompt_tokens: int = 8, steps: int = 4,
                         train_tokens: int = 8) -> tuple[str, str]:
    """('bf16-autocast' or 'fp32', why) for `model` (fp32 weights, on the CPU) under --precision
    auto: bf16-autocast where the CPU has bf16 units (AMX-BF16 or AVX512-BF16) and a miniature of a
    training step takes at most CPU_BF16_MAX_RATIO of its fp32 time in it. The miniature: a greedy
    decode of `steps` tokens for `rows` rows after a `prompt_tokens`-token prompt (sampling) and the
    body's forward + backward over rows x train_tokens tokens (the update, which gains the most
    from bf16: 1.6x on an AMD EPYC with AVX512-BF16 where decoding gained 1.1x). Measured once per
    mode after a warm-up, on one thread, in process CPU time: a ratio of GEMM-bound work that other
    processes on the machine barely move (wall time on a shared machine made the choice flip).
    Greedy and no optimizer: the random stream, the weights and their gradients are untouched.
    A few seconds of a run."""
    amx, avx512_bf16 = native.cpu_bf16_units()
    if not (amx or avx512_bf16):
        return "fp32", "no bf16 units on this CPU (neither AMX-BF16 nor AVX512-BF16)"
    from .models import body_and_head

    body, _ = body_and_head(model)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(rows * prompt_tokens).reshape(rows, prompt_tokens) * 7919) % vocab
    train_ids = (torch.arange(rows * train_tokens).reshape(rows, train_tokens) * 104729) % vocab
    mask = torch.ones_like(ids, dtype=torch.bool)
    grads = [(p, p.grad) for p in model.parameters()]
    was_training, threads = model.training, torch.get_num_threads()

    def miniature(bf16: bool, decode_steps: int, tokens: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            t0 = time.process_time()
            model.eval()
            decoding.decode(model, ids, mask, max_new_tokens=decode_steps, temperature=None, eos_ids=[-1], pad_id=0)
            model.train()
            hidden = body(input_ids=tokens).last_hidden_state
            inputs = [p for p in body.parameters() if p.requires_grad]
            torch.autograd.grad(hidden.float().square().mean(), inputs, allow_unused=True)
            return time.process_time() - t0

    torch.set_num_threads(1)
    try:
        for bf16 in (False, True):                      # warm-up: first-call allocations, autocast's casts
            miniature(bf16, 1, train_ids[:2, :2])
        fp32, bf16 = miniature(False, steps, train_ids), miniature(True, steps, train_ids)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
        for p, g in grads:
            p.grad = g
    units = "AMX-BF16" if amx else "AVX512-BF16"
    choice = "bf16-autocast" if bf16 <= CPU_BF16_MAX_RATIO * fp32 else "fp32"
    return choice, (f"{units}; a miniature training step ({rows}-row decode of {steps} tokens, forward + backward "
                    f"over {rows} x {train_tokens} tokens) took {bf16:.2f} s in bf16-autocast, {fp32:.2f} s in fp32, "
                    f"one thread (bf16 needs <= {CPU_BF16_MAX_RATIO:g}x)")
