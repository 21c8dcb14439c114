"""Soak: `python -m hertz_agents.server` in its own process, 16 remote sessions paced in real time
for 60 s. Proves every input step is answered by exactly one output, in order, or is counted as
dropped by an engine that fell behind; latency does not drift; the server's memory does not grow;
it drains and exits cleanly on SIGTERM.

Whether 16 sessions can be *real time* depends on the machine: the engine must finish a batched
tick of 16 sessions within 125 ms. The test measures that first (a short warm-up under the same
load). It asserts that no step is dropped at all; only when steps were dropped AND the warm-up
showed the machine too slow for 16 sessions does it report the shortfall as an expected failure
(everything else still asserted) and prove the no-drop promise with the number of sessions this
machine does keep up with.

Knobs (environment): HERTZ_SOAK_MODEL (default: the project's `default` model when it is
downloaded, else the tiny test model), HERTZ_SOAK_DEVICE (cpu), HERTZ_SOAK_SESSIONS (16),
HERTZ_SOAK_SECONDS (60). On a GPU server: HERTZ_SOAK_MODEL=hertz-dev HERTZ_SOAK_DEVICE=cuda.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hertz_agents.remote.client import ReconnectPolicy, RemoteEngine
from hertz_agents.remote.loadtest import SessionLoad, report, run_load
from hertz_agents.timing import STEP_SECONDS

TOKEN = "soak-token-0123456789abcdef"
SESSIONS = int(os.environ.get("HERTZ_SOAK_SESSIONS", "16"))
SECONDS = float(os.environ.get("HERTZ_SOAK_SECONDS", "60"))
DEVICE = os.environ.get("HERTZ_SOAK_DEVICE", "cpu")
KEEPS_UP_RTF = (
    0.7  # median tick / 125 ms under the warm-up load: below this, 16 sessions are real time
)
REPO = Path(__file__).resolve().parents[1]


def _model(tiny_model_dir) -> str:
    chosen = os.environ.get("HERTZ_SOAK_MODEL")
    if chosen:
        return chosen
    from hertz_agents.checkpoint import resolve_model_dir

    directory, _ = resolve_model_dir("default")
    return (
        "default" if directory.is_dir() and any(directory.glob("*.json")) else str(tiny_model_dir)
    )


def _rss_mb(pid: int) -> float:
    """The memory of the server's processes: the front end, its engine process and helpers."""
    status = Path(f"/proc/{pid}/status").read_text()
    kb = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            kb += int(_rss_mb(int(child)) * 1024)
    return kb / 1024


@pytest.fixture(scope="module")
def server_process(tiny_model_dir):
    env = {**os.environ, "HERTZ_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hertz_agents.server",
            "--model",
            _model(tiny_model_dir),
            "--device",
            DEVICE,
            "--port",
            "0",
            "--max-sessions",
            str(max(SESSIONS, 1)),
            "--drain-timeout",
            "5",
            "--max-input-backlog",
            "8",  # 1 s: rides out the hiccups of a shared CI machine
            # All the soak's clients are 127.0.0.1 and open 2 x 16 sessions within seconds: the
            # per-address start rate is off here (it is proven in test_server_limits*.py).
            "--starts-per-second",
            "0",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    port = None
    lines: list[str] = []
    while port is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        port = int(found.group(1)) if found else None
    assert port is not None, "the server did not start:\n" + "".join(lines)
    proc.port = port  # type: ignore[attr-defined]
    yield proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


async def _metric(port: int, name: str) -> float:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
        ) as r:
            text = await r.text()
    return float(
        next(line.split()[-1] for line in text.splitlines() if line.startswith(name + " "))
    )


def _window_latency(loads: list[SessionLoad], first: bool, steps: int) -> float:
    """Median latency of the answers to the first (or last) ``steps`` inputs of each session."""
    values = []
    for load in loads:
        cut = len(load.sent) - steps
        values += [
            lat
            for k, lat in zip(load.answered, load.latency_ms)
            if (k < steps if first else k >= cut)
        ]
    return float(np.median(values)) if values else float("nan")


@pytest.mark.timeout(400)
async def test_sixteen_remote_sessions_for_a_minute(server_process):
    port = server_process.port
    remote = await RemoteEngine.connect(
        f"hertz://127.0.0.1:{port}?token={TOKEN}", reconnect=ReconnectPolicy(attempts=0)
    )

    # Warm-up under the soak's own load: allocator pools fill, and the machine's speed is measured.
    warm = report(await run_load(remote, SESSIONS, 4.0, seed=100))
    assert warm["accounted"] and warm["all_in_order_once"] and not warm["errors"], warm
    rtf = await _metric(port, "hertz_real_time_factor")

    rss: list[tuple[float, float]] = []

    async def sample_rss() -> None:
        start = time.monotonic()
        while True:
            rss.append((time.monotonic() - start, _rss_mb(server_process.pid)))
            await asyncio.sleep(2.0)

    sampler = asyncio.create_task(sample_rss())
    loads = await run_load(remote, SESSIONS, SECONDS, seed=1)
    sampler.cancel()
    # RSS wanders by +-20 MB with the allocator; a leak of 3 kB a step would add 20 MB a minute.
    third = SECONDS / 3
    rss_before = float(np.median([mb for t, mb in rss if t < third]))
    rss_after = float(np.median([mb for t, mb in rss if t > 2 * third]))
    result = report(loads)
    window = int(10 / STEP_SECONDS)
    early, late = _window_latency(loads, True, window), _window_latency(loads, False, window)
    print(
        f"\nsoak: {SESSIONS} sessions x {SECONDS:.0f} s, warm-up RTF {rtf:.2f}, "
        f"RSS median first/last third {rss_before:.1f}/{rss_after:.1f} MB, "
        f"latency median first/last 10 s {early:.0f}/{late:.0f} ms\n{result}"
    )

    # Whatever the machine's speed: nothing lost unaccounted, nothing duplicated or reordered.
    assert result["errors"] == [] and result["unmatched_outputs"] == 0
    assert result["sent"] == SESSIONS * int(round(SECONDS / STEP_SECONDS))
    assert result["all_in_order_once"] and result["accounted"], result
    # No growth of memory: the last third of the minute against the first.
    assert rss_after - rss_before < 20, rss
    assert await _metric(port, "hertz_sessions_max") == SESSIONS

    # Drops are excused only where the machine measurably cannot step this many sessions in real
    # time; when nothing was dropped the promise held, whatever the margin.
    if (result["dropped"] or result["missing"]) and rtf > KEEPS_UP_RTF:
        pytest.xfail(
            f"this machine is too slow for {SESSIONS} real-time sessions of this model: "
            "a batched step takes "
            f"{rtf * STEP_SECONDS * 1000:.0f} ms of the 125 ms budget (RTF {rtf:.2f}); "
            f"{result['dropped']} of {result['sent']} steps were dropped, every one accounted for. "
            "test_no_step_is_dropped_at_this_machines_capacity checks the no-drop promise "
            "at a load it serves"
        )
    assert result["missing"] == 0 and result["dropped"] == 0, result
    # No drift: the answers at the end come as fast as at the start. (An engine that cannot keep
    # up queues steps before it drops them, so this holds only where the check above did.)
    assert late <= max(1.5 * early, early + 150), (early, late)


@pytest.mark.timeout(120)
async def test_no_step_is_dropped_at_this_machines_capacity(server_process):
    """One output per input, none dropped, with as many sessions as this machine keeps up with."""
    port = server_process.port
    remote = await RemoteEngine.connect(
        f"hertz://127.0.0.1:{port}?token={TOKEN}", reconnect=ReconnectPolicy(attempts=0)
    )
    rtf = await _metric(
        port, "hertz_real_time_factor"
    )  # measured with SESSIONS sessions by the soak
    if rtf == 0:  # the soak did not run first: measure now
        await run_load(remote, SESSIONS, 4.0, seed=100)
        rtf = await _metric(port, "hertz_real_time_factor")
    sessions = max(1, min(SESSIONS, int(SESSIONS * 0.4 / max(rtf, 1e-3))))
    result = report(await run_load(remote, sessions, 20.0, seed=7))
    print(f"\ncapacity run: {sessions} sessions (RTF {rtf:.2f} at {SESSIONS}): {result}")
    assert result["errors"] == [] and result["all_in_order_once"], result
    assert result["missing"] == 0 and result["dropped"] == 0, result


def test_sigterm_drains_and_exits_cleanly(server_process):
    server_process.send_signal(signal.SIGTERM)
    out, _ = server_process.communicate(timeout=30)
    assert server_process.returncode == 0, out
    assert "stopped" in out
