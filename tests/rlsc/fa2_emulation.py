"""FlashAttention-2's masking, emulated on CPU: attn_implementation="fa2_emulated".

transformers' FlashAttention-2 path does not see a 4D mask. It gets the 2D padding mask from
masking_utils.flash_attention_mask (None when it is all ones and as long as the keys), and
_flash_attention_forward then
  - with a mask: slices the keys/values to the mask's length (a StaticCache is longer), unpads the
    keys by the mask, and the queries by the mask itself (q_len == kv_len), not at all (q_len == 1)
    or by its last q_len columns (otherwise: "assumes left padding"); padded queries output 0;
  - without a mask: runs over every key;
and FlashAttention's causal mask is aligned bottom-right: query i of the q_b unpadded queries sees
key j of the k_b unpadded keys iff j <= i + k_b - q_b (and, with a sliding window W < key length,
i + k_b - q_b - j <= W - 1); attention logits are soft-capped when `softcap` is given, dropout is
applied to the probabilities when `dropout` > 0. This module computes exactly that with dense
tensors (float32 softmax), registered under the name "fa2_emulated" with FA2's mask function, so
any transformers model can be built with it. The invariant tests check it equals SDPA on the
dynamic loop (where FA2 is right) before trusting it on the static one.
"""
from __future__ import annotations

import torch

NAME = "fa2_emulated"


def fa2_emulated_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """query [B, H, q, d], key/value [B, Hkv, k, d] -> ([B, q, H, d], None), as flash_attention_forward."""
    B, H, q, d = query.shape
    causal = module.is_causal if is_causal is None else is_causal
    if attention_mask is not None:
        mask = attention_mask.bool()
        if key.shape[2] > mask.shape[-1]:            # _upad_input: a static cache is sliced to the mask
            key, value = key[:, :, : mask.shape[-1]], value[:, :, : mask.shape[-1]]
        k_valid = mask
        if q == key.shape[2]:
            q_valid = mask
        elif q == 1:
            q_valid = torch.ones(B, 1, dtype=torch.bool, device=query.device)
        else:
            q_valid = mask[:, -q:]
    else:
        k_valid = torch.ones(B, key.shape[2], dtype=torch.bool, device=query.device)
        q_valid = torch.ones(B, q, dtype=torch.bool, device=query.device)
    k_len = key.shape[2]
    k_rank = k_valid.long().cumsum(-1) - 1
    q_rank = q_valid.long().cumsum(-1) - 1
    shift = (k_valid.sum(-1) - q_valid.sum(-1))[:, None, None]          # bottom-right alignment
    allowed = k_valid[:, None, :] & q_valid[:, :, None]
    offset = q_rank[:, :, None] + shift - k_rank[:, None, :]           # >= 0: key at or before the query
    if causal:
        allowed &= offset >= 0
    if sliding_window is not None and k_len > sliding_window:
        allowed &= offset <= sliding_window - 1
    groups = H // key.shape[1]
    k = key.repeat_interleave(groups, dim=1).float()
    v = value.repeat_interleave(groups, dim=1).float()
    scale = scaling if scaling is not None else d ** -0.5
    scores = (query.float() @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    if dropout > 0:
        probs = torch.nn.functional.dropout(probs, p=dropout)
    out = (probs @ v) * q_valid[:, None, :, None]
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


def register() -> str:
    """Registers the emulation (idempotent); returns the attn_implementation name to build models with."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(NAME, fa2_emulated_attention)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    return NAME
