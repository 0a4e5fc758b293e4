"""rlsc: a thin RLSC (self-confidence RL) trainer built on rlsc_kernels.

    rlsc train --model embedded --prompts builtin:demo --steps 10 --output-dir runs/x
    rlsc eval  --model runs/x/final --prompts data/gsm8k.jsonl --k 16
    rlsc demo  --output-dir runs/demo

Modules: config (the one dataclass), data (prompt sources), models (loading), sampling
(prompts and rollouts), decoding (the decode loops, `decode`), step (Algorithm 1), train (the loop, checkpoints), evaluate, grading, plot, cli.
"""
from .config import RLSCConfig

__all__ = ["RLSCConfig"]
__version__ = "0.1.0"
