"""One rank of the vocab-parallel tests, launched by test_vocab_parallel.py under torchrun (gloo):

    python -m torch.distributed.run --standalone --nproc_per_node K vocab_parallel_worker.py CASES OUT

Loads the cases (inputs in float64 plus options) from CASES, runs each on this rank's slice of
the head through the public ops with vocab_parallel=, and saves every output, gradient, error
message and all-reduce call (op, dtype, numel) to OUT/rank{r}.pt. The comparison against the
single-process op happens in the test, which calls `run_case` below without vocab_parallel.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import rlsc_kernels as rk

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
from tests.worker_exit import exit_after_success  # noqa: E402

ENTROPY_WEIGHT = 0.3


def case_inputs(case, dtype=None):
    """The case's inputs rounded to its dtype (then cast to `dtype`, e.g. float64 for the oracle)."""
    out = {}
    for name, value in case["inputs"].items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name in ("hidden", "weight", "bias"):
            value = value.to(case["dtype"])
            if dtype is not None:
                value = value.to(dtype)
        out[name] = value
    return out


def run_case(case, *, dtype=None, backend=None, vocab_parallel=None):
    """Forward + backward of one case. Returns name -> float64 tensor (the rank's dweight / dbias
    slice under vocab_parallel, the full ones otherwise)."""
    x = case_inputs(case, dtype)
    weight, bias = x["weight"], x.get("bias")
    if vocab_parallel is not None:
        weight = weight[vocab_parallel.start:vocab_parallel.stop]
        bias = bias[vocab_parallel.start:vocab_parallel.stop] if bias is not None else None
    hh = x["hidden"].clone().requires_grad_()
    ww = weight.clone().requires_grad_()
    bb = bias.clone().requires_grad_() if bias is not None else None
    kw = dict(case.get("options", {}))
    if vocab_parallel is not None:
        kw["vocab_parallel"] = vocab_parallel
    backend = backend or case["backend"]
    if case["op"] == "double-backward":
        logp = rk.linear_logprobs(hh, ww, x["targets"], bias=bb, backend=backend, **kw)
        (dh,) = torch.autograd.grad(logp.square().sum(), hh, create_graph=True)
        dh.sum().backward()
        raise AssertionError("double backward did not raise")
    if case["op"] == "token_stats":  # rlsc_kernels.linear_token_stats: logp, entropy, self-certainty
        st = rk.linear_token_stats(hh, ww, x["targets"], bias=bb, temperature=case["temperature"], backend=backend, **kw)
        g = x["grad_logp"].to(st.logp.dtype)
        e = x["grad_entropy"].to(st.logp.dtype)
        ((st.logp * g).sum() + ENTROPY_WEIGHT * (st.entropy * e).sum() + (st.self_certainty * (g - e)).sum()).backward()
        out = {"logp": st.logp, "entropy": st.entropy, "self_certainty": st.self_certainty}
    elif case["op"] == "logprobs":
        return_entropy = case.get("return_entropy", True)
        res = rk.linear_logprobs(hh, ww, x["targets"], bias=bb, temperature=case["temperature"],
                                 return_entropy=return_entropy, backend=backend, **kw)
        logp, ent = res if return_entropy else (res, None)
        loss = (logp * x["grad_logp"].to(logp.dtype)).sum()
        out = {"logp": logp}
        if ent is not None:
            loss = loss + ENTROPY_WEIGHT * (ent * x["grad_entropy"].to(ent.dtype)).sum()
            out["entropy"] = ent
        loss.backward()
    else:
        weighting = x["weighting"] if "weighting" in x else case["weighting"]
        if case.get("module"):  # the nn.Module wrapper, vocab_parallel among its options
            head = rk.LinearRLSCLoss(temperature=case["temperature"], weighting=weighting, reduction=case["reduction"],
                                     backend=backend, return_entropy=True, **kw)
            res = head(hh, ww, x["targets"], completion_mask=x.get("completion_mask"), seq_index=x.get("seq_index"),
                       bias=bb)
        else:
            res = rk.linear_rlsc_loss(hh, ww, x["targets"], completion_mask=x.get("completion_mask"),
                                      seq_index=x.get("seq_index"), bias=bb, temperature=case["temperature"],
                                      weighting=weighting, reduction=case["reduction"], backend=backend,
                                      return_entropy=True, **kw)
        res.loss.backward()
        out = {"loss": res.loss, "seq_logp": res.seq_logp, "seq_weight": res.seq_weight,
               "token_logp": res.token_logp, "token_entropy": res.token_entropy}
    out["dhidden"] = hh.grad
    out["dweight"] = ww.grad
    if bb is not None:
        out["dbias"] = bb.grad
    return {k: v.detach().double() for k, v in out.items()}


def main(cases_path: str, out_path: str) -> None:
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    calls = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append((str(op).split(".")[-1], str(tensor.dtype).replace("torch.", ""), tensor.numel(), tensor.element_size()))
        return all_reduce(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = counting_all_reduce
    results = []
    for case in torch.load(cases_path, weights_only=False):
        group, group_rank = None, rank
        if "group_ranks" in case:  # a subgroup: every rank creates it, only its members run the case
            group = dist.new_group(case["group_ranks"])
            if rank not in case["group_ranks"]:
                results.append({"outputs": None, "calls": [], "error": None, "skipped": True})
                continue
            group_rank = dist.get_rank(group)
        start, stop = case["shards"][group_rank]
        calls.clear()
        try:
            vp = rk.VocabParallel(start, stop, group=group)
            outputs = run_case(case, vocab_parallel=vp)
            results.append({"outputs": outputs, "calls": list(calls), "error": None})
        except Exception as exc:  # the test checks the message (bad-input cases)
            results.append({"outputs": None, "calls": list(calls), "error": f"{type(exc).__name__}: {exc}"})
    torch.save(results, f"{out_path}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2])
    exit_after_success()
