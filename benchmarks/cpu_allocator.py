"""The default model's CPU ticks with glibc's own malloc against freed memory kept (allocator.py).

Each measurement is ``hertz-agents bench`` in a fresh process (the malloc setting is
process-wide and one-way), with ``HERTZ_KEEP_FREED_MEMORY`` 0 or 1; the two alternate in every
round, so the machine's noise hits both alike:

    python benchmarks/cpu_allocator.py --rounds 2 --specs 1:50 8:50 32:50 32:1000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SETTINGS = {"glibc default": "0", "freed memory kept": "1"}


def bench(sessions: int, position: int, steps: int, threads: int, keep: str) -> dict:
    """One ``hertz-agents bench`` run; its JSON."""
    command = [
        sys.executable,
        "-m",
        "hertz_agents.cli",
        "bench",
        "--model",
        "default",
        "--threads",
        str(threads),
        "--sessions",
        str(sessions),
        "--steps",
        str(steps),
        "--position",
        str(position),
        "--context",  # the context these figures were first measured at (docs/benchmarks.md)
        "2048",
        "--json",
    ]
    env = {**os.environ, "HERTZ_KEEP_FREED_MEMORY": keep}
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    """Alternate the two settings over the specs; print each run and a table of medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--specs", nargs="+", default=["1:50", "8:50", "32:50", "32:1000"])
    args = parser.parse_args()
    specs = [tuple(map(int, spec.split(":"))) for spec in args.specs]
    results: dict[tuple, list[dict]] = {}
    for round_ in range(args.rounds):
        for sessions, position in specs:
            for name, keep in SETTINGS.items():
                out = bench(sessions, position, args.steps, args.threads, keep)
                results.setdefault((sessions, position, name), []).append(out)
                print(
                    f"round {round_ + 1}: {sessions} sessions at {position}, {name}: "
                    f"median {out['step_ms_median']:.1f} p90 {out['step_ms_p90']:.1f} ms",
                    flush=True,
                )
    print("\n| sessions | position | " + " | ".join(f"{n}: median / p90" for n in SETTINGS) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in SETTINGS) + " |")
    for sessions, position in specs:
        cells = []
        for name in SETTINGS:
            runs = results[(sessions, position, name)]
            median = np.median([r["step_ms_median"] for r in runs])
            p90 = np.median([r["step_ms_p90"] for r in runs])
            cells.append(f"{median:.1f} / {p90:.1f} ms")
        print(f"| {sessions} | {position} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
