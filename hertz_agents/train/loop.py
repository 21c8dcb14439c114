"""The training loop shared by the codec and AR phases.

A phase is a :class:`Task`: it owns its networks, optimizers and schedulers and knows how to
take one optimizer step from a list of micro-batches, how to score a validation batch and how
to export its result. The :class:`Trainer` owns everything around that: the data order, the
step counter, validation, logging, plots and checkpoints.

Checkpoints resume exactly: a run stopped after step k and resumed gives the same losses and
weights as one that never stopped. They hold every network, optimizer and scheduler, the step,
the data position (epoch and batches consumed; the order of an epoch is a pure function of
``(seed, epoch)``) and, per rank, every RNG state.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from hertz_agents.train.config import LogConfig, OptimConfig, RunConfig, to_dict
from hertz_agents.train.logs import RunLog, plot_curves
from hertz_agents.train.runtime import (
    Runtime,
    all_reduce_mean,
    all_reduce_sum,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
LATEST = "latest"


class Task(Protocol):
    """One training phase, as the :class:`Trainer` sees it."""

    modules: dict[str, nn.Module]  # everything saved in a checkpoint (unwrapped)
    optimizers: dict[str, torch.optim.Optimizer]  # keyed like the module each one optimizes
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    sharded: bool  # FSDP: states are gathered by every rank together, validation is not split

    def train_step(self, batches: list[Tensor], step: int) -> dict[str, Tensor]:
        """Forward, backward and optimizer step(s) over ``batches`` (the micro-batches of one step)."""
        ...

    def validate_batch(self, batch: Tensor) -> dict[str, Tensor]:
        """Metrics of one validation batch, one value per scored item (items may be left out)."""
        ...

    def export(self, directory: Path, info: dict[str, Any], states: dict[str, dict[str, Tensor]]) -> None:
        """Write the phase's result (a model directory) to ``directory``; ``states`` holds the
        full state dict of each module (what a sharded task must export from)."""
        ...


# -- optimizers -------------------------------------------------------------------------------


def make_optimizer(params: Sequence[nn.Parameter], cfg: OptimConfig, lr: float | None = None) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norms, biases) do not."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr or cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine over the rest of ``total`` (default
    ``cfg.steps``) steps, or constant."""
    total = cfg.steps if total is None else total

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def clip_and_step(opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip: float) -> Tensor:
    """Clip the global gradient norm (when ``clip`` > 0), step, zero; returns the norm."""
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


# -- data -------------------------------------------------------------------------------------


class BatchStream:
    """Endless training batches whose order is a pure function of ``(seed, epoch)``.

    Each epoch is a permutation of the dataset, cut into equal shards (one per rank) and then
    into batches; a trailing partial batch is dropped. The position is (epoch, batches taken),
    so a resumed run skips straight to where it stopped without loading what it skips.

    Args:
        make_dataset: Builds the dataset; called again each epoch when ``rescan`` is set.
        batch_size: Items per batch on this rank.
        rt: The process's place in the run.
        seed: Data-order seed.
        workers: DataLoader worker processes.
        rescan: Rebuild the dataset at each epoch (for a corpus that is still growing).
    """

    def __init__(
        self,
        make_dataset: Callable[[], Dataset[Tensor]],
        batch_size: int,
        rt: Runtime,
        seed: int,
        workers: int = 0,
        rescan: bool = False,
    ) -> None:
        self.make_dataset, self.batch_size, self.rt = make_dataset, batch_size, rt
        self.seed, self.workers, self.rescan = seed, workers, rescan
        self.dataset = make_dataset()
        self.epoch, self.taken = 0, 0

    def batches_of(self, epoch: int) -> list[list[int]]:
        n = len(self.dataset)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g)
        per_rank = n // self.rt.world
        shard = order[self.rt.rank * per_rank : (self.rt.rank + 1) * per_rank].tolist()
        b = self.batch_size
        return [shard[i * b : (i + 1) * b] for i in range(len(shard) // b)]

    def __iter__(self) -> Iterator[Tensor]:
        empty_epochs = 0
        while True:
            batches = self.batches_of(self.epoch)
            if not batches:
                empty_epochs += 1
                if empty_epochs > 1:
                    raise RuntimeError(
                        f"the training set has {len(self.dataset)} items, fewer than one batch of "  # type: ignore[arg-type]
                        f"{self.batch_size} per process: add data or lower optim.batch_size"
                    )
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            # Its own generator: making the iterator must not draw from the global RNG, which a
            # resumed run restores at a different point than the uninterrupted run draws it.
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7)
            loader = DataLoader(
                self.dataset, batch_sampler=batches[self.taken :], num_workers=self.workers, generator=g
            )
            for batch in loader:
                self.taken += 1
                yield batch
            self.epoch, self.taken = self.epoch + 1, 0
            if self.rescan:
                self.dataset = self.make_dataset()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "taken": self.taken}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.taken = state["epoch"], state["taken"]


def validation_indices(n: int, items: int, rt: Runtime) -> list[int]:
    """``items`` indices spread evenly over ``n``, this rank's share of them."""
    count = min(n, items)
    chosen = sorted({int(i * n / count) for i in range(count)}) if count else []
    return chosen[rt.rank :: rt.world]


# -- the trainer ------------------------------------------------------------------------------


class Trainer:
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

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint_dir(self, step: int) -> Path:
        return self.out_dir / CHECKPOINTS / f"step_{step:07d}"

    def _full_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Module and optimizer state dicts, whole. Sharded: every rank must call; rank 0 gets them."""
        if not self.task.sharded:
            return (
                {k: m.state_dict() for k, m in self.task.modules.items()},
                {k: o.state_dict() for k, o in self.task.optimizers.items()},
            )
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        modules = {k: get_model_state_dict(m, options=opts) for k, m in self.task.modules.items()}
        optimizers = {
            k: get_optimizer_state_dict(self.task.modules[k], o, options=opts) for k, o in self.task.optimizers.items()
        }
        return modules, optimizers

    def save_checkpoint(self) -> Path:
        directory = self.checkpoint_dir(self.step)
        if self.rt.is_main:
            directory.mkdir(parents=True, exist_ok=True)
        self.rt.barrier()
        torch.save(rng_state(), directory / f"rng_rank{self.rt.rank}.pt")
        modules, optimizers = self._full_states()
        if self.rt.is_main:
            state = {
                "step": self.step,
                "data": self.stream.state_dict(),
                "modules": modules,
                "optimizers": optimizers,
                "schedulers": {k: s.state_dict() for k, s in self.task.schedulers.items()},
                "config": to_dict(self.config),
                "world": self.rt.world,
            }
            tmp = directory / "trainer.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(directory / "trainer.pt")
        self.rt.barrier()
        if self.rt.is_main:  # the marker last: a checkpoint named in `latest` is complete
            (self.out_dir / CHECKPOINTS / LATEST).write_text(directory.name)
            self._prune()
        self.rt.barrier()
        return directory

    def _prune(self) -> None:
        keep = max(1, self.logcfg.keep_checkpoints)
        found = sorted((self.out_dir / CHECKPOINTS).glob("step_*"))
        for old in found[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path: str | Path) -> None:
        directory = Path(path)
        if (directory / CHECKPOINTS / LATEST).exists():  # a run folder: its latest checkpoint
            directory = directory / CHECKPOINTS / (directory / CHECKPOINTS / LATEST).read_text().strip()
        state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)
        if state["world"] != self.rt.world:
            raise RuntimeError(
                f"{directory} was written by {state['world']} processes, this run has {self.rt.world}: "
                "the data order would differ; resume with the same process count"
            )
        if self.task.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            for k, m in self.task.modules.items():
                set_model_state_dict(m, state["modules"][k], options=opts)
            for k, o in self.task.optimizers.items():
                set_optimizer_state_dict(self.task.modules[k], o, state["optimizers"][k], options=opts)
        else:
            for k, m in self.task.modules.items():
                m.load_state_dict(state["modules"][k])
            for k, o in self.task.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        for k, s in self.task.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.step = state["step"]
        self.stream.load_state_dict(state["data"])
        set_rng_state(torch.load(directory / f"rng_rank{self.rt.rank}.pt", weights_only=False))

    # -- validation ---------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
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
                    add = torch.tensor([v.detach().double().sum().item(), v.numel()], dtype=torch.float64)
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
        total = all_reduce_sum(torch.stack([sums.get(k, torch.zeros(2, dtype=torch.float64)) for k in keys]), self.rt)
        return {k: float(s / max(n, 1.0)) for k, (s, n) in zip(keys, total.tolist(), strict=True)}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None) -> Path:
        """Train to ``optim.steps``; returns the exported model directory (``<out_dir>/final``)."""
        seed_everything(self.run.seed + self.rt.rank)
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
        bar = None
        if self.rt.is_main and self.logcfg.progress:
            from tqdm import tqdm  # type: ignore[import-untyped]

            bar = tqdm(total=self.optim.steps, initial=self.step, desc=self.out_dir.name, dynamic_ncols=True)
        batches = iter(self.stream)
        running: dict[str, float] = {}
        since, started = 0, time.perf_counter()
        for m in self.task.modules.values():
            m.train()
        deadline = time.monotonic() + 60 * self.run.time_limit_minutes if self.run.time_limit_minutes > 0 else None
        while self.step < self.optim.steps:
            micro = [next(batches).to(self.rt.device, non_blocking=True) for _ in range(self.optim.grad_accum)]
            metrics = self.task.train_step(micro, self.step)
            self.step += 1
            for k, v in metrics.items():
                running[k] = running.get(k, 0.0) + float(v)
            since += 1
            if bar is not None:
                bar.update()
            last = (
                self.step == self.optim.steps
                or self.step == self.run.stop_at_step
                or (deadline is not None and time.monotonic() > deadline)
            )
            if self.step % self.logcfg.every == 0 or last:
                elapsed = time.perf_counter() - started
                avg = all_reduce_mean({k: v / since for k, v in running.items()}, self.rt)
                avg["lr"] = next(iter(self.task.optimizers.values())).param_groups[0]["lr"]
                avg["steps_per_s"] = since / max(elapsed, 1e-9)
                self.log.write(self.step, "train", avg)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(avg.items())[:3]})
                running, since, started = {}, 0, time.perf_counter()
            if self.step % self.logcfg.val_every == 0 or last:
                val = self.validate()
                if val:
                    self.log.write(self.step, "val", val)
                if self.rt.is_main and self.logcfg.plot and self.log.path.exists():
                    plot_curves(self.log.path, self.out_dir / "curves.png", title=self.out_dir.name)
            if self.step % self.logcfg.ckpt_every == 0 or last:
                self.save_checkpoint()
            if last:
                break
        if bar is not None:
            bar.close()
        final = self.out_dir / "final"
        states = self._full_states()[0] if self.task.sharded else {}
        if self.rt.is_main:
            info = {"steps": self.step, "world_size": self.rt.world, "config": to_dict(self.config)}
            self.task.export(final, info, states)
        self.rt.barrier()
        self.log.close()
        return final
