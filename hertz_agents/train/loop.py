"""The training loop shared by the codec and AR phases.

A phase is a :class:`Task`: it owns its networks, optimizers and schedulers and knows how to
take one optimizer step from a list of micro-batches, how to score a validation batch and how
to export its result. The :class:`Trainer` owns everything around that: the data order, the
step counter, validation, logging, plots and checkpoints.

Checkpoints resume exactly: a run stopped after step k and resumed gives the same losses and
weights as one that never stopped. They hold every network, optimizer and scheduler, the step,
the data position (epoch and batches consumed; the order of an epoch is a pure function of
``(seed, epoch)``) and, per rank, every RNG state (:mod:`hertz_agents.train.checkpoints`: a
sharded run's are written per rank, never gathered).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from hertz_agents.train.batches import BatchStream, too_few_items, validation_indices
from hertz_agents.train.checkpoints import Checkpoints
from hertz_agents.train.config import LogConfig, OptimConfig, RunConfig, to_dict
from hertz_agents.train.logs import RunLog, console_line, plot_curves
from hertz_agents.train.optim import clip_and_step, guarded_step, make_optimizer, make_scheduler
from hertz_agents.train.runfolder import CHECKPOINTS, LATEST, claim
from hertz_agents.train.runtime import (
    Runtime,
    all_reduce_mean,
    all_reduce_sum,
    seed_everything,
)

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINTS",
    "LATEST",
    "BatchStream",
    "too_few_items",
    "Diverged",
    "Task",
    "Trainer",
    "clip_and_step",
    "guarded_step",
    "make_optimizer",
    "make_scheduler",
]


class Diverged(RuntimeError):
    """A step's loss or gradient was not finite (``run.on_nonfinite``); nothing was saved."""


class Task(Protocol):
    """One training phase, as the :class:`Trainer` sees it."""

    modules: dict[str, nn.Module]  # everything saved in a checkpoint (unwrapped)
    optimizers: dict[str, torch.optim.Optimizer]  # keyed like the module each one optimizes
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    sharded: bool  # FSDP: checkpoints are DCP shards, exports gathered, validation not split

    def train_step(self, batches: list[Tensor], step: int) -> dict[str, Tensor]:
        """Forward, backward and optimizer step(s) over ``batches``, the micro-batches of one step.

        A step not applied because a value was not finite reports ``"skipped": 1``.
        """
        ...

    def validate_batch(self, batch: Tensor) -> dict[str, Tensor]:
        """Metrics of one validation batch, one value per scored item (items may be left out)."""
        ...

    best_metric: str  # the validation metric "best" follows by default (lower is better)

    def export(
        self, directory: Path, info: dict[str, Any], states: dict[str, dict[str, Tensor]]
    ) -> None:
        """Write the phase's result (a model directory) to ``directory``.

        ``states`` holds the full state dict of each module (what a sharded task must export from).
        """
        ...


# -- the trainer ------------------------------------------------------------------------------


class Trainer(Checkpoints):
    """Runs a :class:`Task` for ``optim.steps`` steps with validation, logs and checkpoints."""

    def __init__(
        self,
        task: Task,
        stream: BatchStream,
        val_set: Callable[[], Dataset[Tensor] | None],
        rt: Runtime,
        run: RunConfig,
        optim: OptimConfig,
        logcfg: LogConfig,
        config: Any,
    ) -> None:
        self.task, self.stream, self.rt = task, stream, rt
        self.make_val_set = val_set
        self.val_set: Dataset[Tensor] | None = None  # built at the first validation
        self.run, self.optim, self.logcfg, self.config = run, optim, logcfg, config
        self.out_dir = Path(run.out_dir)
        self.step = 0
        self.log: RunLog | None = None
        metric = logcfg.best_metric
        self.best_metric = (
            task.best_metric if metric == "auto" else ("" if metric == "none" else metric)
        )
        self.best: dict[str, float] = {"value": math.inf, "step": -1, "stale": 0}

    # -- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Score the validation set and return its averaged metrics (empty without one)."""
        if self.val_set is None:
            try:
                self.val_set = self.make_val_set()
            except FileNotFoundError as e:  # a corpus still being written; try again next time
                log.warning("no validation this time: %s", e)
                return {}
        if self.val_set is None or len(self.val_set) == 0:  # type: ignore[arg-type]
            return {}
        for m in self.task.modules.values():
            m.eval()
        sums: dict[str, Tensor] = {}
        # Sharded models need every rank in every forward: each rank scores all items then.
        everyone = Runtime(0, 1, 0, self.rt.device, None) if self.task.sharded else self.rt
        indices = validation_indices(len(self.val_set), self.config.data.val_items, everyone)  # type: ignore[arg-type]
        with torch.random.fork_rng(devices=[]):  # validation must not move the training RNG
            loader = DataLoader(
                self.val_set,
                batch_size=self.optim.batch_size,
                sampler=indices,
                generator=torch.Generator().manual_seed(0),
            )
            for batch in loader:
                with self.rt.autocast():
                    metrics = self.task.validate_batch(batch.to(self.rt.device))
                for k, v in metrics.items():
                    add = torch.tensor(
                        [v.detach().double().sum().item(), v.numel()], dtype=torch.float64
                    )
                    sums[k] = sums.get(k, torch.zeros(2, dtype=torch.float64)) + add
        for m in self.task.modules.values():
            m.train()
        keys = sorted(sums)
        if self.rt.distributed:  # every rank must hold the same keys for one collective
            import torch.distributed as dist

            gathered: list[Any] = [None] * self.rt.world
            dist.all_gather_object(gathered, keys)
            keys = sorted({k for ks in gathered for k in ks})
        if not keys:
            return {}
        zero = torch.zeros(2, dtype=torch.float64)
        total = all_reduce_sum(torch.stack([sums.get(k, zero) for k in keys]), self.rt)
        out = {k: float(s / max(n, 1.0)) for k, (s, n) in zip(keys, total.tolist(), strict=True)}
        summary = getattr(self.task, "validation_summary", None)  # e.g. the codebook's usage
        if summary is not None:
            out.update(summary(self.rt))
        return out

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None, overwrite: bool = False) -> Path:
        """Train to ``optim.steps``; returns the exported model directory (``<out_dir>/final``).

        A fresh run refuses a folder holding another run unless ``overwrite``; a step whose
        loss or gradient is not finite is never applied (see ``run.on_nonfinite``): with
        "stop" this raises :class:`Diverged` having saved nothing.
        """
        seed_everything(self.run.seed + self.rt.rank)
        if self.rt.is_main:
            claim(self.out_dir, resuming=bool(resume), overwrite=overwrite)
        self.rt.barrier()
        if resume:
            self.load_checkpoint(resume)
        self.log = RunLog(
            self.out_dir,
            enabled=self.rt.is_main,
            wandb_project=self.run.wandb_project if self.run.wandb else "",
            run_name=self.run.run_name,
            config=to_dict(self.config),
            resume_step=self.step if resume else None,
        )
        try:
            self._loop(fresh=not resume)
        finally:
            self.log.close()
        final = self.out_dir / "final"
        states = self._full_states()[0] if self.task.sharded else {}
        if self.rt.is_main:
            info = {"steps": self.step, "world_size": self.rt.world, "config": to_dict(self.config)}
            self.task.export(final, info, states)
        self.rt.barrier()
        return final

    def _loop(self, fresh: bool) -> None:
        assert self.log is not None
        bar = None
        if self.rt.is_main and self.logcfg.progress:
            from tqdm import tqdm  # type: ignore[import-untyped]

            bar = tqdm(
                total=self.optim.steps,
                initial=self.step,
                desc=self.out_dir.name,
                dynamic_ncols=True,
            )
        if fresh and self.logcfg.val_at_start:
            self._validate_and_plot()
        batches = iter(self.stream)
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        since, skipped, in_a_row = 0, 0, 0
        started = time.perf_counter()
        for m in self.task.modules.values():
            m.train()
        limit = self.run.time_limit_minutes
        deadline = time.monotonic() + 60 * limit if limit > 0 else None
        while self.step < self.optim.steps:
            micro = [
                next(batches).to(self.rt.device, non_blocking=True)
                for _ in range(self.optim.grad_accum)
            ]
            metrics = {k: float(v) for k, v in self.task.train_step(micro, self.step).items()}
            self.step += 1
            since += 1
            if metrics.pop("skipped", 0.0):
                skipped, in_a_row = skipped + 1, in_a_row + 1
                self._on_nonfinite(metrics, in_a_row)
            else:
                in_a_row = 0
                # Per key: a loss that starts mid-window (the critics') is averaged over the
                # steps that have it, not over the whole window.
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
            if bar is not None:
                bar.update()
            last = (
                self.step == self.optim.steps
                or self.step == self.run.stop_at_step
                or (deadline is not None and time.monotonic() > deadline)
            )
            if self.step % self.logcfg.every == 0 or last:
                elapsed = time.perf_counter() - started
                avg = all_reduce_mean({k: v / counts[k] for k, v in sums.items()}, self.rt)
                avg["lr"] = next(iter(self.task.optimizers.values())).param_groups[0]["lr"]
                avg["steps_per_s"] = since / max(elapsed, 1e-9)
                if skipped:
                    avg["skipped_steps"] = float(skipped)
                self.log.write(self.step, "train", avg)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(avg.items())[:3]})
                elif self.rt.is_main:
                    log.info(console_line(self.step, self.optim.steps, avg))
                sums, counts, since, skipped = {}, {}, 0, 0
                started = time.perf_counter()
            if self.step % self.logcfg.val_every == 0 or last:
                last = self._validate_and_plot() or last
            if self.step % self.logcfg.ckpt_every == 0 or last:
                self.save_checkpoint()
            if last:
                break
        if bar is not None:
            bar.close()

    def _validate_and_plot(self) -> bool:
        """Validate, log, keep the best, write samples and the plot; True: stop early."""
        assert self.log is not None
        val = self.validate()
        stop = False
        if val:
            self.log.write(self.step, "val", val)
            if self.rt.is_main:
                log.info(console_line(self.step, self.optim.steps, val, split="val"))
            stop = self._keep_best(val)
        if (
            self.logcfg.samples
            and self.rt.is_main
            and self.val_set is not None
            and len(self.val_set)
        ):  # type: ignore[arg-type]
            write = getattr(self.task, "write_samples", None)
            if write is not None and not self.task.sharded:
                with torch.random.fork_rng(devices=[]), self.rt.autocast():
                    folder = self.out_dir / "samples" / f"step_{self.step:07d}"
                    write(folder, self.val_set[0])  # type: ignore[index]
        if self.rt.is_main and self.logcfg.plot and self.log.path.exists():
            plot_curves(self.log.path, self.out_dir / "curves.png", title=self.out_dir.name)
        return stop

    def _keep_best(self, val: dict[str, float]) -> bool:
        """Export a new best to ``<out_dir>/best`` (not at step 0: that is the baseline).

        Returns True when ``early_stop_patience`` validations in a row brought none.
        """
        value = val.get(self.best_metric) if self.best_metric else None
        if value is None or not math.isfinite(value):
            return False
        if value < self.best["value"]:
            self.best = {"value": value, "step": self.step, "stale": 0}
            if self.step > 0:
                states = self._full_states()[0] if self.task.sharded else {}
                if self.rt.is_main:
                    best = {"metric": self.best_metric, "value": value, "step": self.step}
                    info = {"steps": self.step, "config": to_dict(self.config), "best": best}
                    with torch.random.fork_rng(devices=[]):  # exporting must not move the RNG
                        self.task.export(self.out_dir / "best", info, states)
            return False
        self.best["stale"] += 1
        patience = self.logcfg.early_stop_patience
        if patience and self.best["stale"] >= patience:
            if self.rt.is_main:
                log.info(
                    "early stop at step %d: %s has not improved on %.4g (step %d) "
                    "in %d validations",
                    self.step, self.best_metric, self.best["value"], self.best["step"], patience,
                )  # fmt: skip
            return True
        return False

    def _on_nonfinite(self, metrics: dict[str, float], in_a_row: int) -> None:
        """A step was dropped: stop (saving nothing) or go on, as ``run.on_nonfinite`` says."""
        assert self.log is not None
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        self.log.write(self.step, "nonfinite", metrics)
        latest = self.out_dir / CHECKPOINTS / LATEST
        kept = latest.read_text().strip() if latest.exists() else "none yet"
        if self.run.on_nonfinite == "skip" and in_a_row < self.run.max_skipped_steps:
            log.warning("step %d: not finite (%s); step skipped", self.step, bad)
            return
        why = "" if self.run.on_nonfinite == "stop" else f" {in_a_row} steps in a row;"
        raise Diverged(
            f"step {self.step}: loss or gradient not finite ({bad or 'gradient'});{why} stopped "
            f"without saving (last good checkpoint: {kept}). Lower optim.lr or raise "
            'optim.warmup_steps and resume, or set run.on_nonfinite="skip"'
        )
