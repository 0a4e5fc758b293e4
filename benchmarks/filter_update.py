"""Does the backward's gradient filter change what an RLSC step does to the head?

Real hidden states of the embedded SmolLM2-135M-Instruct on its own sampled completions (the
RLSC setting: 1 question x n samples per step, T = 0.5), then k AdamW steps of the head weight
from the same start, once with the exact backward and once with the filter at AUTO_FILTER_EPS
(what filter_eps="auto" used to mean for bf16 on every Triton path; the default sliced backward
with library matmuls writes the skipped tiles as zeros, the block-sparse matmuls skip them: the
same filtered gradient either way). Reported per step: dW rows
that are exactly 0, the relative difference of dW, and of the AdamW update.

On CPU the filter exists only in the Triton kernels, so they run in Triton's interpreter
(TRITON_INTERPRET=1, set here): keep the token count modest.

    python -m benchmarks.filter_update --samples 8 --max-new-tokens 48 --steps 3 \
        --out benchmarks/results/filter_update-cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from rlsc.provenance import git_commit  # noqa: E402

QUESTIONS = [
    "What is 17 * 23? Answer with a number.",
    "A train travels 180 km in 2.5 hours. What is its average speed in km/h?",
    "What is the sum of the first 20 positive integers?",
    "If 3x + 7 = 25, what is x?",
    "How many minutes are there in 3.5 hours?",
]


def sampled_batch(model, tok, question, samples, max_new_tokens, temperature, seed):
    """(hidden [n, D] of the completion tokens, targets [n], seq [n], S): the body's final states
    at the positions that predict each sampled completion token (prompt and padding excluded)."""
    from rlsc.models import body_and_head

    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    ids = prompt["input_ids"].repeat(samples, 1)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=temperature,
                             top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id)
        P = ids.shape[1]
        completion = out[:, P:]
        # tokens after the first EOS are padding
        eos = (completion == tok.eos_token_id).long()
        after_eos = (eos.cumsum(1) - eos) > 0
        attention = torch.cat([torch.ones_like(ids), (~after_eos).long()], 1)
        body, _ = body_and_head(model)
        hidden = body(input_ids=out, attention_mask=attention).last_hidden_state  # [B, L, D]
    h = hidden[:, P - 1:-1]  # state at t predicts token t + 1
    mask = ~after_eos
    seq = torch.arange(samples)[:, None].expand_as(mask)[mask]
    return h[mask], completion[mask], seq, samples


def head_grad(weight_master, hidden, targets, seq, S, temperature, filter_eps, backward, grad_matmul):
    """dLoss/dW (fp32 copy of the bf16 gradient) of the RLSC loss (weighting "rlsc", alpha 0.1,
    mean over S) with the bf16 head, as the trainer runs it, and the loss.

    Only the backward differs between the two runs, so the sweeps are called directly: the
    forward statistics (lse) and the upstream per-token gradients g_t = -w_s / S come from the
    exact PyTorch backend; dW then comes from the PyTorch backend (exact) or from the Triton
    backward with the filter (in the interpreter: the slow part, so it runs once per step).
    """
    import rlsc_kernels as rk
    from rlsc_kernels.backends import torch_chunked, triton_sweeps
    from rlsc_kernels.options import FusedOptions

    h16, w16 = hidden.bfloat16(), weight_master.detach().bfloat16()
    opts = FusedOptions(temperature=temperature, filter_eps=filter_eps, backward=backward, grad_matmul=grad_matmul)
    with torch.no_grad():
        logp, _, (lse, _, _) = torch_chunked.forward(h16, w16, None, targets, opts)
        seq_logp = torch.zeros(S).index_add(0, seq, logp)
        n_tokens = torch.bincount(seq, minlength=S)
        seq_weight = rk.rlsc_weights(seq_logp, n_tokens, "rlsc", 0.1)
        g = -seq_weight[seq] / S
        loss = float(-(seq_weight * seq_logp).sum() / S)
        needs = (False, True, False)
        if filter_eps is None:
            _, dw, _ = torch_chunked.backward(h16, w16, None, targets, (lse, None), g, None, opts, needs)
        else:
            _, dw, _ = triton_sweeps.backward(h16, w16, None, targets, (lse, None), g, None, opts, needs)
    return dw.to(torch.bfloat16).float(), loss


def main(argv=None):
    import rlsc_kernels as rk
    from rlsc.models import body_and_head, load_model, load_tokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8, help="samples per question (one question per step)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--backward", default="sliced", choices=["sliced", "fused"])
    ap.add_argument("--grad-matmul", default="library", choices=["library", "triton"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    start = time.time()
    torch.manual_seed(args.seed)
    tok = load_tokenizer("embedded")
    model = load_model("embedded", device=torch.device("cpu"), precision="fp32").eval()
    _, head = body_and_head(model)
    W0 = head.weight.detach().float().clone()
    masters = {"exact": W0.clone().requires_grad_(), "filtered": W0.clone().requires_grad_()}
    optims = {k: torch.optim.AdamW([p], lr=args.lr, eps=1e-8, weight_decay=0.0) for k, p in masters.items()}
    eps_of = {"exact": None, "filtered": rk.AUTO_FILTER_EPS}
    rows = []
    for step in range(args.steps):
        question = QUESTIONS[step % len(QUESTIONS)]
        h, y, seq, S = sampled_batch(model, tok, question, args.samples, args.max_new_tokens, args.temperature,
                                     args.seed + step)
        grads, updates, losses = {}, {}, {}
        for name, W in masters.items():
            before = W.detach().clone()
            grads[name], losses[name] = head_grad(W, h, y, seq, S, args.temperature, eps_of[name], args.backward,
                                                  args.grad_matmul)
            W.grad = grads[name].clone()
            optims[name].step()
            optims[name].zero_grad(set_to_none=True)
            updates[name] = W.detach() - before
        ge, gf = grads["exact"], grads["filtered"]
        ue, uf = updates["exact"], updates["filtered"]
        zero_e = (ge == 0).all(1)
        zero_f = (gf == 0).all(1)
        lost = zero_f & ~zero_e  # rows the filter zeroed that have a gradient
        row = {
            "step": step + 1,
            "tokens": int(h.shape[0]),
            "sequences": S,
            "loss_exact": losses["exact"],
            "dW_rows_exactly_zero_exact": int(zero_e.sum()),
            "dW_rows_exactly_zero_filtered": int(zero_f.sum()),
            "dW_rel_diff": float((gf - ge).norm() / ge.norm()),
            "dW_rel_norm_of_zeroed_rows": float(ge[lost].norm() / ge.norm()),
            "update_rel_diff": float((uf - ue).norm() / ue.norm()),
            "update_rows_zero_filtered_but_moving_exact": int(((uf == 0).all(1) & ~(ue == 0).all(1)).sum()),
            "mean_abs_update_on_zeroed_rows_over_lr": float(ue[lost].abs().mean() / args.lr) if lost.any() else 0.0,
            "param_rel_diff_from_start": float((masters["filtered"].detach() - masters["exact"].detach()).norm()
                                               / (masters["exact"].detach() - W0).norm()),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "what": "RLSC head update with and without the gradient filter (AUTO_FILTER_EPS), embedded SmolLM2-135M",
        "vocab": int(W0.shape[0]), "hidden": int(W0.shape[1]), "args": vars(args),
        "device": "cpu (Triton interpreter)", "torch": torch.__version__,
        "triton": __import__("triton").__version__, "python": platform.python_version(),
        "commit": git_commit(),
        "seconds": round(time.time() - start, 1), "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
