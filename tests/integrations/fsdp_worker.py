"""One rank of the FSDP2 test (run by torchrun with gloo on CPU): a tiny Llama, every layer and the
root fully_shard-ed (the head separately too with HEAD_SHARDED=1), the fused head forward and
backward; compares log-probs and the gathered gradients with the unsharded model in one process.

    torchrun --nproc_per_node 2 tests/integrations/fsdp_worker.py   (env: MIXED=1 for a bf16 policy)
"""
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from rlsc_kernels.integrations.transformers import add_fused_lm_head  # noqa: E402
from tests.integrations.models import batch, tiny_model  # noqa: E402
from tests.worker_exit import exit_after_success  # noqa: E402


def main():
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mixed = os.environ.get("MIXED") == "1"
    reference = tiny_model(dtype=torch.float32, seed=0)
    model = copy.deepcopy(reference)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed else MixedPrecisionPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    if os.environ.get("HEAD_SHARDED") == "1":
        fully_shard(model.lm_head, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    assert isinstance(model.lm_head.weight, DTensor)

    ids, mask, labels = batch(B=4, T=10, seed=1)
    mine = slice(2 * rank, 2 * rank + 2)  # each rank its own half of the batch
    add_fused_lm_head(model, temperature=0.8, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids[mine], attention_mask=mask[mine], labels=labels[mine], fused_lm_head=True)
    (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
    if os.environ.get("HEAD_SHARDED") == "1":  # the op ran inside the head's FSDP forward
        assert "_rlsc_fused_head" in model.lm_head.__dict__

    add_fused_lm_head(reference, temperature=0.8, outputs=("log_probs", "entropy"))
    ref_out = reference(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    # FSDP averages gradients over ranks: the reference loss is the mean of the ranks' losses.
    ((ref_out.log_probs.sum() + 0.5 * ref_out.entropy.sum()) / dist.get_world_size()).backward()

    tol = dict(rtol=5e-2, atol=5e-2) if mixed else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.log_probs, ref_out.log_probs[mine].detach(), **tol)
    torch.testing.assert_close(out.entropy, ref_out.entropy[mine].detach(), **tol)
    ref_grads = dict(reference.named_parameters())
    checked = 0
    for name, param in model.named_parameters():
        grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
        ref = ref_grads[name].grad
        scale = ref.abs().max().item()
        torch.testing.assert_close(grad.float(), ref, rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-3), msg=name)
        checked += 1
    assert checked and model.lm_head.weight.grad is not None
    if rank == 0:
        print(f"FSDP2 OK: {checked} gradients match (mixed={mixed}, head sharded={os.environ.get('HEAD_SHARDED')})")
    dist.barrier()   # both ranks done before gloo is torn down (a rank tearing down alone once aborted at exit)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_after_success()
