"""A real `rlsc train` process killed with SIGKILL at several moments loses at most the step in
flight: resumed with --resume auto, it ends in exactly the state of an uninterrupted run.

The kill points are made deterministic by a small driver that runs rlsc.cli.main in a subprocess
with one function wrapped to SIGKILL the process at a chosen call (mid-generation, between two
micro-batches of an update, half-way through writing a checkpoint)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rlsc.checkpoint as ckpt

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TIMING_FIELDS = {"gen_seconds", "train_seconds", "peak_memory_mb"}

DRIVER = textwrap.dedent("""
    import os, signal, sys
    import rlsc.checkpoint, rlsc.step
    from rlsc.cli import main

    where, nth = sys.argv[1], int(sys.argv[2])
    calls = {"n": 0}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def counted(fn, before=None):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == nth:
                if before is not None:
                    before(*args, **kwargs)
                die()
            return fn(*args, **kwargs)
        return wrapper

    if where == "generation":      # inside the sampling loop of a step
        rlsc.step.sample = counted(rlsc.step.sample)
    elif where == "update":        # after the first micro-batch's backward, before the optimizer step
        rlsc.step._micro_batch = counted(rlsc.step._micro_batch, before=rlsc.step._micro_batch)
    elif where == "checkpoint":    # half of the checkpoint bytes are on disk
        real_save = rlsc.checkpoint.torch.save
        def half_write(obj, fh):
            import io
            buf = io.BytesIO()
            real_save(obj, buf)
            fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            fh.flush()
        rlsc.checkpoint.torch.save = counted(real_save, before=half_write)
    sys.exit(main(sys.argv[3:]))
""")


def _run(args, where="none", nth=0):
    cmd = [sys.executable, "-c", DRIVER, where, str(nth), "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def _args(model_dir, prompts, out):
    return ["--model", str(model_dir), "--prompts", str(prompts), "--num-prompts", "1", "--num-samples", "3",
            "--max-new-tokens", "6", "--steps", "4", "--lr", "1e-3", "--micro-batch-size", "2", "--device", "cpu",
            "--precision", "fp32", "--checkpoint-every", "1", "--no-save-final-model", "--seed", "3",
            "--filter-eps", "exact", "--backend", "torch", "--threads", "1", "--output-dir", str(out)]


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
            for line in open(path) if line.strip()]


def test_sigkill_at_any_moment_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tiny_prompts, tmp_path):
    """One run killed three times, each kill somewhere else, each time resumed (--resume auto)."""
    full = _run(_args(tiny_model_dir, tiny_prompts, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    args = _args(tiny_model_dir, tiny_prompts, out) + ["--resume", "auto"]
    kills = [
        ("generation", 2, 1),   # in step 2's sampling: step 1 is checkpointed
        ("update", 3, 2),       # resumed at 1; in step 3, between its two micro-batches
        ("checkpoint", 2, 3),   # resumed at 2; half-way through writing step 4's checkpoint
    ]
    for where, nth, kept_step in kills:
        killed = _run(args, where, nth)
        assert killed.returncode == -signal.SIGKILL, (where, killed.stderr[-2000:])
        assert ckpt.load_checkpoint(out)["step"] == kept_step, where
    resumed = _run(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {out / 'checkpoint.pt'} at step 3" in resumed.stderr

    a, b = ckpt.load_checkpoint(tmp_path / "full"), ckpt.load_checkpoint(out)
    assert a["step"] == b["step"] == 4
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for key in a["optimizer"]["state"]:
        assert all(torch.equal(x, y) for x, y in zip(a["optimizer"]["state"][key].values(), b["optimizer"]["state"][key].values()))
    assert _rows(tmp_path / "full" / "metrics.jsonl") == _rows(out / "metrics.jsonl")
    assert not list(out.glob(".checkpoint.pt.tmp-*"))
