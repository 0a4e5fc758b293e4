"""add_fused_lm_head against each model's own full-logits forward (float64 oracle)."""
from __future__ import annotations

import pytest
import torch

from rlsc_kernels.integrations.transformers import add_fused_lm_head, logit_transform, remove_fused_lm_head

from .models import VOCAB, batch, oracle, tiny_model


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _fused_and_oracle_grads(model, ids, mask, labels, *, temperature, outputs=("log_probs", "entropy"), **kw):
    """Gradients of sum(g * logp) + sum(e * entropy) (fixed random g, e) through both paths."""
    gen = torch.Generator().manual_seed(7)
    g = torch.randn(labels[:, 1:].shape, generator=gen, dtype=torch.float64)
    e = torch.randn(labels[:, 1:].shape, generator=gen, dtype=torch.float64)
    model.zero_grad()
    ref_logp, ref_ent = oracle(model, ids, mask, labels, temperature=temperature)
    ((ref_logp * g).sum() + (ref_ent * e).sum()).backward()
    ref = _grads(model)
    add_fused_lm_head(model, temperature=temperature, outputs=outputs, **kw)
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    ((out.log_probs * g).sum() + (out.entropy * e).sum()).backward()
    return out, ref_logp.detach(), ref_ent.detach(), ref, _grads(model)


def _assert_grads_close(got, ref, rtol=1e-9, atol=1e-11):
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "cohere", "granite", "gemma2"])
def test_fused_head_log_probs_entropy_and_grads_match_the_models_own_logits(kind):
    model = tiny_model(kind)
    ids, mask, labels = batch()
    out, ref_logp, ref_ent, ref_grads, grads = _fused_and_oracle_grads(model, ids, mask, labels, temperature=0.7)
    assert out.log_probs.shape == (3, 10) and out.log_probs.dtype == torch.float64
    torch.testing.assert_close(out.log_probs, ref_logp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-10, atol=1e-12)
    assert (out.log_probs[labels[:, 1:] == -100] == 0).all()
    valid = labels[:, 1:] != -100
    torch.testing.assert_close(out.loss, -ref_logp.sum() / valid.sum())
    assert torch.equal(out.label_mask, valid)
    _assert_grads_close(grads, ref_grads)


def test_scaled_heads_read_their_scale_from_the_config():
    assert logit_transform(tiny_model("cohere").config) == (0.37, None)
    assert logit_transform(tiny_model("granite").config) == (1 / 2.5, None)
    assert logit_transform(tiny_model("llama").config) == (1.0, None)
    assert logit_transform(tiny_model("gemma2").config) == (1.0, 2.0)


def test_tied_embeddings_get_the_gradient_of_both_uses():
    model = tiny_model("qwen2", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask, labels = batch()
    out, ref_logp, _, ref_grads, grads = _fused_and_oracle_grads(model, ids, mask, labels, temperature=1.0)
    torch.testing.assert_close(out.log_probs, ref_logp, rtol=1e-10, atol=1e-12)
    _assert_grads_close(grads, ref_grads)


def test_shift_labels_are_scored_without_shifting():
    model = tiny_model()
    ids, mask, labels = batch()
    add_fused_lm_head(model)
    shifted = torch.cat([labels[:, 1:], torch.full((labels.shape[0], 1), -100)], dim=1)
    a = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    b = model(input_ids=ids, attention_mask=mask, shift_labels=shifted, fused_lm_head=True)
    assert b.log_probs.shape == ids.shape
    torch.testing.assert_close(b.log_probs[:, :-1], a.log_probs, rtol=0, atol=0)
    assert (b.log_probs[:, -1] == 0).all()


def test_num_items_in_batch_divides_the_summed_nll():
    model = tiny_model()
    ids, mask, labels = batch()
    add_fused_lm_head(model)
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, num_items_in_batch=50)
    torch.testing.assert_close(out.loss, -out.log_probs.sum() / 50)


def test_fp32_model_matches_its_own_logits_to_fp32_rounding():
    model = tiny_model(dtype=torch.float32)
    ids, mask, labels = batch()
    with torch.no_grad():
        ref_logp, _ = oracle(model, ids, mask, labels, temperature=0.5)
        add_fused_lm_head(model, temperature=0.5)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.log_probs.dtype == torch.float32 and out.entropy is None
    torch.testing.assert_close(out.log_probs.double(), ref_logp, rtol=1e-5, atol=1e-5)


def test_micro_batch_without_scored_tokens_gives_a_differentiable_zero():
    model = tiny_model()
    ids, mask, _ = batch()
    labels = torch.full_like(ids, -100)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert (out.log_probs == 0).all() and (out.entropy == 0).all() and out.loss == 0
    out.loss.backward()
    grads = _grads(model)
    assert "lm_head.weight" in grads and "model.embed_tokens.weight" in grads
    assert all((g == 0).all() for g in grads.values())


def test_generation_and_plain_forward_are_unchanged():
    model = tiny_model(dtype=torch.float32)
    ids, mask, _ = batch(B=2, T=6)
    before = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    logits = model(input_ids=ids, attention_mask=mask).logits
    add_fused_lm_head(model)
    after = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(before, after)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, logits, rtol=0, atol=0)
    remove_fused_lm_head(model)
    assert "forward" not in model.__dict__
    assert model(input_ids=ids, attention_mask=mask, fused_lm_head=True).logits.shape == (2, 6, VOCAB)


def test_lora_on_the_head_is_scored_through_the_adapter():
    peft = pytest.importorskip("peft")
    model = tiny_model()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(model, config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: make the adapter change the logits
            torch.nn.init.normal_(p, std=0.3)
    ids, mask, labels = batch()
    out, ref_logp, ref_ent, ref_grads, grads = _fused_and_oracle_grads(peft_model, ids, mask, labels, temperature=0.9)
    torch.testing.assert_close(out.log_probs, ref_logp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.entropy, ref_ent, rtol=1e-10, atol=1e-12)
    assert any("lm_head.lora_A" in n for n in grads) and any("lm_head.lora_B" in n for n in grads)
    _assert_grads_close(grads, ref_grads)
    # The adapter really matters: without it the log-probs differ.
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    assert (plain - out.log_probs).abs().max() > 1e-3


def test_bad_arguments_are_named():
    model = tiny_model()
    with pytest.raises(ValueError, match="outputs"):
        add_fused_lm_head(model, outputs=("log_probs", "is_top1"))
    with pytest.raises(ValueError, match="temperature"):
        add_fused_lm_head(model, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        add_fused_lm_head(model, backend="cuda")
    with pytest.raises(TypeError, match="model"):
        add_fused_lm_head(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['buffer_size'\\]"):
        add_fused_lm_head(model, buffer_size=3)
    add_fused_lm_head(model)
    ids, mask, _ = batch()
    with pytest.raises(ValueError, match="labels"):
        model(input_ids=ids, attention_mask=mask, fused_lm_head=True)
    bad = torch.full_like(ids, VOCAB + 3)
    with pytest.raises(ValueError, match="targets"):
        model(input_ids=ids, attention_mask=mask, labels=bad, fused_lm_head=True)


@pytest.mark.parametrize("kind", ["cohere", "granite", "gemma2"])
def test_head_inputs_reproduce_the_models_logits(kind):
    """head_inputs + op_options(T), and FusedHead.logits (what the samplers draw from), give the
    model's own logits / T (float64 model: to rounding)."""
    from rlsc_kernels.integrations.transformers import FusedHead, head_inputs

    model = tiny_model(kind)
    ids, mask, _ = batch()
    T = 0.7
    with torch.no_grad():
        hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state.reshape(-1, model.config.hidden_size)
        logits = model(input_ids=ids, attention_mask=mask).logits.reshape(-1, VOCAB) / T
        inputs = head_inputs(model, hidden)
        opts = inputs.op_options(T)
        z = inputs.hidden @ inputs.weight.T + (inputs.bias if inputs.bias is not None else 0)
        if opts["softcap"] is not None:
            z = opts["softcap"] * torch.tanh(z / opts["softcap"])
        torch.testing.assert_close(z / opts["temperature"], logits, rtol=1e-10, atol=1e-10)
        sampled_from = FusedHead(model).logits(hidden, T)
    assert sampled_from.dtype == torch.float32
    torch.testing.assert_close(sampled_from, logits.float(), rtol=1e-5, atol=1e-5)


def test_check_head_matches_forward_catches_an_unknown_transform():
    from rlsc_kernels.integrations.transformers import check_head_matches_forward

    model = tiny_model("gemma2")
    ids, _, _ = batch()
    assert check_head_matches_forward(model, ids[:1]) < 1e-6
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 1.5)
    with pytest.raises(NotImplementedError, match="transforms its logits"):
        check_head_matches_forward(model, ids[:1])


def test_op_options_are_forwarded():
    model = tiny_model()
    ids, mask, labels = batch()
    add_fused_lm_head(model)
    ref = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    add_fused_lm_head(model, backend="torch", buffer_bytes=8 * VOCAB * 3, check_values=False)  # 3-row chunks
    got = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True).log_probs
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_moe_loss_includes_the_router_load_balancing_loss_like_the_models_own():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=24, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.3)
    model = transformers.MixtralForCausalLM(cfg)  # float32: its expert matmuls take no float64
    ids, mask, labels = batch()
    with torch.no_grad():
        own = model(input_ids=ids, attention_mask=mask, labels=labels)
        add_fused_lm_head(model)
        out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    assert out.aux_loss is not None and own.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, own.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss, own.loss, rtol=1e-5, atol=1e-6)
