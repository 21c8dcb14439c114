"""Timing the engine's tick: B synthetic conversations stepped together, as ``bench`` reports.

The steps may cross the context: every session then rolls over (the stepper prefills the kept
window into a shadow cache over the ticks before, or with ``rollover="ring"`` overwrites its
oldest position), and ``rollovers`` and ``step_ms_max`` show what that costs the slowest tick.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hertz_agents.config import usable_context
from hertz_agents.engine.stepper import Stepper
from hertz_agents.model.hertz import HertzModel
from hertz_agents.timing import SAMPLES_PER_STEP, STEP_SECONDS


@dataclass
class BenchResult:
    """Timing of batched engine ticks as :func:`bench_ticks` measures it (times in ms)."""

    sessions: int
    steps: int
    start_position: int
    context: int
    rollover: str  # "refill" or "ring" (hertz_agents.engine.stepper)
    step_ms_median: float
    step_ms_p90: float
    step_ms_p99: float
    step_ms_max: float
    rollovers: int  # rollovers during the timed steps, all sessions together
    rtf: float  # tick time / 125 ms: below 1 keeps up
    keeps_up: bool  # the p90 tick fits in one step for all sessions together
    bytes_per_session: int
    device: str
    dtype: str
    threads: int

    def as_dict(self) -> dict:
        """Return the result as a plain dict (for JSON output)."""
        return asdict(self)


def speechlike_steps(rng: np.random.Generator, sessions: int) -> np.ndarray:
    """One step of noise under a syllable-like envelope per session, float32 [sessions, hop]."""
    envelope = np.abs(np.sin(np.linspace(0, np.pi, SAMPLES_PER_STEP))) * rng.uniform(0.02, 0.2)
    return (rng.standard_normal((sessions, SAMPLES_PER_STEP)) * envelope).astype(np.float32)


@torch.no_grad()
def bench_ticks(
    model: HertzModel,
    sessions: int,
    steps: int,
    *,
    warmup: int = 3,
    start_position: int = 0,
    context: int | None = None,
    seed: int = 0,
    compile: bool | str = False,
    kv_dtype: torch.dtype | None = None,
    rollover: str | None = None,
    sink: int = 0,
) -> BenchResult:
    """Step ``sessions`` synthetic conversations (speech-like noise in) ``steps`` times, batched.

    All sessions start at ``start_position`` together (as sessions opened together do), so they
    reach the context in the same tick: the worst case for a rollover. A ring's positions keep
    counting, so its ``start_position`` may be past the context (a call minutes in).
    ``rollover``: the model's own by default (``config.serving.rollover``).
    """
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    context = context or usable_context(model.config)
    # the stepper resolves the rollover (the caller's, else the model's): one place decides
    stepper = Stepper(
        model, sessions, context, kv_dtype=kv_dtype, compile=compile, rollover=rollover, sink=sink
    )
    if start_position < 0 or (not stepper.ring and start_position >= context):
        raise ValueError(f"the start position must be in 0..{context - 1} (the context)")
    for slot in range(sessions):  # measure at a given point of the call: cost must not grow
        stepper.jump_to(slot, start_position)
    rng = np.random.default_rng(seed)
    active = torch.ones(sessions, dtype=torch.bool)
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(sessions)]
    times, rollovers = [], 0
    for i in range(warmup + steps):
        audio = torch.from_numpy(speechlike_steps(rng, sessions)).to(device)
        before = stepper.rollovers
        start = time.perf_counter()
        out = stepper.tick(sessions, active, audio, None, generators)
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            out.sum().item()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
            rollovers += stepper.rollovers - before
    arr = np.asarray(times)
    p50, p90, p99 = (float(np.percentile(arr, q)) for q in (50, 90, 99))
    return BenchResult(
        sessions=sessions,
        steps=steps,
        start_position=start_position,
        context=context,
        rollover=stepper.rollover,
        step_ms_median=p50,
        step_ms_p90=p90,
        step_ms_p99=p99,
        step_ms_max=float(arr.max()),
        rollovers=rollovers,
        rtf=p50 / (STEP_SECONDS * 1000),
        keeps_up=p90 < STEP_SECONDS * 1000,
        bytes_per_session=stepper.bytes_per_slot(),
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
    )
