"""What batching buys: one tick of 1 session against one tick of B sessions, side by side.

Rounds alternate between the two batch sizes so machine noise hits both alike; the report is the
median of each and their ratio (B sessions cost ``ratio`` times one session per tick).

    python benchmarks/batching.py --model default --sessions 8 --rounds 6 --threads 2
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from hertz_agents.benchmark import bench_ticks
from hertz_agents.checkpoint import load_model
from hertz_agents.timing import STEP_SECONDS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=10, help="timed ticks per round")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, device="cpu")
    ticks: dict[int, list[float]] = {1: [], args.sessions: []}
    memory = 0
    for _ in range(args.rounds):
        for batch in ticks:
            result = bench_ticks(model, batch, args.steps, warmup=2)
            ticks[batch].append(result.step_ms_median)
            memory = result.bytes_per_session
    one, many = float(np.median(ticks[1])), float(np.median(ticks[args.sessions]))
    report = {
        "model": args.model,
        "threads": args.threads,
        "tick_ms_1_session": one,
        f"tick_ms_{args.sessions}_sessions": many,
        "ratio": many / one,
        "keeps_up": many < STEP_SECONDS * 1000,
        "tick_share_of_step": many / (STEP_SECONDS * 1000),
        "bytes_per_session": memory,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
