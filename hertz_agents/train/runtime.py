"""Where a training process runs: device, precision, process group, RNG state.

Under ``torchrun`` every process reads its rank from the environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``) and joins one process group: NCCL on CUDA, gloo on the CPU.
Run alone, it is rank 0 of 1 and no process group is made.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from hertz_agents.train.config import RunConfig


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: full float32

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and logs."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the forward passes (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def barrier(self) -> None:
        """Wait for every process (a no-op in a single process)."""
        if self.distributed:
            dist.barrier()


def setup(run: RunConfig) -> Runtime:
    """Pick the device and precision, join the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if run.threads > 0:
        torch.set_num_threads(run.threads)
    want = run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(want)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None
        )
    precision = run.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"run.precision must be auto, fp32 or bf16, got {run.precision!r}")
    seed_everything(run.seed)  # every rank builds the same initial weights
    return Runtime(rank, world, local_rank, device, torch.bfloat16 if precision == "bf16" else None)


def teardown(clean: bool = True) -> None:
    """Leave the process group.

    ``clean=False`` (an error or Ctrl-C is on its way out): no barrier, whose peers may be gone,
    just drop the group.
    """
    if dist.is_initialized():
        # Every rank leaves together: a rank that destroys the group while another is still in a
        # collective can abort at exit ("terminate called without an active exception").
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from, to restore a run exactly."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNGs saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def all_reduce_mean(values: dict[str, float], rt: Runtime) -> dict[str, float]:
    """Average scalar metrics over processes (one collective for all of them)."""
    if not rt.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device(rt))
    dist.all_reduce(t)
    return {k: float(v) / rt.world for k, v in zip(keys, t.tolist(), strict=True)}


def all_reduce_sum(t: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """Sum ``t`` over processes; the result is on the CPU."""
    if rt.distributed:
        t = t.to(_collective_device(rt))
        dist.all_reduce(t)
    return t.cpu()


def _collective_device(rt: Runtime) -> torch.device:
    return rt.device if dist.get_backend() == "nccl" else torch.device("cpu")


def wrap_ddp(module: nn.Module, rt: Runtime, broadcast_buffers: bool = True) -> nn.Module:
    """A DDP replica of ``module`` when distributed and it has trainable parameters; else itself.

    ``broadcast_buffers=False`` when no buffer changes in training (a frozen base, whose int8
    weights are buffers: DDP would otherwise send them from rank 0 before every forward).
    """
    if not rt.distributed or not any(p.requires_grad for p in module.parameters()):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [rt.device.index] if rt.device.type == "cuda" else None
    # Newer torch names the per-forward sync forward_sync_buffers (it still syncs once at init).
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return DistributedDataParallel(module, device_ids=ids, **{key: broadcast_buffers})


def no_sync_unless(last: bool, *modules: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce on all micro-batches but the last of a step."""
    stack = contextlib.ExitStack()
    if not last:
        for m in modules:
            if hasattr(m, "no_sync"):
                stack.enter_context(m.no_sync())  # type: ignore[operator]
    return stack
