"""Run TRL's fused LM head on this package's op.

    import rlsc_kernels.integrations.trl as rk_trl
    rk_trl.enable()      # before or after building the trainer; every call from then on
    trainer = GRPOTrainer(...); trainer.train()
    rk_trl.disable()     # TRL's own kernel again
    with rk_trl.enabled(): ...   # or only inside a block

TRL (>= 1.16) gives every model its trainers touch a fused head (``trl.trainer.utils.
add_fused_lm_head``): ``model(..., labels=labels, fused_lm_head=True)`` projects the final hidden
states through ``trl.kernels.ChunkedLogProbFunction``. ``enable()`` replaces that Function, where
TRL looks it up at call time, by an adapter with the same arguments and results that computes the
log-probs and entropies with ``rlsc_kernels.linear_logprobs``. TRL's wrapper stays in charge of
everything around the kernel (backbone, label shift, masks, FSDP2 gather, the MoE auxiliary loss),
so GRPO, RLOO, DPO, KTO, SFT and any trainer built on ``add_fused_lm_head`` run on our op.

What the adapter does with TRL's arguments:
  - logit_scale s and final_logit_softcapping c: z = c * tanh(s * (W h + b) / c) / T, the scale
    folded into the hidden states and bias, the cap passed as the op's ``softcap=``;
  - compute dtype: the autocast dtype when autocast is on, else the hidden states' dtype (TRL's rule);
  - TRL's non-differentiable extra statistics (``log_sum_sq_probs``, ``mean_logits``, ``is_top1``,
    asked for by DPO, KTO and SFT for metrics) are not computed by our op: for those calls TRL's own
    kernel runs once more under no_grad for the extras only (one extra forward sweep, no backward);
  - TRL's ``chunk_size`` (its vocabulary tile) is ignored: the op plans its own blocks.
enable(), disable() and enabled() patch process-wide state (TRL's module globals), so they take one
lock: threads may call them concurrently; ``with enabled():`` blocks nest and overlap across
threads, and the last one to leave restores TRL's kernel unless enable() was called explicitly.
Not supported: DeepSpeed ZeRO-3 (TRL re-gathers the partitioned head inside its kernel's
backward; our op does not), so the adapter raises there.
"""
from __future__ import annotations

import contextlib
import inspect
import threading

import torch

from ..api import linear_logprobs
from .transformers import scaled_op_inputs

#: TRL versions enable() accepts: the adapter mirrors ChunkedLogProbFunction.apply's arguments in
#: these releases (checked again by signature when enabling).
SUPPORTED_TRL = (">=1.16", "<1.17")
_OUR_OUTPUTS = ("log_probs", "entropy")
_EXPECTED_ARGS = ("hidden", "weight", "bias", "targets", "temperature", "chunk_size",
                  "final_logit_softcapping", "logit_scale", "outputs")
# Where TRL's Function was found before enable() replaced it: (module, attribute) -> original.
_replaced: dict = {}
# Guards _replaced, the patched TRL names and the two counters below (re-entrant: enabled() calls enable()).
_lock = threading.RLock()
_scoped_holders = 0      # `with enabled():` blocks currently open, in any thread
_scoped_owns = False     # whether those blocks enabled it (so the last one out disables it)


def _check_trl():
    try:
        import trl
    except ImportError as exc:
        raise ImportError(
            "rlsc_kernels.integrations.trl needs TRL: pip install 'rlsc-kernels[trl]' "
            f"(supported: trl {','.join(SUPPORTED_TRL)})"
        ) from exc
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = Version(trl.__version__)
    if version not in SpecifierSet(",".join(SUPPORTED_TRL)):
        raise RuntimeError(
            f"rlsc_kernels.integrations.trl supports trl {','.join(SUPPORTED_TRL)}; found trl {trl.__version__}. "
            "Its fused-head kernel interface may differ there: install a supported TRL, or use "
            "rlsc_kernels.integrations.transformers.add_fused_lm_head directly"
        )
    from trl.kernels import chunked_logprob

    original = _replaced.get((chunked_logprob, "ChunkedLogProbFunction"), chunked_logprob.ChunkedLogProbFunction)
    params = tuple(inspect.signature(original.forward).parameters)[1:]
    if params != _EXPECTED_ARGS:
        raise RuntimeError(
            f"trl {trl.__version__}'s ChunkedLogProbFunction takes {params}, expected {_EXPECTED_ARGS}; "
            "this TRL is not supported"
        )
    return chunked_logprob


class RlscChunkedLogProb:
    """Stand-in for ``trl.kernels.ChunkedLogProbFunction``: ``apply(hidden [N, H], weight [V, H],
    bias [V] | None, targets [N], temperature, chunk_size, final_logit_softcapping, logit_scale,
    outputs)`` -> (logprobs, entropy, log_sum_sq_probs, mean_logits, is_top1), each [N] or None,
    log-probs and entropies differentiable, float32."""

    #: TRL's own Function (for the extra statistics), set by enable().
    trl_function = None

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")):
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

        if is_deepspeed_zero3_enabled():
            raise NotImplementedError(
                "rlsc_kernels.integrations.trl does not support DeepSpeed ZeRO-3 (the head would have to be "
                "re-gathered in the backward); call rlsc_kernels.integrations.trl.disable() to use TRL's kernel"
            )
        if hidden.shape[0] == 0:
            # No scored token in this micro-batch: empty outputs still connected to the inputs, so
            # TRL's masked_scatter hands back a differentiable zero.
            empty = hidden.float().sum(-1) * 0.0 + weight[:1].float().sum() * 0.0
            return (empty, empty.clone() if "entropy" in outputs else None,
                    *(empty.detach().clone() if name in outputs else None
                      for name in ("log_sum_sq_probs", "mean_logits", "is_top1")))
        device_type = hidden.device.type
        # Under autocast the op casts: the masters' gradients are never rounded to 16 bits (a
        # GradScaler-scaled gradient neither overflows nor flushes). Else one dtype here.
        keep_autocast = torch.is_autocast_enabled(device_type)
        dtype = torch.promote_types(hidden.dtype, weight.dtype) if keep_autocast else None
        h, w, b = scaled_op_inputs(hidden, weight, bias, logit_scale, dtype, default_dtype=hidden.dtype)
        want_entropy = "entropy" in outputs
        softcap = {"softcap": float(final_logit_softcapping)} if final_logit_softcapping is not None else {}
        with contextlib.nullcontext() if keep_autocast else torch.autocast(device_type, enabled=False):
            result = linear_logprobs(h, w, targets, bias=b, temperature=temperature, return_entropy=want_entropy,
                                     filter_eps=None, **softcap)
        logprobs, entropy = result if want_entropy else (result, None)
        extras: tuple = (None, None, None)
        asked = tuple(o for o in outputs if o not in _OUR_OUTPUTS)
        if asked:
            with torch.no_grad():
                extras = RlscChunkedLogProb.trl_function.apply(
                    hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, asked
                )[2:]
        return (logprobs, entropy, *extras)


def enable() -> None:
    """Make TRL's fused LM head (every trainer that uses ``add_fused_lm_head``) compute on our op.
    Raises ImportError without TRL and RuntimeError for an unsupported TRL version. Idempotent."""
    global _scoped_owns
    with _lock:
        _scoped_owns = False  # an explicit enable() outlives any open `with enabled():` block
        _enable_locked()


def _enable_locked() -> None:
    chunked_logprob = _check_trl()
    import trl.kernels
    import trl.trainer.utils

    RlscChunkedLogProb.trl_function = _replaced.get((chunked_logprob, "ChunkedLogProbFunction"),
                                                    chunked_logprob.ChunkedLogProbFunction)
    # trl.trainer.utils looks the Function up as a module global on every call.
    for module, name in ((trl.trainer.utils, "_ChunkedLogProbFunction"), (trl.kernels, "ChunkedLogProbFunction"),
                         (chunked_logprob, "ChunkedLogProbFunction")):
        if (module, name) not in _replaced:
            _replaced[(module, name)] = getattr(module, name)
        setattr(module, name, RlscChunkedLogProb)


def disable() -> None:
    """Give TRL its own kernel back (no-op when not enabled)."""
    global _scoped_owns
    with _lock:
        _scoped_owns = False
        for (module, name), original in list(_replaced.items()):
            setattr(module, name, original)
            del _replaced[(module, name)]


def is_enabled() -> bool:
    with _lock:
        return bool(_replaced)


@contextlib.contextmanager
def enabled():
    """``with enabled(): trainer.train()``: TRL's fused head on our op inside the block only (unless
    it was enabled before the first open block, or enable() is called meanwhile)."""
    global _scoped_holders, _scoped_owns
    with _lock:
        if not _replaced:
            _scoped_owns = True   # this block turns it on, so the last block out turns it off
        elif _scoped_holders == 0:
            _scoped_owns = False  # on before any block: stays on
        _enable_locked()
        _scoped_holders += 1
    try:
        yield
    finally:
        with _lock:
            _scoped_holders -= 1
            if _scoped_holders == 0 and _scoped_owns:
                disable()
