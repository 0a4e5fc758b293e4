"""Atomic checkpoints: written to a temporary file in the same directory, flushed to disk, then
moved over the previous one with os.replace, so a crash mid-write leaves the last good checkpoint
intact (at worst a stray temporary file, removed on the next start)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def checkpoint_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trained tensors only (all weights for full fine-tuning, the adapters for LoRA)."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def write_atomic(path: Path, write) -> None:
    """Calls write(fh) on a temporary file beside `path`, flushes it to disk and moves it over
    `path` (os.replace), then syncs the directory: a crash leaves the old file or the new one,
    never a torn one (at worst a stray temporary, removed on the next start)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(output_dir: str | Path, *, model, optimizer, step: int, config: dict) -> Path:
    path = checkpoint_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": step, "model": trainable_state(model), "rng": rng_state(), "config": config, "format": 1}
    if optimizer is not None:  # None: weights and RNG only (a third of the size under AdamW)
        payload["optimizer"] = optimizer.state_dict()
    write_atomic(path, lambda fh: torch.save(payload, fh))
    return path


def remove_stale_temporaries(output_dir: str | Path) -> None:
    for stale in Path(output_dir).glob(f".{CHECKPOINT}.tmp-*"):
        stale.unlink(missing_ok=True)


def load_checkpoint(output_dir: str | Path) -> dict | None:
    path = checkpoint_path(output_dir)
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(payload: dict, *, model, optimizer) -> int:
    """Loads weights, optimizer and RNG states from a checkpoint payload; returns its step."""
    params = dict(model.named_parameters())
    missing = [n for n in payload["model"] if n not in params]
    if missing:
        raise ValueError(f"checkpoint does not match the model: unknown tensors {missing[:3]}")
    with torch.no_grad():
        for name, value in payload["model"].items():
            params[name].copy_(value)
    if "optimizer" in payload:
        optimizer.load_state_dict(payload["optimizer"])
    set_rng_state(payload["rng"])
    return int(payload["step"])
