"""Checkpoints of a training run: save, load, and the states they hold.

A checkpoint folder (``<out_dir>/checkpoints/step_N``) holds ``trainer.pt`` (the step, the data
position, the schedulers, the best validation so far, the recipe, the process count), one
``rng_rank<r>.pt`` per process and the networks and optimizers: inside ``trainer.pt`` when each
process holds a whole replica (one process, DDP: rank 0 writes its own), or, for a sharded
(FSDP) run, in ``shards/`` through torch distributed checkpoint (DCP): each rank writes its own
shards, nothing is gathered into one process, and any process count (one included) reads them
back resharded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hertz_agents.train.batches import BatchStream
from hertz_agents.train.config import LogConfig, to_dict
from hertz_agents.train.runfolder import CHECKPOINTS, LATEST, CheckpointIndex
from hertz_agents.train.runtime import Runtime, rng_state, set_rng_state

if TYPE_CHECKING:
    from hertz_agents.train.loop import Task

log = logging.getLogger(__name__)

SHARDS = "shards"  # a sharded run's networks and optimizers (DCP), inside a checkpoint folder


class Checkpoints:
    """What the :class:`~hertz_agents.train.loop.Trainer` saves and resumes from (a mixin)."""

    task: Task
    stream: BatchStream
    rt: Runtime
    logcfg: LogConfig
    config: Any
    out_dir: Path
    step: int
    best: dict[str, float]

    def checkpoint_dir(self, step: int) -> Path:
        """The folder of the checkpoint of ``step``."""
        return self.out_dir / CHECKPOINTS / f"step_{step:07d}"

    def _full_states(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Module and optimizer state dicts, whole.

        Sharded: every rank must call; rank 0 gets them.
        """
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
            k: get_optimizer_state_dict(self.task.modules[k], o, options=opts)
            for k, o in self.task.optimizers.items()
        }
        return modules, optimizers

    def _sharded_states(self) -> dict[str, dict[str, Any]]:
        """Module and optimizer state dicts as this process holds them (FSDP: its shards).

        Keyed by parameter names, not by process, so DCP can reshard them for another count.
        """
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        return {
            "modules": {k: get_model_state_dict(m) for k, m in self.task.modules.items()},
            "optimizers": {
                k: get_optimizer_state_dict(self.task.modules[k], o)
                for k, o in self.task.optimizers.items()
            },
        }

    def save_checkpoint(self) -> Path:
        """Save weights, optimizer, schedule, data position and RNGs; every rank must call.

        Sharded: every rank writes its own shards (DCP) and rank 0 the rest; nothing is gathered.
        """
        import torch.distributed.checkpoint as dcp

        directory = self.checkpoint_dir(self.step)
        if self.rt.is_main:
            (directory / SHARDS if self.task.sharded else directory).mkdir(
                parents=True, exist_ok=True
            )
        self.rt.barrier()
        torch.save(rng_state(), directory / f"rng_rank{self.rt.rank}.pt")
        if self.task.sharded:
            dcp.save(self._sharded_states(), checkpoint_id=directory / SHARDS)
            modules, optimizers = None, None
        else:  # a whole replica in every process: rank 0 writes its own
            modules, optimizers = self._full_states()
        if self.rt.is_main:
            states = (
                {"sharded": SHARDS}
                if self.task.sharded
                else {"modules": modules, "optimizers": optimizers}
            )
            state = {
                "step": self.step,
                "data": self.stream.state_dict(),
                **states,
                "schedulers": {k: s.state_dict() for k, s in self.task.schedulers.items()},
                "config": to_dict(self.config),
                "world": self.rt.world,
                "best": self.best,
            }
            tmp = directory / "trainer.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(directory / "trainer.pt")
        self.rt.barrier()
        if self.rt.is_main:  # the marker last: a checkpoint named in `latest` is complete
            index = CheckpointIndex(self.out_dir)
            index.add(self.step)
            (self.out_dir / CHECKPOINTS / LATEST).write_text(directory.name)
            index.prune(self.logcfg.keep_checkpoints)  # this run's own, by step number
        self.rt.barrier()
        return directory

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from a checkpoint folder, or from a run folder's latest checkpoint."""
        directory = Path(path)
        if (directory / CHECKPOINTS / LATEST).exists():  # a run folder: its latest checkpoint
            directory = (
                directory / CHECKPOINTS / (directory / CHECKPOINTS / LATEST).read_text().strip()
            )
        state = torch.load(directory / "trainer.pt", map_location="cpu", weights_only=False)
        same_world = state["world"] == self.rt.world
        if not same_world and self.rt.is_main:
            # Weights, optimizer, schedule and step carry over exactly; the data order of an
            # epoch depends on the process count, so the epoch continues at the same share of
            # its items seen, and each rank's RNG starts from the seed.
            log.warning(
                "%s was written by %d processes, this run has %d: continuing from its weights, "
                "optimizer and step; the data order and RNG are not those of the original run",
                directory, state["world"], self.rt.world,
            )  # fmt: skip
        if "sharded" in state:  # DCP shards: read back resharded for this process count
            self._load_sharded(directory / state["sharded"])
        elif self.task.sharded:  # a whole checkpoint (older runs, or a DDP run) into FSDP
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_model_state_dict,
                set_optimizer_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True)
            for k, m in self.task.modules.items():
                set_model_state_dict(m, state["modules"][k], options=opts)
            for k, o in self.task.optimizers.items():
                set_optimizer_state_dict(
                    self.task.modules[k], o, state["optimizers"][k], options=opts
                )
        else:
            for k, m in self.task.modules.items():
                m.load_state_dict(state["modules"][k])
            for k, o in self.task.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        for k, s in self.task.schedulers.items():
            s.load_state_dict(state["schedulers"][k])
        self.step = state["step"]
        self.best = state.get("best", self.best)
        if self.rt.is_main and directory.parent == self.out_dir / CHECKPOINTS:
            CheckpointIndex(self.out_dir).resumed_at(self.step)
        data = dict(state["data"])
        if not same_world:  # the same number of items seen: batches scale with the world
            data["taken"] = data["taken"] * state["world"] // self.rt.world
        self.stream.load_state_dict(data)
        rng = directory / f"rng_rank{self.rt.rank}.pt"
        if same_world:
            set_rng_state(torch.load(rng, weights_only=False))

    def _load_sharded(self, shards: Path) -> None:
        """Load DCP shards into this process's modules and optimizers, whatever the count.

        Each process reads only what its own shards (or, unsharded, its whole replica) need.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        states = self._sharded_states()  # the layout to fill (the optimizer's state made)
        dcp.load(states, checkpoint_id=shards, no_dist=not self.rt.distributed)
        for k, m in self.task.modules.items():
            set_model_state_dict(m, states["modules"][k])
        for k, o in self.task.optimizers.items():
            set_optimizer_state_dict(self.task.modules[k], o, states["optimizers"][k])
