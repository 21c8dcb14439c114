"""Real-time load on a hertz server: N remote sessions, each sending one step every 125 ms.

Measures what sizing needs (does the server keep up with N sessions?) and checks the protocol's
promise: every input step comes back as exactly one output step, in order, none lost.

    python -m hertz_agents.remote.loadtest hertz://127.0.0.1:8000 --sessions 16 --seconds 60

Each session starts at a random phase of the 125 ms clock, as independent callers would, and
paces itself from an absolute schedule, so a late wake-up does not accumulate into drift.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hertz_agents.metrics import percentiles
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS


@dataclass
class SessionLoad:
    """What one paced session saw. Filled from the client's I/O thread, read after the run."""

    index: int
    sent: list[np.ndarray] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)  # input step numbers, in output order
    silence_outputs: int = 0
    unmatched_outputs: int = 0
    latency_ms: list[float] = field(default_factory=list)
    error: str | None = None
    client_metrics: dict[str, Any] = field(
        default_factory=dict
    )  # the session's own metrics at the end
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_output(self, audio: np.ndarray, info: Any) -> None:
        """The session's output callback: pair the step with its input by number."""
        now = time.monotonic()
        with self._lock:
            if info.silence_input:
                self.silence_outputs += 1
                return
            k = info.input_seq  # the handle numbers its steps 0, 1, 2...: the index in `sent`
            if k is None or not 0 <= k < len(self.sent):
                self.unmatched_outputs += 1
                return
            self.answered.append(k)
            self.latency_ms.append((now - info.input_complete) * 1000)

    def submit(self, handle: Any, audio: np.ndarray) -> None:
        """Send one step and remember it."""
        with self._lock:  # held across submit so the step is in `sent` before its answer
            self.sent.append(audio)
            handle.submit(audio, time.monotonic())

    def settled(self, handle: Any) -> bool:
        """Every step sent is answered or was dropped (the session has nothing in flight)."""
        with self._lock:
            dropped: int = handle.metrics.dropped_input_steps
            return len(self.answered) + dropped >= len(self.sent)

    def summary(self) -> dict[str, Any]:
        """What this session saw, as a dict."""
        with self._lock:
            answered = list(self.answered)
            lat = percentiles(self.latency_ms, (50, 90, 99))
            return {
                "sent": len(self.sent),
                "answered": len(answered),
                "silence_outputs": self.silence_outputs,
                "dropped": int(self.client_metrics.get("dropped_input_steps") or 0),
                "unmatched_outputs": self.unmatched_outputs,
                "in_order_once": answered == sorted(set(answered)),
                "missing": len(self.sent) - len(set(answered)),
                "latency_ms_p50": lat[50],
                "latency_ms_p90": lat[90],
                "latency_ms_p99": lat[99],
                "error": self.error,
            }


def _step_audio(rng: np.random.Generator, k: int) -> np.ndarray:
    """A caller-like step: a tone that changes pitch every second, with a little noise."""
    t = (np.arange(SAMPLES_PER_STEP) + k * SAMPLES_PER_STEP) / SAMPLE_RATE
    freq = 150 + 50 * ((k // 8) % 4)
    tone = 0.2 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(SAMPLES_PER_STEP)
    return tone.astype(np.float32)


async def run_load(
    engine: Any,
    sessions: int,
    seconds: float,
    *,
    settle: float = 10.0,
    seed: int = 0,
    on_tick: Any = None,
) -> list[SessionLoad]:
    """Pace ``sessions`` sessions on ``engine`` (e.g. a RemoteEngine) for ``seconds``.

    Then waits (up to ``settle`` s) until every step sent is answered or counted as dropped,
    closes them, and returns what each saw.
    """
    rng = np.random.default_rng(seed)
    loads = [SessionLoad(i) for i in range(sessions)]
    handles = await asyncio.gather(
        *(asyncio.to_thread(engine.open, load.on_output, seed=seed + load.index) for load in loads)
    )
    phases = [random.Random(seed + i).random() * STEP_SECONDS for i in range(sessions)]
    steps = int(round(seconds / STEP_SECONDS))
    start = time.monotonic() + 0.2

    async def pace(load: SessionLoad, handle: Any, phase: float) -> None:
        for k in range(steps):
            due = (
                start + phase + (k + 1) * STEP_SECONDS
            )  # the step is complete at the end of its 125 ms
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                load.submit(handle, _step_audio(rng, k))
            except Exception as e:  # the session ended: record why and stop sending
                load.error = f"{type(e).__name__}: {e}"
                return
            if on_tick is not None and load.index == 0:
                on_tick(k, steps)

    try:
        await asyncio.gather(*(pace(load, h, ph) for load, h, ph in zip(loads, handles, phases)))
        deadline = time.monotonic() + settle
        settled = lambda: all(ld.settled(h) for ld, h in zip(loads, handles))  # noqa: E731
        while time.monotonic() < deadline and not settled():  # noqa: ASYNC110 - polls other threads
            await asyncio.sleep(0.1)
    finally:
        for load, h in zip(loads, handles):
            load.client_metrics = h.metrics.snapshot()
            h.close()
    return loads


def report(loads: list[SessionLoad]) -> dict[str, Any]:
    """Totals over sessions, for people and for asserts."""
    sums = [load.summary() for load in loads]
    latency = percentiles([x for load in loads for x in load.latency_ms], (50, 90, 99))
    return {
        "sessions": len(loads),
        "sent": sum(s["sent"] for s in sums),
        "answered": sum(s["answered"] for s in sums),
        "missing": sum(s["missing"] for s in sums),
        "dropped": sum(
            s["dropped"] for s in sums
        ),  # by the server's engine, falling behind: part of missing
        "accounted": all(s["answered"] + s["dropped"] == s["sent"] for s in sums),
        "silence_outputs": sum(s["silence_outputs"] for s in sums),
        "unmatched_outputs": sum(s["unmatched_outputs"] for s in sums),
        "all_in_order_once": all(s["in_order_once"] for s in sums),
        "errors": [s["error"] for s in sums if s["error"]],
        "latency_ms_p50": latency[50],
        "latency_ms_p90": latency[90],
        "latency_ms_p99": latency[99],
        "late_share": float(
            np.mean(
                [float(x > STEP_SECONDS * 1000) for ld in loads for x in ld.latency_ms] or [0.0]
            )
        ),
    }


async def _main(args: argparse.Namespace) -> int:
    from hertz_agents.remote.client import ReconnectPolicy, RemoteEngine

    engine = await RemoteEngine.connect(
        args.url, token=args.token, reconnect=ReconnectPolicy(attempts=0)
    )
    loads = await run_load(engine, args.sessions, args.seconds)
    result = report(loads)
    print(json.dumps(result, indent=2))
    return (
        0 if result["missing"] == 0 and result["all_in_order_once"] and not result["errors"] else 1
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m hertz_agents.remote.loadtest``: exit 0 when every step was answered."""
    parser = argparse.ArgumentParser(
        prog="python -m hertz_agents.remote.loadtest",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("url", help="hertz://HOST:PORT")
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--token", default=None, help="default: $HERTZ_TOKEN")
    return asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
