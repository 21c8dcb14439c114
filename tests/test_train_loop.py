"""The trainer around any task: losses that start mid-window are averaged over their own steps,
a quiet console line per log step without the progress bar, a validation baseline at step 0,
the best step exported and early stopping; with a stand-in task (a one-weight model) so each
property is seen on its own in a fraction of a second."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from hertz_agents.train.batches import BatchStream
from hertz_agents.train.config import load_codec_config
from hertz_agents.train.logs import _ema, read_log
from hertz_agents.train.loop import Trainer, make_optimizer, make_scheduler
from hertz_agents.train.runtime import Runtime


class ScriptedTask:
    """Returns scripted metrics: `loss` every step, `disc` from step `critic_from` on, and a
    validation `score` from `scores` (one per validation)."""

    sharded = False
    best_metric = "score"

    def __init__(self, cfg: Any, scores: list[float], critic_from: int = 2) -> None:
        self.weight = nn.Linear(1, 1)
        self.modules = {"m": self.weight}
        opt = make_optimizer(list(self.weight.parameters()), cfg.optim)
        self.optimizers = {"m": opt}
        self.schedulers = {"m": make_scheduler(opt, cfg.optim)}
        self.scores, self.critic_from, self.exports = list(scores), critic_from, []

    def train_step(self, batches: list[Tensor], step: int) -> dict[str, Tensor]:
        out = {"loss": torch.tensor(1.0 + step)}
        if step >= self.critic_from:
            out["disc"] = torch.tensor(2.0)
        return out

    def validate_batch(self, batch: Tensor) -> dict[str, Tensor]:
        return {"score": torch.full((len(batch),), self.scores[0])}

    def validation_summary(self, rt: Runtime) -> dict[str, float]:
        self.scores.pop(0)
        return {}

    def export(self, directory: Path, info: dict[str, Any], states: dict[str, Any]) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.exports.append((directory.name, info.get("best")))


def _trainer(tmp_path: Path, scores: list[float], *extra: str) -> tuple[Trainer, ScriptedTask]:
    cfg = load_codec_config(
        None,
        [f'run.out_dir="{tmp_path}"', "optim.steps=8", "optim.batch_size=1", "optim.warmup_steps=1",
         "log.every=4", "log.val_every=2", "log.ckpt_every=100", "log.progress=false",
         "log.plot=false", "data.val_items=1", *extra],
    )  # fmt: skip
    rt = Runtime(0, 1, 0, torch.device("cpu"), None)
    task = ScriptedTask(cfg, scores)
    items = [torch.zeros(1)] * 4
    stream = BatchStream(lambda: items, 1, rt, 0)
    trainer = Trainer(task, stream, lambda: items, rt, cfg.run, cfg.optim, cfg.log, cfg)  # type: ignore[arg-type]
    return trainer, task


def test_a_loss_starting_mid_window_is_averaged_over_its_own_steps(tmp_path: Path) -> None:
    trainer, _ = _trainer(tmp_path, [5.0] * 5)
    trainer.fit()
    train = [r for r in read_log(tmp_path / "log.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [4, 8]
    assert train[0]["disc"] == 2.0  # steps 3-4 only; averaging over 4 steps would log 1.0
    assert train[0]["loss"] == pytest.approx((1 + 2 + 3 + 4) / 4)


def test_without_the_progress_bar_each_log_step_prints_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    trainer, _ = _trainer(tmp_path, [5.0] * 5)
    with caplog.at_level(logging.INFO, logger="hertz_agents.train.loop"):
        trainer.fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert lines[0] == "step 0/8 val score 5"  # the baseline before any training
    assert any(line.startswith("step 4/8 train loss 2.5 disc 2 lr ") for line in lines)


def test_validation_at_step_0_keeps_the_best_step_and_stops_early(tmp_path: Path) -> None:
    # validations at steps 0, 2, 4, 6: best at 2, then two without improvement -> stop at 6
    trainer, task = _trainer(tmp_path, [9.0, 3.0, 4.0, 3.5, 1.0], "log.early_stop_patience=2")
    trainer.fit()
    val = [r for r in read_log(tmp_path / "log.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 4, 6]
    assert task.exports == [("best", {"metric": "score", "value": 3.0, "step": 2}), ("final", None)]
    assert trainer.step == 6 and (tmp_path / "checkpoints" / "step_0000006").exists()


def test_the_smoothed_curve_does_not_drag_toward_its_first_point() -> None:
    ys = _ema([10.0, 1.0, 1.0, 1.0, 1.0], 0.9)
    assert ys[0] == 10.0 and ys[-1] < 5.0  # a plain EMA from 10 would still read 6.6
