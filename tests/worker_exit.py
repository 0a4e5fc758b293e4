"""How the torchrun test workers end once every check has passed and its result is written."""
from __future__ import annotations

import os
import sys


def exit_after_success() -> None:
    """Leaves without the interpreter's teardown. Ranks of the gloo workers have aborted there after
    reporting success ("terminate called without an active exception": a torch.distributed C++
    thread still joinable when static destructors run), which fails the launcher; a barrier before
    destroy_process_group did not prevent it. A failing check raises before this is reached."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
