"""Training logs: a JSONL file always, Weights & Biases when asked for, loss-curve plots.

Each line of ``log.jsonl`` is one record: ``{"step": 120, "split": "train", "time": ...,
"loss": ..., ...}``. Only rank 0 writes. On resume, records past the checkpoint's step (written
by the interrupted run after its last checkpoint) are dropped, so the file reads as one run.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class RunLog:
    """Appends records to ``<out_dir>/log.jsonl`` and mirrors them to W&B when enabled."""

    def __init__(
        self,
        out_dir: Path,
        *,
        enabled: bool,
        wandb_project: str = "",
        run_name: str = "",
        config: dict[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        self.path = out_dir / "log.jsonl"
        self.enabled = enabled
        self._wandb: Any = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line and json.loads(line)["step"] <= resume_step
            ]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()  # a fresh run in an old folder starts a fresh log
        if wandb_project:
            try:
                import wandb  # type: ignore[import-not-found]
            except ImportError:
                log.warning(
                    "run.wandb is on but wandb is not installed (pip install wandb); logging to %s "
                    "only",
                    self.path,
                )
            else:
                self._wandb = wandb.init(
                    project=wandb_project,
                    name=run_name or out_dir.name,
                    config=config,
                    dir=str(out_dir),
                    resume="allow",
                )

    def write(self, step: int, split: str, metrics: dict[str, float]) -> None:
        """Append one JSON line of ``metrics`` (and send them to wandb when it is on)."""
        if not self.enabled:
            return
        record = {
            "step": step,
            "split": split,
            "time": round(time.time(), 3),
            **{k: (round(v, 6) if math.isfinite(v) else str(v)) for k, v in metrics.items()},
        }
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        """Finish the wandb run, if any."""
        if self._wandb is not None:
            self._wandb.finish()


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Read a run log: one dict per JSON line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_curves(
    log_path: str | Path, png: str | Path, keys: list[str] | None = None, title: str = ""
) -> Path | None:
    """Plot train (smoothed) and validation curves of ``keys`` (default: every loss) to ``png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning(
            "matplotlib is not installed (pip install 'hertz-agents[train]'); no plot written"
        )
        return None
    records = read_log(log_path)
    skip = {"step", "split", "time", "lr", "steps_per_s", "items_per_s"}
    if keys is None:
        keys = sorted(
            {k for r in records for k in r if k not in skip and isinstance(r[k], (int, float))}
        )
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    cols = min(3, len(keys))
    rows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys, strict=False):
        for split, style in (("train", "-"), ("val", "o-")):
            pts = [
                (r["step"], r[key])
                for r in records
                if r["split"] == split and isinstance(r.get(key), (int, float))
            ]
            if not pts:
                continue
            xs, raw = zip(*pts, strict=True)
            if split == "train":
                # Raw points faintly, and a debiased moving average whose span follows the run's
                # length (a fixed 0.9 lags a 20-point run by most of its length).
                line = ax.plot(xs, raw, "-", alpha=0.3, linewidth=0.8, label="train (raw)")[0]
                ax.plot(
                    xs,
                    _ema(list(raw), _decay(len(raw))),
                    "-",
                    color=line.get_color(),
                    linewidth=1.2,
                    label="train (smoothed)",
                )
            else:
                ax.plot(xs, raw, style, label=split, markersize=3, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return Path(png)


def _decay(points: int) -> float:
    """EMA decay spanning about a twentieth of the run (at least 1, at most 50 points)."""
    span = min(50.0, max(1.0, points / 20))
    return 1 - 2 / (span + 1)


def _ema(xs: list[float], decay: float) -> list[float]:
    """Exponential moving average, bias-corrected (no drag toward the first value)."""
    out, acc, weight = [], 0.0, 0.0
    for x in xs:
        acc = decay * acc + (1 - decay) * x
        weight = decay * weight + (1 - decay)
        out.append(acc / weight)
    return out


def console_line(step: int, total: int, metrics: dict[str, float], split: str = "train") -> str:
    """``step 120/2000 train loss 3.21 ce 2.9 lr 0.0003 steps/s 1.7``: a quiet progress line."""
    parts = [f"step {step}/{total} {split}"]
    for k, v in metrics.items():
        parts.append(f"{'steps/s' if k == 'steps_per_s' else k} {v:.4g}")
    return " ".join(parts)
