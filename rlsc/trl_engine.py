"""`rlsc train --engine trl`: RLSC on TRL's GRPO machinery, for one or several processes.

    torchrun --nproc_per_node 8 -m rlsc train --engine trl --model Qwen/Qwen2.5-Math-7B ...
    accelerate launch --config_file configs/accelerate/fsdp2.yaml -m rlsc train --engine trl ...

TRL and accelerate own everything around the loss: the data loader (each question repeated
num_samples times, the copies spread over the processes), generation (vLLM when asked for with
--vllm-mode, transformers' generate otherwise), DDP / FSDP2 wrapping, gradient accumulation,
checkpoints and resume. RLSCTrainer replaces three methods of GRPOTrainer (and the optimizer):

  _get_train_sampler: the thin trainer's question order (train.prompts_for_step, a pure
      function of step and seed), so a resumed run poses the same questions as an uninterrupted
      one and, with the RNG state the HF checkpoint restores, draws the same samples.

  _generate_and_score_completions: generate, and nothing else. There is no reward: TRL's reward
      and advantage code is never reached. GRPOTrainer refuses to start without a reward source,
      so it gets one function, rlsc_has_no_reward, that raises if it is ever called (a TRL change
      that routed batches to rewards would fail loudly instead of training on a made-up reward).
      For --weighting group the samples are scored once here (no gradient) and the softmax weights
      are formed over each question's samples gathered from every process.
  compute_loss: RLSC's loss from the op, exactly as the thin trainer computes it (rlsc/step.py):
      the body's final hidden states of the completion tokens, the head's inputs from
      rlsc_kernels.integrations.transformers.FusedHead, and one rk.linear_rlsc_loss call
      (reduction "sum") per micro-batch, divided by micro-batch size x accumulation steps; DDP /
      FSDP average over processes, so the step's gradient is that of -(1/S) sum_s w_s L_s over
      all S = num_prompts x num_samples samples.
  GuardedAdamW (create_optimizer): before each update, clips (--max-grad-norm) and measures the
      gradient norm, writes the step's metrics row (statistics gathered from every process) and
      skips the update on a non-finite loss or gradient, as the thin trainer does.

The loss runs inside the wrapped model's forward (a `rlsc=` keyword added to the model's
forward), so DDP synchronises the gradients and FSDP gathers the parameters as for any forward.

Sampling draws from softmax(logits / T) only: top-k, top-p, min-p, repetition penalty and every
other logits processor are switched off explicitly, and during generation the model's own
generation_config is replaced by an empty one (transformers would otherwise refill every knob left
unset from the checkpoint's; it is restored afterwards, so a saved model keeps it), because p_old in
the RLSC weight must be the probability of the sample. Generation runs under the loss's autocast
and the lm_head's output is replaced by FusedHead's float32 logits in the loss's compute dtype, so
the sampled distribution is the softmax of the same fp32 logits the loss scores (transformers only,
not vLLM: vLLM samples from its own kernels). Before training, the start-of-run checks of the thin
trainer run (head against the model's own logits, deterministic scoring in train mode), and every
dropout is switched off (rlsc.models.disable_dropout, wider than TRL's disable_dropout).

Flags mapped onto TRL/HF: micro_batch_size -> per_device_train_batch_size; the accumulation steps
follow from num_prompts x num_samples / (micro_batch_size x processes), which must be a whole
number; constant learning rate; AdamW over every trainable parameter with one weight decay (as
the thin trainer); checkpoint_every -> a checkpoint-N folder (the last one kept) through the HF
Trainer; --resume picks the last checkpoint-N up; the final model goes to output_dir/final
(LoRA merged, as the thin trainer). DeepSpeed ZeRO-3 is refused (see train_trl).
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import types
from pathlib import Path

import torch

import rlsc_kernels as rk
from rlsc_kernels.integrations.transformers import FusedHead, run_in_owner_forward

from .config import RLSCConfig, parse_filter_eps
from .models import disable_dropout
from .objectives import engine_weights, entropy_sums, sequence_sums
from .sampling import Rollouts, chat_prompt, decode_completions, encode_prompts
from .step import _packed, _trim, _underflow, completion_hidden_states, group_weights

#: the only logits processing generation may do is the temperature (set from --temperature)
NEUTRAL_SAMPLING = dict(top_k=0, top_p=1.0, min_p=None, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
                        repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None,
                        begin_suppress_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None,
                        min_length=0, min_new_tokens=None, renormalize_logits=False, sequence_bias=None,
                        exponential_decay_length_penalty=None, encoder_repetition_penalty=1.0)
_FORWARD_KEY = "_rlsc_trl_original_forward"


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# The loss inside the model's forward
# --------------------------------------------------------------------------------------------
class _Request:
    """What one `model(rlsc=...)` call computes (a plain object: DDP passes it through untouched).

    mode "loss": rk.linear_rlsc_loss of the micro-batch (reduction "sum"), differentiable;
    mode "score": the sequence log-probs [B] only (run under no_grad)."""

    def __init__(self, rollouts: Rollouts, mode: str, *, weighting=None, settings: dict | None = None):
        self.rollouts, self.mode, self.weighting, self.settings = rollouts, mode, weighting, settings or {}


def _run_request(model, req: _Request):
    mb = req.rollouts
    hidden = completion_hidden_states(model.base_model, mb)
    h, y, seq = _packed(hidden, mb, req.settings.get("mask_truncated", False))
    head = model.get_output_embeddings()
    return run_in_owner_forward(model, head, _score, model, head, h, y, seq, req)


def _score(model, head, h, y, seq, req: _Request):
    s = req.settings
    fused = FusedHead(model, head=head)     # compute dtype: the autocast dtype of this forward
    h, w, b = fused.inputs(h)
    opts = fused.op_options(s["temperature"])
    with torch.autocast(w.device.type, enabled=False):
        if req.mode == "stats":  # per-sample sums for the label-free objectives (rlsc/objectives.py)
            return sequence_sums(h, w, b, y, seq, len(req.rollouts), temperature=opts["temperature"],
                                 backend=s["backend"], softcap=opts["softcap"])
        if req.mode == "entropy":  # em-ft (rlsc/objectives.py): the op's entropies, differentiable
            return entropy_sums(h, w, b, y, seq, len(req.rollouts), dict(s, temperature=opts["temperature"]),
                                opts["softcap"])
        if req.mode == "score":
            logp = rk.linear_logprobs(h, w, y, bias=b, backend=s["backend"], filter_eps=None, check_values=False,
                                      **opts)
            return torch.zeros(len(req.rollouts), dtype=torch.float32, device=h.device).index_add_(0, seq, logp.float())
        # check_values=False as in the thin trainer: a non-finite value shows up in the step's loss or
        # gradient norm, which skips the step.
        return rk.linear_rlsc_loss(
            h, w, y, seq_index=seq, num_sequences=len(req.rollouts), bias=b, alpha=s["alpha"],
            weighting=req.weighting, reduction="sum", filter_eps=s["filter_eps"], backend=s["backend"],
            return_entropy=True, check_values=False, **opts)


@contextlib.contextmanager
def sampling_as_scored(model, compute_dtype: torch.dtype | None):
    """While generating with transformers' generate: (1) the model's generation_config is an empty
    GenerationConfig, so nothing the checkpoint sets (min_p, suppress_tokens, min_new_tokens, ...)
    is merged into the engine's; (2) the lm_head's output is FusedHead's float32 logits in
    `compute_dtype` (the loss's), so generation draws from the fp32 logits the loss scores. Both
    are undone on exit (a saved model keeps its generation_config)."""
    from transformers import GenerationConfig

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings()
    saved = inner.generation_config

    def fp32_head(module, args, out):
        def linear(hidden):
            return FusedHead(inner, head=module, dtype=compute_dtype).linear(hidden)

        return run_in_owner_forward(inner, module, linear, args[0])

    inner.generation_config = GenerationConfig()
    handle = head.register_forward_hook(fp32_head)
    try:
        yield
    finally:
        handle.remove()
        inner.generation_config = saved


def add_rlsc_forward(model) -> None:
    """Adds a `rlsc=` keyword to the forward of `model` (the transformers model inside a PEFT
    model): `model(rlsc=request)` runs the request; without it the previous forward runs."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if _FORWARD_KEY in inner.__dict__:
        return
    previous = inner.forward

    def forward(self, *args, rlsc=None, **kwargs):
        if rlsc is None:
            return previous(*args, **kwargs)
        return _run_request(self, rlsc)

    forward.__wrapped__ = getattr(previous, "__wrapped__", previous)
    forward.__signature__ = _signature(previous)
    inner.__dict__[_FORWARD_KEY] = previous
    inner.forward = types.MethodType(forward, inner)


def _signature(fn):
    import inspect

    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # pragma: no cover
        return None


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------
def _trainer_class():
    from accelerate.utils import gather, gather_object
    from trl import GRPOTrainer
    from trl.trainer.utils import pad

    class RLSCTrainer(GRPOTrainer):
        """GRPOTrainer whose step is RLSC's (see the module docstring). rlsc: the run's RLSCConfig;
        metrics_path: where the main process appends one metrics row per optimizer step (None:
        nowhere); sample: optional stand-in for generation, (trainer, inputs) -> (prompt id lists,
        completion id lists) (the equality tests feed fixed samples through it)."""

        def __init__(self, *args, rlsc: RLSCConfig, metrics_path=None, sample=None, **kwargs):
            self.rlsc = rlsc
            self.metrics_path = Path(metrics_path) if metrics_path else None
            self._sample_override = sample
            kwargs["reward_funcs"] = [rlsc_has_no_reward]  # never called (see the module docstring)
            super().__init__(*args, **kwargs)
            add_rlsc_forward(self.model)
            disable_dropout(self.model)
            self._rlsc_settings = dict(temperature=rlsc.temperature, alpha=rlsc.alpha, backend=rlsc.backend,
                                       filter_eps=parse_filter_eps(rlsc.filter_eps), mask_truncated=rlsc.mask_truncated)
            self._reset_step_stats()

        # ---- prompts and generation -------------------------------------------------------
        def _get_train_sampler(self, dataset=None):
            # The thin trainer's question order (a pure function of step and seed), so a resumed
            # run poses the same questions as an uninterrupted one (HF skips the batches done).
            n = len(dataset if dataset is not None else self.train_dataset)
            return StepSampler(n, self.args.max_steps, self.rlsc.num_prompts, self.num_generations,
                               self.args.steps_per_generation, self.rlsc.seed)

        # ---- generation ------------------------------------------------------------------
        def _tokenize_prompts(self, prompts):
            # The prompt texts are rendered already (chat template included), encoded as the thin
            # trainer's (with the tokenizer's BOS, never twice).
            return encode_prompts(self._tokenizer, prompts), None, {}

        def _generate(self, prompts):
            compute_dtype = torch.bfloat16 if self.args.bf16 else torch.float16 if self.args.fp16 else None
            model = self.accelerator.unwrap_model(self.model)
            with self.accelerator.autocast(), sampling_as_scored(model, compute_dtype):
                return super()._generate(prompts)

        def _generate_and_score_completions(self, inputs):
            device = self.accelerator.device
            t0 = time.perf_counter()
            prompts = [x["prompt"] for x in inputs]
            if self._sample_override is not None:
                prompt_ids_list, completion_ids_list = self._sample_override(self, inputs)
            else:
                prompt_ids_list, completion_ids_list = self._generate(prompts)[:2]
            eos = set(self.eos_token_ids)
            pad_id = self._tokenizer.pad_token_id
            prompt_ids = pad([torch.tensor(p) for p in prompt_ids_list], padding_value=pad_id, padding_side="left")
            prompt_mask = pad([torch.ones(len(p), dtype=torch.bool) for p in prompt_ids_list], padding_value=False,
                              padding_side="left")
            completion_ids = pad([torch.tensor(c) for c in completion_ids_list], padding_value=pad_id,
                                 padding_side="right")
            completion_mask = pad([torch.ones(len(c), dtype=torch.bool) for c in completion_ids_list],
                                  padding_value=False, padding_side="right")
            out = {
                "prompt_ids": prompt_ids.to(device), "prompt_mask": prompt_mask.to(device),
                "completion_ids": completion_ids.to(device), "completion_mask": completion_mask.to(device),
                "capped": torch.tensor([len(c) == 0 or c[-1] not in eos for c in completion_ids_list], device=device),
                "question_index": torch.tensor([int(x["question_index"]) for x in inputs], device=device),
            }
            self._step_stats["gen_seconds"] += time.perf_counter() - t0
            self._step_stats["questions"].extend(x["id"] for x in inputs)
            self._step_stats["t_train"] = time.perf_counter()
            if self.rlsc.objective == "em-ft":  # the step's tokens over every process: the loss's divisor
                tokens = gather(out["completion_mask"].sum()[None]).sum()
                out["step_tokens"] = tokens.expand(len(inputs)).clone()
            elif self.rlsc.objective != "rlsc":  # reward objectives: A_i / n_i as external weights
                out["group_weight"] = self._objective_weights(_rollouts(out))
            elif self.rlsc.weighting == "group":
                out["group_weight"] = self._group_weights(_rollouts(out))
            return out

        @torch.no_grad()
        def _objective_weights(self, rollouts: Rollouts) -> torch.Tensor:
            """GRPO advantages / tokens (rlsc/objectives.py) for the local samples, rewards from every process."""
            mbs = self.args.per_device_train_batch_size
            with self.accelerator.autocast():
                sums = torch.cat([self.model_wrapped(rlsc=_Request(_trim(rollouts.select(slice(i, i + mbs))), "stats",
                                                                   settings=self._rlsc_settings))
                                  for i in range(0, len(rollouts), mbs)], dim=1)
            texts = decode_completions(self._tokenizer, rollouts) if self.rlsc.objective == "ttrl" else None
            return engine_weights(self.rlsc.objective, sums, rollouts, texts, gather, gather_object,
                                  self.accelerator.process_index)

        @torch.no_grad()
        def _group_weights(self, rollouts: Rollouts) -> torch.Tensor:
            """softmax of L_s over each question's samples (from every process) + alpha, for the local samples."""
            mbs = self.args.per_device_train_batch_size
            parts = []
            with self.accelerator.autocast():
                for start in range(0, len(rollouts), mbs):
                    mb = _trim(rollouts.select(slice(start, start + mbs)))
                    parts.append(self.model_wrapped(rlsc=_Request(mb, "score", settings=self._rlsc_settings)))
            seq_logp = torch.cat(parts)
            all_logp, all_q = gather(seq_logp), gather(rollouts.question_index)
            keep = ~gather(rollouts.capped) if self.rlsc.mask_truncated else None
            weights = group_weights(all_logp, all_q, self.rlsc.alpha, keep)
            n = len(rollouts)
            rank = self.accelerator.process_index
            return weights[rank * n : (rank + 1) * n]

        # ---- the loss --------------------------------------------------------------------
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs:
                raise ValueError("RLSCTrainer does not return outputs")
            mb = _rollouts(inputs)
            keep = _trim(mb)
            weighting = inputs["group_weight"] if "group_weight" in inputs else self.rlsc.weighting
            em_ft = self.rlsc.objective == "em-ft"
            out = model(rlsc=_Request(keep, "entropy" if em_ft else "loss", weighting=weighting,
                                      settings=self._rlsc_settings))
            st = self._step_stats
            if em_ft:  # loss = sum of H over the step's N tokens / N; the row's loss is that mean
                N, procs = inputs["step_tokens"][0].float(), self.accelerator.num_processes
                st["loss_sum"].append(out.loss.detach().float() * len(mb) * self.current_gradient_accumulation_steps
                                      * procs / N)
            else:
                st["loss_sum"].append(out.loss.detach().float())
            st["seq_logp"].append(out.seq_logp.detach().float())
            st["seq_weight"].append(out.seq_weight.detach().float())
            st["n_tokens"].append(keep.completion_lengths)
            st["capped"].append(mb.capped)
            if out.token_entropy is not None:
                st["entropy"].append(torch.stack([out.token_entropy.detach().double().sum(),
                                                  torch.tensor(out.token_entropy.numel(), dtype=torch.float64,
                                                               device=out.loss.device)]))
            # / (micro-batch size x accumulation steps) here (loss_is_scaled_for_ga: the Trainer does not
            # divide again), mean over processes by DDP/FSDP: the gradient of -(1/S) sum_s w_s L_s
            # over the step's S samples.
            if em_ft:  # DDP / FSDP average over processes
                return out.loss * self.accelerator.num_processes / inputs["step_tokens"][0].float()
            return out.loss / (len(mb) * self.current_gradient_accumulation_steps)

        loss_is_scaled_for_ga = True

        # ---- the optimizer step ----------------------------------------------------------
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                params = [p for p in opt_model.parameters() if p.requires_grad]
                c = self.rlsc
                self.optimizer = GuardedAdamW(params, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), eps=c.adam_eps,
                                              weight_decay=c.weight_decay)
                self.optimizer.guard = self._before_optimizer_step
            return self.optimizer

        def _reset_step_stats(self):
            if self.accelerator.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.accelerator.device)
            self._step_stats = {"loss_sum": [], "seq_logp": [], "seq_weight": [], "n_tokens": [], "capped": [],
                                "entropy": [], "gen_seconds": 0.0, "questions": [], "t_train": time.perf_counter()}

        def _before_optimizer_step(self, params) -> bool:
            """Clips (when --max-grad-norm > 0) and measures the gradient norm, writes the step's
            metrics row, and says whether to skip the update (non-finite loss or gradient)."""
            st = self._step_stats
            c = self.rlsc
            norm = torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                                  c.max_grad_norm if c.max_grad_norm > 0 else float("inf"))
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            device = self.accelerator.device
            seq_logp = gather(torch.cat(st["seq_logp"]))
            seq_weight = gather(torch.cat(st["seq_weight"]))
            n_tokens = gather(torch.cat(st["n_tokens"]))
            capped = gather(torch.cat(st["capped"]))
            S = len(seq_logp)
            loss = float(gather(torch.stack(st["loss_sum"]).sum()[None]).sum()) / S
            ent = gather(torch.stack(st["entropy"]).sum(0)[None]).sum(0) if st["entropy"] else None
            peak = torch.tensor([_peak_memory_mb(device)], device=device)
            peak = float(gather(peak).max())
            questions = list(dict.fromkeys(gather_object(st["questions"])))
            grad_norm = float(norm)
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            train_s = time.perf_counter() - st["t_train"]
            self._skipped_total += skipped
            self._skipped_in_a_row = self._skipped_in_a_row + 1 if skipped else 0
            row = {
                "step": self.state.global_step + 1,
                "loss": loss,
                "skipped": skipped,
                "skipped_steps": self._skipped_total,
                "mean_seq_logp": float(seq_logp.mean()),
                "min_seq_logp": float(seq_logp.min()),
                "max_seq_logp": float(seq_logp.max()),
                "mean_weight": float(seq_weight.mean()),
                "max_weight": float(seq_weight.max()),
                "frac_weight_underflow": _underflow(seq_weight.cpu(), c.weighting, c.alpha),
                "mean_completion_tokens": float(n_tokens.float().mean()),
                "frac_capped": float(capped.float().mean()),
                "frac_eos_only": float((n_tokens == 1).float().mean()),
                "mean_token_entropy": float(ent[0] / ent[1]) if ent is not None and ent[1] > 0 else 0.0,
                "grad_norm": grad_norm,
                "gen_seconds": round(st["gen_seconds"], 3),
                "train_seconds": round(train_s, 3),
                "peak_memory_mb": round(peak, 1),
                "samples": S,
                "questions": questions,
            }
            self.last_row = row
            if self.metrics_path is not None and self.accelerator.is_main_process:
                with open(self.metrics_path, "a") as fh:
                    fh.write(_json_line(row))
                log_to_stderr(
                    f"step {row['step']}/{self.args.max_steps}: loss {loss:.4g}  mean log p {row['mean_seq_logp']:.2f}  "
                    f"mean w {row['mean_weight']:.3f}  tokens {row['mean_completion_tokens']:.1f}  "
                    f"entropy {row['mean_token_entropy']:.3f}  gen {row['gen_seconds']:.1f}s train {train_s:.1f}s"
                    + ("  SKIPPED (non-finite loss or gradient)" if skipped else ""))
            self._reset_step_stats()
            if self._skipped_in_a_row >= c.max_consecutive_skips:
                from .train import NonFiniteSteps

                raise NonFiniteSteps(
                    f"{self._skipped_in_a_row} steps in a row (up to step {row['step']}) had a non-finite loss or "
                    "gradient and were skipped; stopping (see --max-consecutive-skips)")
            return skipped

        _skipped_total = 0
        _skipped_in_a_row = 0

    return RLSCTrainer


class StepSampler(torch.utils.data.Sampler):
    """Dataset indices for `steps` steps: step s poses the questions prompts_for_step(s) of the thin
    trainer, each repeated num_samples times (consecutive copies, as GRPO's RepeatSampler), and
    the step's block repeated `repeats` (= steps_per_generation) times, because GRPO draws one
    dataloader batch per micro-batch and generates from the first of them only."""

    def __init__(self, n_questions: int, steps: int, num_prompts: int, num_samples: int, repeats: int, seed: int):
        self.n, self.steps, self.k, self.samples, self.repeats, self.seed = (
            n_questions, steps, num_prompts, num_samples, repeats, seed)

    def __iter__(self):
        from .train import prompts_for_step

        for step in range(self.steps):
            block = [q for q in prompts_for_step(list(range(self.n)), step, self.k, self.seed)
                     for _ in range(self.samples)]
            for _ in range(self.repeats):
                yield from block

    def __len__(self) -> int:
        return self.steps * self.repeats * self.k * self.samples


def rlsc_has_no_reward(*args, **kwargs):
    """GRPOTrainer refuses to start without a reward source; RLSC has none. RLSCTrainer replaces
    the method that would call reward functions, so this one is never called; if a TRL change
    ever routed a batch to it, it raises instead of handing GRPO a made-up reward."""
    raise RuntimeError("RLSC has no reward: RLSCTrainer's generation step must not reach TRL's reward code "
                       "(an unsupported TRL version?)")


class GuardedAdamW(torch.optim.AdamW):
    """AdamW whose step first calls `guard(params)`; a True answer skips the update (the
    gradients are dropped by the trainer's zero_grad, the moments are untouched)."""

    guard = None

    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"]]
        if self.guard is not None and self.guard(params):
            return None
        return super().step(closure)


def _rollouts(batch: dict) -> Rollouts:
    return Rollouts(batch["prompt_ids"], batch["prompt_mask"].bool(), batch["completion_ids"],
                    batch["completion_mask"].bool(), batch["capped"], batch["question_index"])


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _json_line(row: dict) -> str:
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    return json.dumps(clean) + "\n"


# --------------------------------------------------------------------------------------------
# Building a run from the config
# --------------------------------------------------------------------------------------------
def world_size() -> int:
    from accelerate import PartialState

    return PartialState().num_processes


def accumulation_steps(cfg: RLSCConfig, processes: int) -> int:
    """Micro-batches per process per step: num_prompts x num_samples = micro_batch_size x processes x this."""
    total = cfg.num_prompts * cfg.num_samples
    per_round = cfg.micro_batch_size * processes
    if total % per_round:
        raise ValueError(
            f"--engine trl: num_prompts x num_samples = {total} samples per step must be a multiple of "
            f"micro_batch_size x processes = {cfg.micro_batch_size} x {processes} = {per_round}; "
            "change --micro-batch-size or --num-prompts")
    return total // per_round


def grpo_config(cfg: RLSCConfig, processes: int, precision: str):
    """The GRPOConfig that makes TRL run RLSC's step as the thin trainer's flags describe it."""
    import trl

    ga = accumulation_steps(cfg, processes)
    vllm_mode = cfg.vllm_mode
    return trl.GRPOConfig(
        output_dir=cfg.output_dir, per_device_train_batch_size=cfg.micro_batch_size, gradient_accumulation_steps=ga,
        steps_per_generation=ga, num_iterations=1, num_generations=cfg.num_samples,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature,
        # transformers: every other logits processor off by name (the checkpoint's generation_config
        # must not add any). vLLM: TRL passes temperature, top_p, top_k, min_p and repetition_penalty
        # explicitly and vLLM's other SamplingParams default to no processing; generation_kwargs
        # would go into SamplingParams, where the transformers names are unknown.
        generation_kwargs=dict(NEUTRAL_SAMPLING) if vllm_mode == "off" else None,
        top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0, beta=0.0, mask_truncated_completions=False,
        use_vllm=vllm_mode != "off", vllm_mode=vllm_mode if vllm_mode != "off" else "colocate",
        vllm_importance_sampling_correction=False, disable_dropout=True,
        max_steps=cfg.steps, learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.weight_decay, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_epsilon=cfg.adam_eps,
        max_grad_norm=0.0,  # clipping and the norm are done by RLSCTrainer (pre-clip norm logged, skip on non-finite)
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=precision == "bf16-autocast", fp16=False,
        use_cpu=cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()),
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=1, report_to="none", save_strategy="no", save_total_limit=1,
        save_only_model=not cfg.save_optimizer_state, remove_unused_columns=False, dataloader_num_workers=0,
        log_completions=False, shuffle_dataset=True, disable_tqdm=True,
    )


def prompt_dataset(problems, tokenizer, template: str):
    """One row per question: the rendered prompt text (chat template applied, as the thin
    trainer's), the question's index (groups for --weighting group) and its id (metrics)."""
    import datasets

    return datasets.Dataset.from_dict({
        "prompt": [chat_prompt(tokenizer, p.question, template) for p in problems],
        "question_index": list(range(len(problems))),
        "id": [p.id for p in problems],
    })


class _Checkpoints:
    """A checkpoint every checkpoint_every steps and after the last one (HF's save machinery)."""

    def __new__(cls, every: int):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step >= state.max_steps or (every > 0 and state.global_step % every == 0):
                    control.should_save = True
                return control

        return Callback()


def last_checkpoint(out_dir: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(out_dir)) if out_dir.is_dir() else None


def train_trl(cfg: RLSCConfig, loaded=None, log=log_to_stderr, sample=None, callbacks=()) -> dict:
    """Runs cfg.steps RLSC steps on TRL (resuming if asked) and returns a summary dict, as train().

    loaded: an object with .model and .tokenizer to train instead of loading cfg.model; sample and
    callbacks (extra TrainerCallbacks) are for tests: see RLSCTrainer."""
    cfg.validate("train")
    try:
        import trl  # noqa: F401
    except ImportError as exc:
        raise ImportError("--engine trl needs TRL: pip install 'trl>=1.16,<1.17' (or use --engine thin)") from exc
    from accelerate import PartialState

    from .data import default_template, load_problems
    from .models import apply_lora, check_model_spec, load_model, load_tokenizer, resolve_precision
    from .plot import plot_training_curves, read_metrics
    from .train import _truncate_metrics, save_final

    if cfg.vllm_mode != "off":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise ImportError(f"--vllm-mode {cfg.vllm_mode} needs vLLM (pip install vllm, a version TRL "
                              "supports); --vllm-mode off generates with transformers")
    state = PartialState(cpu=cfg.device == "cpu")
    processes = state.num_processes
    accumulation_steps(cfg, processes)  # checked before anything loads
    out_dir = Path(cfg.output_dir)
    problems = load_problems(cfg.prompts, split=cfg.split or "train", limit=cfg.max_prompts)
    template = cfg.prompt_template or default_template(cfg.prompts)
    resume_from = last_checkpoint(out_dir) if cfg.resume != "no" else None
    if cfg.resume == "yes" and resume_from is None:
        raise FileNotFoundError(f"--resume: there is no checkpoint-N folder in {out_dir} (use --resume auto to "
                                "start afresh when there is none)")
    device = state.device
    precision = resolve_precision(cfg.precision, device)
    if loaded is None:
        check_model_spec(cfg.model)
        model, tokenizer = load_model(cfg.model, device=device, precision=precision), load_tokenizer(cfg.model)
    else:
        model, tokenizer = loaded.model, loaded.tokenizer
    if cfg.lora_rank > 0:
        model = apply_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
    from .step import check_head_matches_forward
    from .train import probe_ids

    disable_dropout(model)
    check_head_matches_forward(model, probe_ids(tokenizer, problems[0], template, next(model.parameters()).device),
                               torch.bfloat16 if precision == "bf16-autocast" else None)
    args = grpo_config(cfg, processes, precision)
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        raise NotImplementedError(
            "--engine trl does not support DeepSpeed ZeRO-3: the loss reads the LM head's weight outside the head's "
            "own forward, where ZeRO-3 leaves it partitioned; use FSDP2 (configs/accelerate/fsdp2.yaml) or ZeRO-1/2")
    metrics_path = out_dir / "metrics.jsonl"
    if state.is_main_process:
        log(f"--engine trl: {processes} process(es), {cfg.num_prompts} x {cfg.num_samples} samples per step, "
            f"{args.gradient_accumulation_steps} micro-batch(es) of {cfg.micro_batch_size} per process, {precision}, "
            f"generation by {'vLLM (' + cfg.vllm_mode + ')' if args.use_vllm else 'transformers'}")
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            step = int(Path(resume_from).name.split("-")[-1])
            _truncate_metrics(metrics_path, step) if metrics_path.is_file() else metrics_path.write_text("")
            log(f"resuming from {resume_from} at step {step}")
        else:
            if cfg.resume == "auto":
                log(f"--resume auto: no checkpoint in {out_dir}, starting from step 0")
            metrics_path.write_text("")
        (out_dir / "config.json").write_text(cfg.to_json())
    state.wait_for_everyone()
    Trainer = _trainer_class()
    trainer = Trainer(model=model, args=args, train_dataset=prompt_dataset(problems, tokenizer, template),
                      processing_class=tokenizer, callbacks=[_Checkpoints(cfg.checkpoint_every), *callbacks], rlsc=cfg,
                      metrics_path=metrics_path, sample=sample)
    history = read_metrics(metrics_path) if metrics_path.is_file() else []
    trainer._skipped_total = sum(bool(r.get("skipped")) for r in history)
    trainer.train(resume_from_checkpoint=resume_from)
    final_dir = None
    if cfg.save_final_model:
        final_dir = out_dir / "final"
        if cfg.lora_rank > 0:
            # As the thin trainer: the adapters merged into the weights, one ordinary model folder.
            if trainer.accelerator.is_main_process:
                save_final(trainer.accelerator.unwrap_model(trainer.model), tokenizer, final_dir)
        else:
            trainer.save_model(str(final_dir))  # every process: gathers FSDP shards on the main one
            if trainer.accelerator.is_main_process:
                tokenizer.save_pretrained(final_dir)
        if trainer.accelerator.is_main_process:
            log(f"saved the trained model to {final_dir}")
    plot = None
    if trainer.accelerator.is_main_process:
        plot = plot_training_curves(metrics_path, out_dir / "training_curves.png", title=f"RLSC on {cfg.prompts}")
    trainer.accelerator.wait_for_everyone()
    return {"metrics": str(metrics_path), "plot": str(plot) if plot else None,
            "final_model": str(final_dir) if final_dir else None, "steps": cfg.steps, "engine": "trl",
            "processes": processes}
