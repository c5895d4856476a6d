"""Plot a TTT log (``--ttt-log-out``): the loss of every step, and its gradient and update norms."""

from __future__ import annotations

import json
from pathlib import Path


def load_rows(path: str | Path) -> tuple[str, list[dict]]:
    """The method and the ``step_metrics`` rows of a TTT log; a clear error if the file is not one."""
    doc = json.loads(Path(path).read_text())
    try:
        ttt = doc["ttt"]
        rows = ttt["report"]["step_metrics"]
    except (KeyError, TypeError):
        raise ValueError(f"{path} is not a TTT log (expected ttt.report.step_metrics; was TTT on?)") from None
    if not rows:
        raise ValueError(f"{path}: the run took no TTT step, nothing to plot")
    return str(ttt.get("method", "ttt")), rows


def plot_log(path: str | Path, output: str | Path) -> Path:
    """Write a PNG with the loss per step (rolled-back steps marked) and the gradient/update norms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    method, rows = load_rows(path)
    steps = list(range(1, len(rows) + 1))
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    top.plot(steps, [r["loss"] for r in rows], marker=".", label="loss")
    back = [(s, r["loss"]) for s, r in zip(steps, rows) if r.get("rolled_back")]
    if back:
        top.scatter(*zip(*back), color="red", zorder=3, label="rolled back")
    top.set_ylabel("loss")
    top.set_title(f"{method}: {len(rows)} steps ({Path(path).name})")
    top.legend()
    for key in ("grad_norm", "update_norm", "total_update_norm"):
        bottom.plot(steps, [r[key] for r in rows], label=key)
    bottom.set_yscale("log")
    bottom.set_xlabel("step")
    bottom.legend()
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output
