"""The op under other people's code.

transformers: ``add_fused_lm_head(model)`` gives any causal LM a fused head (per-token log-probs
    and entropies from the final hidden states, never the [batch, seq, vocab] logits).
trl: ``enable()`` / ``disable()`` run TRL's own fused head on this package's op.

Each submodule imports its third-party library lazily, so ``import rlsc_kernels`` never needs them.
"""
