"""The head the fused op scores is the head the model samples from: logit scaling folded into the
temperature, soft-capped heads scored through the op's softcap, LoRA on lm_head scored through the
adapter, unknown transforms and leftover dropout caught at the start of a run; one 16-bit weight
copy per step, no micro-batch left alive."""
from __future__ import annotations

import copy
import weakref

import pytest
import torch

import rlsc_kernels as rk
from rlsc.data import Problem
from rlsc.sampling import sample
from rlsc.step import LossOptions, Scorer, check_head_matches_forward, rlsc_update
from rlsc_kernels.integrations.transformers import FusedHead

from conftest import make_model
from test_step import naive_algorithm1_loss

T, ALPHA = 0.5, 0.1


def _tiny(config_cls, tok, **extra):
    import transformers

    cfg = getattr(transformers, config_cls)(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, config_cls.replace("Config", "ForCausalLM"))(cfg)
    return model.float().eval()


def _rollouts(model, tok, n=4, L=10):
    torch.manual_seed(1)
    return sample(model, tok, [Problem("a", "What is 3 * 4?", "", "t")], template="{question}", num_samples=n,
                  max_new_tokens=L, temperature=T)


class _RecordGrads(torch.optim.SGD):
    """An optimizer that records the gradients it is asked to apply and applies nothing."""

    def step(self, closure=None):
        self.grads = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]


def _assert_update_matches_naive(model, tok, rollouts=None):
    """The trainer's gradients equal those of the naive loss on the model's own logits."""
    rollouts = rollouts or _rollouts(model, tok)
    fused, naive = copy.deepcopy(model), copy.deepcopy(model)
    opt = _RecordGrads([p for p in fused.parameters() if p.requires_grad], lr=1.0)
    stats = rlsc_update(fused, opt, rollouts, LossOptions(temperature=T, alpha=ALPHA, micro_batch_size=3, filter_eps=None))
    loss, L = naive_algorithm1_loss(naive, rollouts, T, ALPHA)
    torch.testing.assert_close(stats.seq_logp.double(), L.detach(), rtol=1e-5, atol=1e-4)
    loss.backward()
    naive_grads = [(n, p.grad) for n, p in naive.named_parameters() if p.requires_grad]
    assert len(naive_grads) == len(opt.grads)
    for (name, g_naive), g_fused in zip(naive_grads, opt.grads):
        # both are fp32 sums over tokens: agreement to a small multiple of fp32 rounding of the largest entry
        torch.testing.assert_close(g_fused, g_naive, rtol=0, atol=1e-5 * float(g_naive.abs().max()) + 1e-12, msg=name)
    return stats


@pytest.mark.parametrize("config_cls, extra", [
    ("CohereConfig", {"logit_scale": 0.25}),             # logits * logit_scale
    ("GraniteConfig", {"logits_scaling": 4.0}),          # logits / logits_scaling
    ("GraniteConfig", {"logits_scaling": 0.5}),
])
def test_scaled_heads_are_scored_as_they_sample(tiny_tokenizer, config_cls, extra):
    model = _tiny(config_cls, tiny_tokenizer, **extra)
    head = FusedHead(model)
    assert head.scale != 1.0 and head.op_options(T)["temperature"] == pytest.approx(T / head.scale)
    check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))
    _assert_update_matches_naive(model, tiny_tokenizer)


def test_soft_capped_head_trains_exactly(tiny_tokenizer):
    """Gemma 2 (final_logit_softcapping, a cap small enough to bend the logits): the trainer's
    log-probs and gradients equal the naive loss on the model's own (capped) logits."""
    model = _tiny("Gemma2Config", tiny_tokenizer, final_logit_softcapping=1.5, head_dim=8, sliding_window=512)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)   # logits well beyond the cap
    assert FusedHead(model).op_options(T)["softcap"] == pytest.approx(1.5)
    check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))
    _assert_update_matches_naive(model, tiny_tokenizer)


def test_dropout_left_on_is_caught_at_the_start(tiny_tokenizer):
    """A dropout the trainer cannot switch off (here a hook drawing random noise in train mode) fails
    the start-of-run check instead of making every score a different draw."""
    model = make_model(tiny_tokenizer, seed=1)
    check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))
    model.model.layers[0].mlp.register_forward_hook(
        lambda mod, args, out: torch.nn.functional.dropout(out, 0.5, training=mod.training))
    with pytest.raises(NotImplementedError, match="twice in train mode"):
        check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))


def test_unknown_logit_transform_is_caught_against_the_models_own_logits(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=1)
    check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))  # a plain head passes
    real_forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.logits = out.logits * 1.5   # a transform no config field announces
        return out

    model.forward = scaled_forward
    with pytest.raises(NotImplementedError, match="logits are not softcap"):
        check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))


def test_lora_on_lm_head_trains_the_adapter_exactly(tiny_tokenizer):
    pytest.importorskip("peft")
    from rlsc.models import apply_lora

    model = apply_lora(make_model(tiny_tokenizer, seed=9, tie=False), rank=4, alpha=8.0,
                       target_modules="lm_head,q_proj")
    with torch.no_grad():  # B starts at zero (so A gets no gradient at step 1): make it non-zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))
    head_params = {n for n, p in model.named_parameters() if "lm_head" in n and p.requires_grad}
    assert {"lora_A", "lora_B"} <= {part for n in head_params for part in n.split(".")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _assert_update_matches_naive(model, tiny_tokenizer)
    rlsc_update(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0),
                _rollouts(model, tiny_tokenizer), LossOptions(temperature=T, micro_batch_size=2, filter_eps=None))
    for n in head_params:  # the head's adapters really moved
        assert not torch.equal(dict(model.named_parameters())[n], before[n]), n


def test_one_weight_copy_per_step_and_no_micro_batch_outlives_its_turn(tiny_tokenizer, monkeypatch):
    """Under bf16 autocast the op gets the same 16-bit weight storage in every micro-batch (one
    cast per step), and the hidden states of micro-batch i are gone when micro-batch i+1 starts."""
    model = make_model(tiny_tokenizer, seed=4)
    rollouts = _rollouts(model, tiny_tokenizer, n=7)
    seen = []
    real = rk.linear_rlsc_loss

    def spy(hidden, weight, *args, **kwargs):
        assert all(ref() is None for ref, _ in seen), "a previous micro-batch's hidden states are still alive"
        seen.append((weakref.ref(hidden), weight.data_ptr()))
        assert weight.dtype == torch.bfloat16
        return real(hidden, weight, *args, **kwargs)

    monkeypatch.setattr(rk, "linear_rlsc_loss", spy)
    casts = []
    real_init = Scorer.__init__

    def counting_init(self, *a, **k):
        real_init(self, *a, **k)
        casts.append(self.head.weight_copies)

    monkeypatch.setattr(Scorer, "__init__", counting_init)
    stats = rlsc_update(model, torch.optim.SGD(model.parameters(), lr=1e-3), rollouts,
                        LossOptions(micro_batch_size=2, autocast_dtype=torch.bfloat16))
    assert len(seen) == 4 and len({ptr for _, ptr in seen}) == 1
    assert casts == [1]
    assert model.lm_head.weight.dtype == torch.float32 and not stats.skipped


def test_fp32_head_is_passed_without_a_copy(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=4)
    head = FusedHead(model, reuse_weight=True)
    h, w, b = head.inputs(torch.randn(3, 32))
    assert w is model.lm_head.weight and head.weight_copies == 0


def test_non_finite_gradient_skips_the_update(tiny_tokenizer):
    model = make_model(tiny_tokenizer, seed=4)
    rollouts = _rollouts(model, tiny_tokenizer, n=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    handle = model.model.layers[0].mlp.up_proj.weight.register_hook(lambda g: g * float("nan"))
    stats = rlsc_update(model, opt, rollouts, LossOptions(micro_batch_size=2))
    handle.remove()
    assert stats.skipped
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert not opt.state  # the optimizer never stepped: no moments, no step count
    assert all(p.grad is None for p in model.parameters())
    stats = rlsc_update(model, opt, rollouts, LossOptions(micro_batch_size=2))
    assert not stats.skipped and any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lm_head_multiplier_is_folded_into_the_temperature(tiny_tokenizer):
    """Falcon-H1 style `lm_head_multiplier` (logits * m), on a tiny Llama whose forward applies it."""
    model = make_model(tiny_tokenizer, seed=2)
    model.config.lm_head_multiplier = 2.5

    def multiply_logits(module, args, out):  # a hook survives the deepcopies below
        out.logits = out.logits * 2.5
        return out

    model.register_forward_hook(multiply_logits)
    assert FusedHead(model).op_options(T)["temperature"] == pytest.approx(T / 2.5)
    check_head_matches_forward(model, torch.tensor([[5, 6, 7, 8]]))
    _assert_update_matches_naive(model, tiny_tokenizer)


@pytest.mark.parametrize("native_gemm", [True, False])
def test_bf16_sampling_logits_are_fp32_products_of_the_bf16_operands(tiny_tokenizer, monkeypatch, native_gemm):
    """A decode step under CPU bf16 autocast draws from the fp32 logits of the bf16-rounded hidden
    state and weight (what the op scores): through the CPU's bf16 GEMM where usable, else through
    an fp32 copy of the weight made once per head, not per step."""
    import rlsc_kernels.integrations.transformers as integration

    if native_gemm and integration.native_bf16_linear(torch.zeros(1, 2, dtype=torch.bfloat16),
                                                       torch.zeros(3, 2, dtype=torch.bfloat16)) is None:
        pytest.skip("no bf16 GEMM on this CPU")
    if not native_gemm:
        monkeypatch.setattr(integration, "native_bf16_linear", lambda h, w: None)
    model = make_model(tiny_tokenizer, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        head = FusedHead(model, reuse_weight=True)
        h = torch.randn(5, 32) * 3
        z1, z2 = head.logits(h, 0.5), head.logits(h + 1, 0.5)
    w16 = model.lm_head.weight.detach().bfloat16().double()
    for hh, z in ((h, z1), (h + 1, z2)):
        exact = hh.bfloat16().double() @ w16.T / 0.5
        assert z.dtype == torch.float32
        torch.testing.assert_close(z.double(), exact, rtol=1e-6, atol=1e-5)
    assert (head._prepared_fp32 is None) == native_gemm      # the fallback's copy: made once, kept
