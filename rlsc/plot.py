"""PNG plot of the training curves in metrics.jsonl."""
from __future__ import annotations

import json
from pathlib import Path

PANELS = [
    ("loss", "loss"),
    ("mean_seq_logp", "mean log p(y|x)"),
    ("mean_weight", "mean weight"),
    ("frac_weight_underflow", "fraction of weights == alpha"),
    ("mean_token_entropy", "mean token entropy (nats)"),
    ("mean_completion_tokens", "mean completion tokens"),
]


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i + 1 < len(lines):
                raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
            # a last line torn by a process killed mid-write: that step was not checkpointed anyway
    return rows


def plot_training_curves(metrics_path: str | Path, out_path: str | Path, title: str = "RLSC training") -> Path | None:
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    steps = [r["step"] for r in rows]
    for ax, (key, label) in zip(axes.flat, PANELS):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker="o", ms=3)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
