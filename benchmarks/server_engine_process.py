"""The cost of the server's engine process against an engine in the server's own process.

Both backends are loaded in one run and measured round by round, interleaved, so machine noise
hits them alike (read the ratios, not the absolute figures, on a shared machine):

* ``added latency``: one session paced in real time; per step, the latency from the input step
  being complete to its output reaching the caller's thread, minus the tick's compute. That is
  queueing plus transport, so the difference of the two medians is what the process adds (two
  frames over a Unix socket pair, and two thread hops).
* ``steps/s at N sessions``: N sessions each keeping two steps in flight (closed loop, as fast
  as the engine goes): the output steps per second the backend delivers, i.e. its capacity.

    python benchmarks/server_engine_process.py --model default --device cpu --sessions 16 \\
        --rounds 3 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

import numpy as np

from hertz_agents.timing import SAMPLES_PER_STEP, STEP_SECONDS


def paced_latency(backend, steps: int) -> dict[str, float]:
    """One real-time session: median latency, and latency minus compute (queue + transport)."""
    latency: list[float] = []
    overhead: list[float] = []
    done = threading.Event()

    def on_output(audio, info) -> None:
        ms = (time.monotonic() - info.input_complete) * 1000
        if info.input_seq is not None:
            latency.append(ms)
            overhead.append(ms - info.compute_ms)
        if len(latency) >= steps:
            done.set()

    slot = backend.open(on_output, seed=0)
    rng = np.random.default_rng(0)
    start = time.monotonic()
    for k in range(steps):
        due = start + (k + 1) * STEP_SECONDS
        time.sleep(max(0.0, due - time.monotonic()))
        slot.submit((0.1 * rng.standard_normal(SAMPLES_PER_STEP)).astype(np.float32))
    done.wait(10)
    slot.close()
    warm = 4  # the first steps warm caches up
    return {
        "latency_ms_median": statistics.median(latency[warm:]),
        "overhead_ms_median": statistics.median(overhead[warm:]),
    }


def closed_loop_rate(backend, sessions: int, seconds: float) -> float:
    """Output steps a second with ``sessions`` sessions, each with two steps in flight."""
    step = np.zeros(SAMPLES_PER_STEP, np.float32)
    counts = [0] * sessions
    slots: list = []
    stop = threading.Event()

    def make(i: int):
        def on_output(audio, info) -> None:
            counts[i] += 1
            if not stop.is_set():
                slots[i].submit(step)

        return on_output

    for i in range(sessions):
        slots.append(None)
        slots[i] = backend.open(make(i), seed=i)
    for s in slots:
        s.submit(step)
        s.submit(step)
    time.sleep(1.0)  # warm-up
    before, t0 = sum(counts), time.monotonic()
    time.sleep(seconds)
    rate = (sum(counts) - before) / (time.monotonic() - t0)
    stop.set()
    for s in slots:
        s.close()
    time.sleep(0.5)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40, help="paced steps per latency round")
    parser.add_argument("--seconds", type=float, default=5.0, help="per closed-loop round")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from hertz_agents.checkpoint import load_model
    from hertz_agents.engine import Engine
    from hertz_agents.server.engine_process import EngineProcess
    from hertz_agents.server.engine_wire import EngineSpec

    options = {"max_sessions": args.sessions, "max_input_backlog": 4}
    backends = {
        "in-process": Engine(load_model(args.model, device=args.device), **options),
        "process": EngineProcess(
            EngineSpec(model=args.model, device=args.device, engine_options=options)
        ),
    }
    results: dict[str, dict[str, list[float]]] = {
        name: {"latency_ms_median": [], "overhead_ms_median": [], "steps_per_second": []}
        for name in backends
    }
    try:
        for r in range(args.rounds):
            order = list(backends) if r % 2 == 0 else list(reversed(backends))
            for name in order:
                figures = paced_latency(backends[name], args.steps)
                figures["steps_per_second"] = closed_loop_rate(
                    backends[name], args.sessions, args.seconds
                )
                for key, value in figures.items():
                    results[name][key].append(value)
                print(f"round {r} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    finally:
        for backend in backends.values():
            backend.close()
    summary = {
        name: {key: statistics.median(values) for key, values in figures.items()}
        for name, figures in results.items()
    }
    local, proc = summary["in-process"], summary["process"]
    summary["process_vs_in_process"] = {
        "added_latency_ms": proc["overhead_ms_median"] - local["overhead_ms_median"],
        "latency_ratio": proc["latency_ms_median"] / local["latency_ms_median"],
        "steps_per_second_ratio": proc["steps_per_second"] / local["steps_per_second"],
    }
    summary["config"] = vars(args)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
