"""The server's figures, and their rendering in the Prometheus text format (version 0.0.4).

Everything is written and read on the server's event loop, so nothing here takes a lock.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable
from typing import Any

import numpy as np

from hertz_agents.backend import BackendStats
from hertz_agents.timing import STEP_SECONDS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. The step budget is one step (STEP_SECONDS); the buckets are dense around it.
STEP_BUCKETS = (
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    STEP_SECONDS,
    0.15,
    0.2,
    0.3,
    0.5,
    1.0,
    2.5,
)
RTF_WINDOW = 512  # steps behind the real-time-factor gauge


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus wants them."""

    def __init__(self, buckets: Iterable[float]) -> None:
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count one value."""
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def lines(self, name: str) -> list[str]:
        """The exposition lines of this histogram under ``name``."""
        out, running = [], 0
        for bound, n in zip(self.buckets, self.counts):
            running += n
            out.append(f'{name}_bucket{{le="{bound:g}"}} {running}')
        out += [
            f'{name}_bucket{{le="+Inf"}} {self.count}',
            f"{name}_sum {self.sum:.6f}",
            f"{name}_count {self.count}",
        ]
        return out


class ServerMetrics:
    """Counters, gauges and histograms of one server."""

    def __init__(self) -> None:
        self.started: Counter[str] = Counter()  # by endpoint: session, compat
        self.ended: Counter[str] = Counter()  # by reason: client, disconnect, shutdown, error codes
        self.rejected: Counter[str] = Counter()  # by error code, before a slot was taken
        self.steps = 0
        self.late_steps = 0
        self.silence_steps = 0
        self.dropped: Counter[str] = Counter()  # input steps, by cause: backlog, rate, reconnect
        self.auth_failures = 0
        self.step_compute = Histogram(STEP_BUCKETS)
        self.step_latency = Histogram(STEP_BUCKETS)
        self._recent_compute: deque[float] = deque(maxlen=RTF_WINDOW)

    def observe_step(self, compute_ms: float, latency_ms: float, silence: bool) -> None:
        """Count one output step."""
        self.steps += 1
        self.silence_steps += int(silence)
        self.late_steps += int(latency_ms > STEP_SECONDS * 1000)
        self.step_compute.observe(compute_ms / 1000)
        self.step_latency.observe(latency_ms / 1000)
        self._recent_compute.append(compute_ms / 1000)

    def real_time_factor(self) -> float:
        """Median compute of recent steps over a step's length: above 1 the engine falls behind."""
        if not self._recent_compute:
            return 0.0
        return float(np.median(np.fromiter(self._recent_compute, dtype=np.float64))) / STEP_SECONDS

    def summary(self) -> dict[str, Any]:
        """The headline figures as a JSON-able dict (for ``/v1/info`` and metrics replies)."""
        return {
            "steps": self.steps,
            "late_steps": self.late_steps,
            "silence_steps": self.silence_steps,
            "dropped_input_steps": sum(self.dropped.values()),
            "real_time_factor": round(self.real_time_factor(), 4),
            "sessions_started": sum(self.started.values()),
            "sessions_rejected": sum(self.rejected.values()),
        }

    def render(
        self, *, active: dict[str, int], max_sessions: int, draining: bool, engine: object = None
    ) -> str:
        """The Prometheus exposition text (``engine``'s own figures when it reports them)."""
        lines: list[str] = []

        def metric(
            name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float]]
        ) -> None:
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(
                    f"{name}{labels} {value:g}"
                    if isinstance(value, float)
                    else f"{name}{labels} {value}"
                )

        def by(label: str, counts: dict[str, int]) -> list[tuple[str, float]]:
            return [(f'{{{label}="{key}"}}', n) for key, n in sorted(counts.items())]

        metric(
            "hertz_sessions_active",
            "gauge",
            "Sessions holding an engine slot, by endpoint.",
            by("endpoint", active),
        )
        metric("hertz_sessions_max", "gauge", "Session slots of the engine.", [("", max_sessions)])
        metric(
            "hertz_draining",
            "gauge",
            "1 while the server drains for shutdown.",
            [("", int(draining))],
        )
        metric(
            "hertz_sessions_started_total",
            "counter",
            "Sessions started, by endpoint.",
            by("endpoint", self.started),
        )
        metric(
            "hertz_sessions_ended_total",
            "counter",
            "Sessions ended, by reason.",
            by("reason", self.ended),
        )
        metric(
            "hertz_sessions_rejected_total",
            "counter",
            "Session requests refused, by reason.",
            by("reason", self.rejected),
        )
        metric(
            "hertz_auth_failures_total",
            "counter",
            "Requests with a missing or wrong token.",
            [("", self.auth_failures)],
        )
        metric(
            "hertz_steps_total", "counter", "Output steps (125 ms each) sent.", [("", self.steps)]
        )
        metric(
            "hertz_late_steps_total",
            "counter",
            "Output steps ready more than one step after their input.",
            [("", self.late_steps)],
        )
        metric(
            "hertz_silence_steps_total",
            "counter",
            "Steps run on inserted silence because input stalled.",
            [("", self.silence_steps)],
        )
        metric(
            "hertz_dropped_input_steps_total",
            "counter",
            "Input steps dropped, by cause.",
            by("cause", self.dropped),
        )
        lines += [
            "# HELP hertz_step_compute_seconds "
            "Compute time of the batched tick behind each output step.",
            "# TYPE hertz_step_compute_seconds histogram",
            *self.step_compute.lines("hertz_step_compute_seconds"),
        ]
        lines += [
            "# HELP hertz_step_latency_seconds "
            "From an input step being complete to its output being ready.",
            "# TYPE hertz_step_latency_seconds histogram",
            *self.step_latency.lines("hertz_step_latency_seconds"),
        ]
        metric(
            "hertz_real_time_factor",
            "gauge",
            f"Median compute of the last {RTF_WINDOW} steps over the step duration "
            "(above 1: falling behind).",
            [("", self.real_time_factor())],
        )
        if isinstance(engine, BackendStats):  # a local engine's own figures
            metric(
                "hertz_engine_ticks_total", "counter", "Batched engine ticks.", [("", engine.ticks)]
            )
            if engine.tick_sizes:
                metric(
                    "hertz_engine_batch_size",
                    "gauge",
                    "Mean sessions per tick over recent ticks.",
                    [("", float(np.mean(list(engine.tick_sizes))))],
                )
            metric(
                "hertz_session_state_bytes",
                "gauge",
                "Device memory one session slot holds (KV caches, states).",
                [("", engine.bytes_per_session())],
            )
        return "\n".join(lines) + "\n"
