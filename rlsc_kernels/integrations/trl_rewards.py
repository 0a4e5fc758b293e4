"""Label-free rewards for TRL's GRPOTrainer, from the policy's hidden states through the fused op.

    from trl import GRPOConfig, GRPOTrainer
    from rlsc_kernels.integrations.trl_rewards import LabelFreeReward

    model = AutoModelForCausalLM.from_pretrained(...)
    tok = AutoTokenizer.from_pretrained(...)
    reward = LabelFreeReward(model, tok, kind="self_certainty", temperature=args.temperature)  # Intuitor
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, processing_class=tok, ...)

kinds (the reward of one completion y of prompt x, over its tokens t, at softmax(logits / T)):
    "self_certainty"    mean_t KL(U || p_t)          Intuitor / RLIF (arXiv 2505.19590)
    "neg_mean_entropy"  -mean_t H(p_t)               RENT (arXiv 2505.22660)
    "neg_sum_entropy"   -sum_t H(p_t)                EM-RL (arXiv 2505.15134)
GRPOTrainer turns them into group advantages itself (scale_rewards); no gradient flows through a
reward. Pass the trainer's temperature so the reward scores the distribution the completions
were sampled from. For TTRL's majority vote (text only) see rlsc.objectives.ttrl_reward.

The reward re-tokenizes each prompt as GRPOTrainer does (chat template with the generation
prompt for conversational prompts, plain tokenization otherwise), runs the model's body once
without gradient (micro-batches of `batch_size` completions, prompts left-padded, explicit
position ids), and scores the completion tokens with rlsc_kernels.linear_token_stats on the
head as rlsc_kernels.integrations.transformers.head_inputs sees it (logit scale, soft-cap, LoRA).
No [B, L, V] logits are formed. The head must be a plain tensor when the reward runs (not an
FSDP2-sharded DTensor: use it with DDP / single-process training, or let it error clearly).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..label_free import linear_token_stats
from .transformers import head_inputs

KINDS = ("self_certainty", "neg_mean_entropy", "neg_sum_entropy")


def _is_conversational(prompt) -> bool:
    return isinstance(prompt, list) and len(prompt) > 0 and isinstance(prompt[0], dict) and "role" in prompt[0]


class LabelFreeReward:
    """A GRPOTrainer reward function: reward(prompts, completions, completion_ids, **kw) -> list[float]."""

    def __init__(self, model, processing_class, *, kind: str = "self_certainty", temperature: float = 1.0,
                 batch_size: int = 8, chat_template_kwargs: Optional[dict] = None, backend: str = "auto"):
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.model = model
        self.processing_class = processing_class
        self.kind = kind
        self.temperature = float(temperature)
        self.batch_size = batch_size
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.backend = backend
        self.__name__ = kind  # GRPOTrainer names a reward function by its __name__

    def prompt_ids(self, prompt) -> list[int]:
        tok = self.processing_class
        if _is_conversational(prompt):
            return list(tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                **self.chat_template_kwargs)["input_ids"])
        return list(tok(text=prompt)["input_ids"])

    @torch.no_grad()
    def __call__(self, prompts, completions=None, completion_ids=None, **kwargs) -> list[float]:
        if completion_ids is None:
            raise ValueError("LabelFreeReward needs completion_ids (GRPOTrainer passes them)")
        if len(prompts) != len(completion_ids):
            raise ValueError(f"got {len(prompts)} prompts but {len(completion_ids)} completions")
        out: list[float] = []
        for start in range(0, len(prompts), self.batch_size):
            out.extend(self.score([self.prompt_ids(p) for p in prompts[start:start + self.batch_size]],
                                  [list(c) for c in completion_ids[start:start + self.batch_size]]))
        return out

    def score(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[float]:
        """Rewards of one micro-batch given token ids (prompt left-padded, completion right-padded)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model  # PEFT
        device = next(model.parameters()).device
        B = len(prompt_ids)
        P = max(len(p) for p in prompt_ids)
        L = max((len(c) for c in completion_ids), default=0)
        if L == 0:
            return [0.0] * B
        pad = self.processing_class.pad_token_id or 0
        ids = torch.full((B, P + L), pad, dtype=torch.long)
        attn = torch.zeros((B, P + L), dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            ids[i, P - len(p):P] = torch.tensor(p, dtype=torch.long)
            ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
            attn[i, P - len(p):P + len(c)] = 1
        ids, attn = ids.to(device), attn.to(device)
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        was_training = model.training
        model.eval()  # no dropout: score the distribution that was sampled
        try:
            hidden = model.base_model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False)[0]
            hidden = hidden[:, P - 1:P - 1 + L]
            mask = attn[:, P:].bool()
            targets = ids[:, P:][mask]
            seq = torch.arange(B, device=device)[:, None].expand(B, L)[mask]
            inputs = head_inputs(model, hidden[mask])
            with torch.autocast(inputs.weight.device.type, enabled=False):
                st = linear_token_stats(inputs.hidden, inputs.weight, targets.to(inputs.weight.device), bias=inputs.bias,
                                        backend=self.backend, entropy=self.kind != "self_certainty",
                                        self_certainty=self.kind == "self_certainty", filter_eps=None,
                                        **inputs.op_options(self.temperature))
        finally:
            model.train(was_training)
        per_token = st.self_certainty if self.kind == "self_certainty" else -st.entropy
        seq = seq.to(per_token.device)
        total = torch.zeros(B, dtype=torch.float64, device=per_token.device).index_add_(0, seq, per_token.double())
        n = mask.sum(-1).to(total.device).double()
        if self.kind != "neg_sum_entropy":
            total = torch.where(n > 0, total / n.clamp(min=1), torch.zeros_like(total))
        return total.cpu().tolist()
