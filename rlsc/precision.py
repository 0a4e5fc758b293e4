"""--precision auto on a CPU: bf16-autocast only where it is measured faster (rlsc.train.load)."""
from __future__ import annotations

import time

import torch

from rlsc_kernels.backends import native

from . import decoding

#: bf16-autocast is chosen on a CPU only where a decode step measures at most this share of fp32's
CPU_BF16_MAX_RATIO = 0.9


def choose_cpu_precision(model, *, rows: int = 16, prompt_tokens: int = 8, steps: int = 8) -> tuple[str, str]:
    """('bf16-autocast' or 'fp32', why) for `model` (fp32 weights, on the CPU) under --precision
    auto: bf16-autocast where the CPU has bf16 units (AMX-BF16 or AVX512-BF16) and a greedy decode
    of `steps` tokens for `rows` rows after a short prompt (sampling is most of a CPU run's time)
    takes at most CPU_BF16_MAX_RATIO of its fp32 time. Measured fp32, bf16, fp32, bf16, the faster
    of each, on one thread in process CPU time: the ratio of two GEMM-bound runs, which other
    processes on the machine barely move (wall time on a shared machine made the choice flip).
    Greedy: the random stream is not touched. A few seconds of a run."""
    amx, avx512_bf16 = native.cpu_bf16_units()
    if not (amx or avx512_bf16):
        return "fp32", "no bf16 units on this CPU (neither AMX-BF16 nor AVX512-BF16)"
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(rows * prompt_tokens).reshape(rows, prompt_tokens) * 7919) % vocab
    mask = torch.ones_like(ids, dtype=torch.bool)
    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(1)
    seconds = {"fp32": [], "bf16-autocast": []}
    try:
        for _ in range(2):
            for mode in seconds:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode != "fp32"):
                    t0 = time.process_time()
                    decoding.decode(model, ids, mask, max_new_tokens=steps, temperature=None, eos_ids=[-1], pad_id=0)
                    seconds[mode].append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    fp32, bf16 = min(seconds["fp32"]), min(seconds["bf16-autocast"])
    units = "AMX-BF16" if amx else "AVX512-BF16"
    choice = "bf16-autocast" if bf16 <= CPU_BF16_MAX_RATIO * fp32 else "fp32"
    return choice, (f"{units}; a {rows}-row greedy decode of {steps} tokens took {bf16:.2f} s in bf16-autocast, "
                    f"{fp32:.2f} s in fp32, one thread (bf16 needs <= {CPU_BF16_MAX_RATIO:g}x)")
