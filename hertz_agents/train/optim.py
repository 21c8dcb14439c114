"""Optimizers, the learning-rate schedule, and the guarded optimizer step.

:func:`guarded_step` applies a step only when the loss and the gradient norm are finite on
every process; otherwise it drops the gradients and reports the step as skipped, so a NaN
never reaches the weights (what the trainer then does is ``run.on_nonfinite``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from hertz_agents.train.config import OptimConfig


def make_optimizer(
    params: Sequence[nn.Parameter], cfg: OptimConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """AdamW (``optim.optimizer``: plain, fused on CUDA, or bitsandbytes' 8-bit).

    Matrices decay, vectors (norms, biases) do not.
    """
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    betas = (cfg.betas[0], cfg.betas[1])
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb  # type: ignore[import-not-found]  # checked by the recipe checks

        opt: torch.optim.Optimizer = bnb.optim.AdamW8bit(groups, lr=lr or cfg.lr, betas=betas)
        return opt
    # Fused needs every parameter on CUDA; elsewhere the plain (foreach) kernel is used.
    fused = cfg.optimizer == "adamw_fused" and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr or cfg.lr, betas=betas, fused=fused or None)


def make_scheduler(
    opt: torch.optim.Optimizer, cfg: OptimConfig, total: int | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_steps``, then cosine or constant.

    The cosine spans the rest of ``total`` steps (default ``cfg.steps``).
    """
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


def grad_norm(params: Sequence[nn.Parameter], clip: float) -> Tensor:
    """The global gradient norm, clipping to ``clip`` when it is > 0.

    Clipping is a no-op on NaN: the step is dropped anyway.
    """
    params = [p for p in params if p.grad is not None]
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP


def all_finite(*values: Tensor) -> bool:
    """True when every value is finite on every process (one small collective when distributed)."""
    ok = torch.stack([torch.isfinite(v.detach().float()).all() for v in values]).all()
    if dist.is_available() and dist.is_initialized():
        flag = ok.to(torch.int32).reshape(1)
        if dist.get_backend() != "nccl":
            flag = flag.cpu()
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())
    return bool(ok.item())


def guarded_step(
    opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip: float, loss: Tensor
) -> tuple[Tensor, bool]:
    """Clip, then step only if ``loss`` and the gradient norm are finite everywhere.

    The gradients are zeroed either way. Returns (norm, applied).
    """
    norm = grad_norm(params, clip)
    applied = all_finite(loss, norm)
    if applied:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return norm, applied


def clip_and_step(
    opt: torch.optim.Optimizer, params: Sequence[nn.Parameter], clip: float
) -> Tensor:
    """Clip the global gradient norm (when ``clip`` > 0), step, zero; returns the norm."""
    norm = grad_norm(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm
