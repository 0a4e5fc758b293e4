"""TRL GRPOTrainer reward functions: LabelFreeReward (self-certainty, -mean / -sum entropy from
hidden states through the op) against the float64 formulas from full logits, and ttrl_reward."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from rlsc.objectives import ttrl_reward
from rlsc_kernels.integrations.trl_rewards import LabelFreeReward

from conftest import make_model

T = 0.6


def _reference(model, tok, prompt, completion_ids, kind):
    p = list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    ids = torch.tensor([p + completion_ids])
    with torch.no_grad():
        logits = model.double()(input_ids=ids).logits[0, len(p) - 1:-1].double() / T
    logq = torch.log_softmax(logits, -1)
    V = logq.shape[-1]
    if kind == "self_certainty":
        return float((1.0 / V * (math.log(1.0 / V) - logq)).sum(-1).mean())
    H = -(logq.exp() * logq).sum(-1)
    return float(-H.mean()) if kind == "neg_mean_entropy" else float(-H.sum())


@pytest.mark.parametrize("kind", ["self_certainty", "neg_mean_entropy", "neg_sum_entropy"])
def test_label_free_reward_matches_float64_formula(tiny_tokenizer, kind):
    tok = tiny_tokenizer
    model = make_model(tok, seed=6)
    with torch.no_grad():
        model.model.norm.weight.mul_(3.0)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}]] * 2 + [[{"role": "user", "content": "Say 7"}]]
    completions = [tok("4 is it")["input_ids"], tok("5")["input_ids"], tok("seven = 7!")["input_ids"]]
    reward = LabelFreeReward(model, tok, kind=kind, temperature=T, batch_size=2)
    got = reward(prompts=prompts, completions=None, completion_ids=completions)
    assert reward.__name__ == kind and model.training is False
    for prompt, c, r in zip(prompts, completions, got):
        ref = _reference(copy.deepcopy(model), tok, prompt, c, kind)
        assert abs(r - ref) <= 1e-5 * max(1.0, abs(ref)), (kind, r, ref)
    assert len(set(round(g, 6) for g in got)) == 3


def test_label_free_reward_rejects_bad_arguments(tiny_tokenizer):
    model = make_model(tiny_tokenizer)
    with pytest.raises(ValueError, match="kind"):
        LabelFreeReward(model, tiny_tokenizer, kind="entropy")
    with pytest.raises(ValueError, match="completion_ids"):
        LabelFreeReward(model, tiny_tokenizer)(prompts=["x"], completions=["y"])


def test_ttrl_reward_votes_within_each_prompt():
    prompts = ["q1"] * 3 + ["q2"] * 3
    completions = ["\\boxed{3}", "\\boxed{3.0}", "\\boxed{4}", "\\boxed{9}", "\\boxed{8}", "\\boxed{8}"]
    assert ttrl_reward(prompts, completions) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    conv = [[{"role": "assistant", "content": c}] for c in completions]
    assert ttrl_reward(prompts, conv) == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]


def test_rewards_plug_into_a_real_grpo_trainer_step(tiny_tokenizer, tmp_path):
    """One GRPOTrainer step with the self-certainty reward on the policy itself and TTRL's vote."""
    import datasets
    import trl
    from transformers import TrainerCallback

    model = make_model(tiny_tokenizer, seed=2)
    logs = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs_=None, **kwargs):
            logs.append(dict(kwargs.get("logs") or logs_ or {}))

    args = trl.GRPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
        max_steps=1, learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        seed=0, beta=0.0, temperature=0.8, bf16=False, fp16=False, dataloader_num_workers=0,
    )
    reward = LabelFreeReward(model, tiny_tokenizer, kind="self_certainty", temperature=args.temperature)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[reward, ttrl_reward], args=args,
                              train_dataset=datasets.Dataset.from_dict({"prompt": ["abc 12", "hello", "x y z", "2+2"]}),
                              processing_class=tiny_tokenizer, callbacks=[Capture()])
    trainer.train()
    logged = next(entry for entry in logs if "rewards/self_certainty/mean" in entry)
    assert math.isfinite(logged["rewards/self_certainty/mean"]) and logged["rewards/self_certainty/mean"] > 0
    assert "rewards/ttrl_reward/mean" in logged
