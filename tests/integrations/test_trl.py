"""rlsc_kernels.integrations.trl: TRL's fused head on our op, down to a real GRPOTrainer step."""
from __future__ import annotations

import string

import pytest
import torch

trl = pytest.importorskip("trl")

import rlsc_kernels.integrations.trl as rk_trl  # noqa: E402

from .models import tiny_model  # noqa: E402


@pytest.fixture(autouse=True)
def _always_disable():
    yield
    rk_trl.disable()


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(string.ascii_lowercase + string.digits + " ")))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def _grpo_step(tmp_path, tokenizer, *, beta):
    """One GRPOTrainer step on a tiny random Llama; returns (logged loss, gradients, entropy metric)."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    # Saved and loaded by path, so that with beta > 0 TRL can build its reference model from it.
    model_dir = tmp_path / "init"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    captured = {}

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            captured["grads"] = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}

        def on_log(self, args, state, control, logs=None, **kwargs):
            captured.setdefault("logs", []).append(dict(logs or {}))

    prompts = datasets.Dataset.from_dict({"prompt": ["abc 12", "hello", "x y z", "count 3"]})
    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=1, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, beta=beta, temperature=0.8, bf16=False, fp16=False, dataloader_num_workers=0,
    )
    trainer = trl.GRPOTrainer(
        model=str(model_dir), reward_funcs=lambda completions, **_: [float(len(c)) for c in completions], args=args,
        train_dataset=prompts, processing_class=tokenizer, callbacks=[Capture()],
    )
    trainer.train()
    logs = next(log for log in captured["logs"] if "loss" in log)
    return logs, captured["grads"]


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_step_on_our_op_has_trls_loss_and_gradients(tmp_path, beta):
    tokenizer = _tokenizer()
    trl_logs, trl_grads = _grpo_step(tmp_path / "trl", tokenizer, beta=beta)
    rk_trl.enable()
    calls = []
    original = rk_trl.linear_logprobs
    rk_trl.linear_logprobs = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        our_logs, our_grads = _grpo_step(tmp_path / "ours", tokenizer, beta=beta)
    finally:
        rk_trl.linear_logprobs = original
    assert calls, "the trainer never reached our op"
    assert trl_grads.keys() == our_grads.keys() and "lm_head.weight" in our_grads
    for name in trl_grads:
        scale = trl_grads[name].abs().max().item()
        torch.testing.assert_close(our_grads[name], trl_grads[name], rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=name)
    assert any(g.abs().max() > 0 for g in our_grads.values())
    for key in ("loss", "entropy"):
        assert our_logs[key] == pytest.approx(trl_logs[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_adapter_matches_trls_function_with_scale_softcap_bias_and_extras(softcap):
    """The adapter against TRL's own Function on one tile set: outputs and gradients."""
    from trl.kernels import ChunkedLogProbFunction

    gen = torch.Generator().manual_seed(0)
    N, H, V = 37, 16, 53
    h = torch.randn(N, H, generator=gen)
    w = torch.randn(V, H, generator=gen)
    b = torch.randn(V, generator=gen) * 0.1
    y = torch.randint(0, V, (N,), generator=gen)
    outputs = ("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs")
    results = []
    for fn in (ChunkedLogProbFunction, rk_trl.RlscChunkedLogProb):
        rk_trl.RlscChunkedLogProb.trl_function = ChunkedLogProbFunction
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, b))
        out = fn.apply(hh, ww, bb, y, 0.7, 16, softcap, 0.8, outputs)
        (out[0].sum() + 0.3 * out[1].sum()).backward()
        results.append((out, hh.grad, ww.grad, bb.grad))
    (ref, *ref_grads), (got, *got_grads) = results
    for r, g in zip(ref, got):
        if r.dtype == torch.bool:
            assert torch.equal(r, g)
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    for r, g in zip(ref_grads, got_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_enable_checks_the_trl_version(monkeypatch):
    monkeypatch.setattr(trl, "__version__", "0.9.0")
    with pytest.raises(RuntimeError, match="supports trl >=1.16,<1.17; found trl 0.9.0"):
        rk_trl.enable()
    assert not rk_trl.is_enabled()


def test_enable_and_disable_swap_the_function_trl_calls():
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    original = trl_utils._ChunkedLogProbFunction
    rk_trl.enable()
    rk_trl.enable()
    assert trl_utils._ChunkedLogProbFunction is rk_trl.RlscChunkedLogProb
    assert chunked_logprob.ChunkedLogProbFunction is rk_trl.RlscChunkedLogProb
    rk_trl.disable()
    assert trl_utils._ChunkedLogProbFunction is original
    with rk_trl.enabled():
        assert trl_utils._ChunkedLogProbFunction is rk_trl.RlscChunkedLogProb
    assert trl_utils._ChunkedLogProbFunction is original and not rk_trl.is_enabled()


def test_trl_add_fused_lm_head_on_our_op_matches_the_models_logits():
    from trl.trainer.utils import add_fused_lm_head

    from .models import batch, oracle

    model = tiny_model(dtype=torch.float32)
    ids, mask, labels = batch()
    with torch.no_grad():
        ref_logp, ref_ent = oracle(model, ids, mask, labels, temperature=0.6)
    rk_trl.enable()
    add_fused_lm_head(model, temperature=0.6, outputs=("log_probs", "entropy"))
    out = model(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
    torch.testing.assert_close(out.log_probs.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), ref_ent, rtol=1e-5, atol=1e-5)


def test_adapter_with_no_scored_token_gives_a_differentiable_empty_result():
    from trl.kernels import ChunkedLogProbFunction

    rk_trl.RlscChunkedLogProb.trl_function = ChunkedLogProbFunction
    h = torch.randn(0, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    logp, entropy, *_ = rk_trl.RlscChunkedLogProb.apply(h, w, None, torch.zeros(0, dtype=torch.long), 1.0, 16,
                                                          None, 1.0, ("log_probs", "entropy"))
    assert logp.shape == (0,) and entropy.shape == (0,)
    (torch.zeros(3).masked_scatter(torch.zeros(3, dtype=torch.bool), logp).sum() + entropy.sum()).backward()
    assert (w.grad == 0).all() and h.grad.shape == (0, 8)


def test_concurrent_enable_and_disable_never_lose_trls_function():
    """enable()/disable()/enabled() patch process-wide state: under a lock, threads racing them
    never record our adapter as TRL's original, never half-patch TRL's three names, and the last
    disable() gives TRL its own Function back."""
    import sys
    import threading

    import trl.kernels
    import trl.trainer.utils as trl_utils
    from trl.kernels import chunked_logprob

    original = trl_utils._ChunkedLogProbFunction
    names = ((trl_utils, "_ChunkedLogProbFunction"), (trl.kernels, "ChunkedLogProbFunction"),
             (chunked_logprob, "ChunkedLogProbFunction"))
    errors = []
    start = threading.Barrier(6)

    def toggle(kind):
        try:
            start.wait()
            for _ in range(300):
                if kind == "scoped":
                    with rk_trl.enabled():
                        pass
                else:
                    rk_trl.enable() if kind == "enable" else rk_trl.disable()
                with rk_trl._lock:  # between two operations: all three names ours, or all TRL's
                    seen = {getattr(m, n) for m, n in names}
                    assert seen in ({original}, {rk_trl.RlscChunkedLogProb}), seen
                    assert rk_trl.RlscChunkedLogProb.trl_function in (None, original)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=toggle, args=(k,)) for k in ("enable", "disable") * 2 + ("scoped",) * 2]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    rk_trl.disable()
    assert all(getattr(m, n) is original for m, n in names) and not rk_trl.is_enabled()
