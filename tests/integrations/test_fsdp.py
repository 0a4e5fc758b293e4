"""add_fused_lm_head under FSDP2 (fully_shard), 2 processes with gloo on CPU (tests/integrations/fsdp_worker.py)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("fsdp_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("mixed", [False, True], ids=["fp32", "bf16-param-policy"])
def test_fused_head_under_fully_shard_matches_the_unsharded_model(mixed):
    """The head sharded on its own (its weight a DTensor inside the model's forward): the op runs
    inside the head's FSDP forward; log-probs, entropies and every gathered gradient match the
    unsharded model (bf16 policy: within bf16 rounding)."""
    env = dict(os.environ, HEAD_SHARDED="1", MIXED="1" if mixed else "0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(WORKER)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FSDP2 OK" in proc.stdout
