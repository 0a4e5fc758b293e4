"""rlsc-kernels: fused linear log-probs and the RLSC (self-confidence) loss without logits.

    import rlsc_kernels as rk
    logp = rk.linear_logprobs(hidden, weight, targets, temperature=0.5)
    out = rk.linear_rlsc_loss(hidden, weight, targets, completion_mask=mask)
    out.loss.backward()
"""
from .api import LinearRLSCLoss, RLSCLossOutput, linear_logprobs, linear_rlsc_loss
from .label_free import TokenStats, linear_self_certainty, linear_token_stats
from .options import AUTO_FILTER_EPS, BlockConfigs, FusedOptions, KernelConfig
from .vocab_parallel import VocabParallel
from .weighting import WEIGHTINGS, rlsc_weights

__all__ = [
    "linear_logprobs",
    "linear_rlsc_loss",
    "linear_token_stats",
    "linear_self_certainty",
    "TokenStats",
    "LinearRLSCLoss",
    "RLSCLossOutput",
    "rlsc_weights",
    "WEIGHTINGS",
    "FusedOptions",
    "AUTO_FILTER_EPS",
    "BlockConfigs",
    "KernelConfig",
    "VocabParallel",
]
__version__ = "0.1.0"
