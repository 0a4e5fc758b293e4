"""--liger-kernels: clear errors off CUDA and for model types Liger has no patch for; on CUDA the
patched body gives the same logits as the plain one (bf16 tolerance) and no Liger cross-entropy."""
from __future__ import annotations

import pytest
import torch

from rlsc.config import RLSCConfig
from rlsc.liger import apply_liger_kernels

from conftest import make_model

pytest.importorskip("liger_kernel")


def test_cpu_is_refused_with_a_clear_error(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="--liger-kernels needs a CUDA device"):
        apply_liger_kernels(model, torch.device("cpu"))


def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=16))
    with pytest.raises(ValueError, match="no patch for model type 'gpt2'"):
        apply_liger_kernels(model, torch.device("cuda"))


def test_config_refuses_liger_on_cpu():
    with pytest.raises(ValueError, match="--liger-kernels needs a CUDA device"):
        RLSCConfig(liger_kernels=True, device="cpu").validate("train")
    RLSCConfig(liger_kernels=True, device="auto").validate("train")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_patched_qwen2_body_matches_the_plain_one():
    from transformers.models.qwen2 import modeling_qwen2

    saved = dict(vars(modeling_qwen2))  # Liger also patches the module (new instances, RoPE): undo it after
    try:
        _check_patched_qwen2_body()
    finally:
        for name, value in saved.items():
            setattr(modeling_qwen2, name, value)


def _check_patched_qwen2_body():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, max_position_embeddings=256)
    torch.manual_seed(0)
    plain = Qwen2ForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    exact = Qwen2ForCausalLM(cfg).cuda().double().eval()
    exact.load_state_dict(plain.state_dict())
    patched = Qwen2ForCausalLM(cfg).cuda().to(torch.bfloat16).eval()
    patched.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 1000, (3, 77), device="cuda")
    with torch.no_grad():
        ref = exact(input_ids=ids).logits
        same_dtype = plain(input_ids=ids).logits.double()
        applied = apply_liger_kernels(patched, torch.device("cuda"))
        got = patched(input_ids=ids).logits.double()
    assert applied == ["rms_norm", "swiglu", "rope"]
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    assert patched.model.norm.forward.__func__ is LigerRMSNorm.forward
    assert patched.model.layers[0].mlp.forward.__func__ is LigerSwiGLUMLP.forward
    assert ((got - ref).abs().max() <= (same_dtype - ref).abs().max() * 2 + 1e-2)
