"""What a call's rollover costs the CPU: the refill (shadow fill) against the ring cache.

Each measurement is ``hertz-agents bench`` with the default model at a 2048-position context
(hertz-dev's; hertz-small is served at its own 128) in a fresh process; the two rollovers
alternate for every spec in every round, so the machine's noise hits both alike. A spec is
``SESSIONS:POSITION:STEPS``; a position at or past the context is run for the ring only (the
refill's positions never get there), and steps that cross the context show the rollover:

    python benchmarks/rollover_cost.py --rounds 2 \
        --specs 32:50:100 32:1000:100 32:2040:300 16:2040:300 8:2040:300 32:20000:100
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np

ROLLOVERS = ("refill", "ring")
CONTEXT = 2048  # hertz-dev's: the context whose cost this measures


def bench(sessions: int, position: int, steps: int, threads: int, rollover: str) -> dict:
    """One ``hertz-agents bench`` run; its JSON."""
    command = [sys.executable, "-m", "hertz_agents.cli", "bench", "--model", "default", "--json"]
    command += ["--threads", str(threads), "--sessions", str(sessions), "--steps", str(steps)]
    command += ["--position", str(position), "--rollover", rollover, "--context", str(CONTEXT)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate the two rollovers over the specs; print each run and a table of medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--specs", nargs="+", default=["32:50:100", "32:1000:100", "32:2040:300"])
    args = parser.parse_args()
    specs = [tuple(map(int, spec.split(":"))) for spec in args.specs]
    results: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for sessions, position, steps in specs:
            for rollover in ROLLOVERS:
                if rollover == "refill" and position >= CONTEXT:
                    continue
                out = bench(sessions, position, steps, args.threads, rollover)
                results.setdefault((sessions, position, steps, rollover), []).append(out)
                print(
                    f"round {round_ + 1}: {sessions} sessions from {position}, {steps} steps, "
                    f"{rollover}: median {out['step_ms_median']:.1f} p90 {out['step_ms_p90']:.1f} "
                    f"max {out['step_ms_max']:.1f} ms, {out['rollovers']} rollovers",
                    flush=True,
                )
    columns = " | ".join(f"{r}: median / p90 / max" for r in ROLLOVERS)
    print(f"\n| sessions | from position | steps | {columns} |")
    print("| --- | --- | --- | --- | --- |")
    for sessions, position, steps in specs:
        cells = []
        for rollover in ROLLOVERS:
            runs = results.get((sessions, position, steps, rollover))
            if not runs:
                cells.append("(past the context)")
                continue
            figures = [
                np.median([r[k] for r in runs])
                for k in ("step_ms_median", "step_ms_p90", "step_ms_max")
            ]
            cells.append(" / ".join(f"{f:.1f}" for f in figures) + " ms")
        print(f"| {sessions} | {position} | {steps} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
