"""Where a recorded result came from: the commit of this checkout. The one helper for it, used by
`rlsc ablate` and by every script under benchmarks/ (which may import rlsc; rlsc_kernels never does)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

#: Set RLSC_COMMIT to name the commit where the checkout has no .git (a copied tree on a GPU machine).
COMMIT_VARIABLE = "RLSC_COMMIT"


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """Short hash of HEAD of the repository holding `cwd` (default: this package's checkout),
    RLSC_COMMIT when set, or "unknown" where there is no git or no repository."""
    if os.environ.get(COMMIT_VARIABLE):
        return os.environ[COMMIT_VARIABLE]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(cwd) if cwd is not None else Path(__file__).resolve().parent, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
