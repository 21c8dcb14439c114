"""Per-tick CPU time of the engine's stepper on one torch thread, beside wall time.

On a shared machine wall-clock ticks mostly measure other jobs; the CPU time the tick's own
thread spends (``time.thread_time``, one torch thread so all the work is on that thread) does
not count time spent waiting for a core, so two trees or settings compare in one run.

Each spec is ``SESSIONS:POSITION:TICKS:CONTEXT`` (context 0: the model's own), all sessions
starting at POSITION together (as sessions opened together do):

    python benchmarks/tick_cpu_time.py 16:1000:16:0 16:50:16:0 8:0:300:128
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hertz_agents.benchmark import speechlike_steps  # noqa: E402
from hertz_agents.checkpoint import load_model  # noqa: E402
from hertz_agents.engine.stepper import Stepper  # noqa: E402

WARMUP = 2


def measure(model, sessions: int, position: int, ticks: int, context: int) -> str:
    """Step ``sessions`` from ``position`` ``ticks`` times; one line of CPU and wall figures."""
    stepper = Stepper(model, sessions, context or None)
    for slot in range(sessions):
        stepper.jump_to(slot, position)
    rng = np.random.default_rng(0)
    active = torch.ones(sessions, dtype=torch.bool)
    generators = [torch.Generator().manual_seed(i) for i in range(sessions)]
    cpu, wall, rollovers = [], [], 0
    for i in range(WARMUP + ticks):
        audio = torch.from_numpy(speechlike_steps(rng, sessions))
        before, c0, w0 = stepper.rollovers, time.thread_time(), time.perf_counter()
        stepper.tick(sessions, active, audio, None, generators).sum().item()
        if i >= WARMUP:
            cpu.append((time.thread_time() - c0) * 1000)
            wall.append((time.perf_counter() - w0) * 1000)
            rollovers += stepper.rollovers - before
    c, w = np.asarray(cpu), np.asarray(wall)
    return (
        f"{sessions} sessions from {position}, {ticks} ticks, context {stepper.context}: "
        f"rollovers {rollovers} | CPU median {np.median(c):.1f} p90 {np.percentile(c, 90):.1f} "
        f"max {c.max():.1f} ms (max/median {c.max() / np.median(c):.2f}) | "
        f"wall median {np.median(w):.1f} max {w.max():.1f} ms"
    )


def main() -> None:
    """Parse the specs and print one line per spec."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("specs", nargs="+", help="SESSIONS:POSITION:TICKS:CONTEXT")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_model(args.model, device="cpu")
    with torch.no_grad():
        for spec in args.specs:
            sessions, position, ticks, context = map(int, spec.split(":"))
            print(measure(model, sessions, position, ticks, context), flush=True)


if __name__ == "__main__":
    main()
