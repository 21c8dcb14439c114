"""Timing the engine's tick: B synthetic conversations stepped together, as ``bench`` reports."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hertz_agents.engine.slots import SlotTable
from hertz_agents.engine.stepper import Stepper
from hertz_agents.model.hertz import HertzModel
from hertz_agents.sampling import SamplingSettings, SamplingTensors
from hertz_agents.timing import SAMPLES_PER_STEP, STEP_SECONDS


@dataclass
class BenchResult:
    sessions: int
    steps: int
    start_position: int
    step_ms_median: float
    step_ms_p90: float
    step_ms_p99: float
    rtf: float  # tick time / 125 ms: below 1 keeps up
    keeps_up: bool  # the p90 tick fits in one step for all sessions together
    bytes_per_session: int
    device: str
    dtype: str
    threads: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def bench_ticks(
    model: HertzModel, sessions: int, steps: int, *, warmup: int = 3, start_position: int = 0,
    context: int | None = None, seed: int = 0,
) -> BenchResult:
    """Step ``sessions`` synthetic conversations (speech-like noise in) ``steps`` times, all batched."""
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    limit = min(model.config.ar.seq_len, model.config.resynthesizer.seq_len)
    context = min(context or limit, limit)
    if start_position + warmup + steps >= context:
        raise ValueError(f"start_position + warmup + steps must stay below the context ({context})")
    table = SlotTable(model, sessions, context, device, dtype)
    stepper = Stepper(model, table, keep=max(2, context // 2))
    table.positions.fill_(start_position)  # measure at a given point of the call: cost must not grow
    rng = np.random.default_rng(seed)
    active = torch.ones(sessions, dtype=torch.bool, device=device)
    sampling = SamplingTensors.from_settings([SamplingSettings()] * sessions, device)
    generators = [torch.Generator(device=device).manual_seed(seed + i) for i in range(sessions)]
    times = []
    for i in range(warmup + steps):
        envelope = np.abs(np.sin(np.linspace(0, np.pi, SAMPLES_PER_STEP))) * rng.uniform(0.02, 0.2)
        audio = (rng.standard_normal((sessions, SAMPLES_PER_STEP)) * envelope).astype(np.float32)
        start = time.perf_counter()
        out = stepper.tick(sessions, active, torch.from_numpy(audio).to(device), sampling, generators)
        if device.type == "cuda":
            torch.cuda.synchronize()
        else:
            out.sum().item()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    arr = np.asarray(times)
    p50, p90, p99 = (float(np.percentile(arr, q)) for q in (50, 90, 99))
    return BenchResult(
        sessions=sessions, steps=steps, start_position=start_position,
        step_ms_median=p50, step_ms_p90=p90, step_ms_p99=p99,
        rtf=p50 / (STEP_SECONDS * 1000), keeps_up=p90 < STEP_SECONDS * 1000,
        bytes_per_session=table.bytes_per_slot(), device=str(device), dtype=str(dtype).replace("torch.", ""),
        threads=torch.get_num_threads(),
    )
