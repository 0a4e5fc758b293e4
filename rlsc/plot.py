"""PNG plots: the training curves in metrics.jsonl, and the before/after evaluation of `rlsc demo`."""
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
    return _save(fig, title, out_path)


def plot_before_after(before: dict[str, dict], after: dict[str, dict], out_path: str | Path,
                      title: str = "held-out evaluation, before and after RLSC") -> Path | None:
    """Grouped bars per dataset: greedy accuracy, pass@j and maj@k before and after training
    (`rlsc demo` writes it as before_after.png next to training_curves.png)."""
    names = [n for n in after if n in before]
    if not names:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(max(6.5, 6.5 * len(names)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        keys = [k for k in after[name] if k == "greedy_accuracy" or k.startswith(("pass@", "maj@"))]
        keys = [k for k in keys if k in before[name]]
        xs = range(len(keys))
        width = 0.38
        for offset, (label, res, color) in zip((-width / 2, width / 2), (("before", before[name], "#9aa5b1"),
                                                                           ("after", after[name], "#1f77b4"))):
            values = [res[k] for k in keys]
            bars = ax.bar([x + offset for x in xs], values, width, label=label, color=color)
            ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=7, padding=1)
        ax.set_xticks(list(xs), [k.replace("_accuracy", "") for k in keys], fontsize=9)
        ax.set_ylim(0, 1.08)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    return _save(fig, title, out_path)


def _save(fig, title: str, out_path: str | Path) -> Path:
    """Titles, lays out and writes `fig` as a PNG at out_path, then closes it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
