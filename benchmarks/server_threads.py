"""The server's engine with different torch thread counts, under the soak's load, side by side.

Each round starts ``python -m hertz_agents.server`` once per thread count (alternating, so machine
noise hits them alike), runs N real-time remote sessions for a warm-up and then a measured
stretch from this process (as ``tests/test_server_soak.py`` does), and reads the server's own
``hertz_real_time_factor`` (median tick over 125 ms). Reported per setting: the medians over rounds
of that factor, of the steps dropped and of the callers' median and p90 latency.

    python benchmarks/server_threads.py --threads 1 2 --sessions 16 --seconds 12 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from hertz_agents.remote.client import ReconnectPolicy, RemoteEngine
from hertz_agents.remote.loadtest import report, run_load

REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token-0123456789abcdef"


def start_server(
    model: str, threads: int, sessions: int, log: Path
) -> tuple[subprocess.Popen, int]:
    """The server in its own process with ``--threads threads``, output to ``log``; (it, port)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "hertz_agents.server", "--model", model, "--device", "cpu",
         "--port", "0", "--token", TOKEN, "--max-sessions", str(sessions),
         "--threads", str(threads), "--drain-timeout", "1",
         # as the soak: one client address opens all the sessions, backlog of 1 s
         "--starts-per-second", "0", "--max-input-backlog", "8"],
        stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip
    while proc.poll() is None:
        if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text()):
            return proc, int(m.group(1))
        time.sleep(0.2)
    raise SystemExit(f"the server did not start (exit {proc.returncode}):\n{log.read_text()}")


def real_time_factor(port: int) -> float:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    text = urllib.request.urlopen(request, timeout=10).read().decode()
    return float(re.search(r"^hertz_real_time_factor (\S+)", text, re.M).group(1))


async def one_round(port: int, sessions: int, seconds: float) -> dict[str, float]:
    remote = await RemoteEngine.connect(
        f"hertz://127.0.0.1:{port}?token={TOKEN}", reconnect=ReconnectPolicy(attempts=0)
    )
    try:
        await run_load(remote, sessions, 4.0, seed=100)  # warm-up: allocator pools, caches
        result = report(await run_load(remote, sessions, seconds, seed=1))
    finally:
        remote.close()
    return {
        "rtf": real_time_factor(port),
        "dropped": result["dropped"] + result["missing"],
        "sent": result["sent"],
        "latency_ms_p50": result["latency_ms_p50"],
        "latency_ms_p90": result["latency_ms_p90"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    rounds: dict[int, list[dict[str, float]]] = {t: [] for t in args.threads}
    log = Path(tempfile.mkdtemp()) / "server.log"
    for r in range(args.rounds):
        for threads in args.threads:
            proc, port = start_server(args.model, threads, args.sessions, log)
            try:
                figures = asyncio.run(one_round(port, args.sessions, args.seconds))
            finally:
                proc.terminate()
                proc.wait(30)
            rounds[threads].append(figures)
            print(f"round {r + 1}, --threads {threads}: {figures}", flush=True)

    summary = {
        threads: {key: statistics.median(f[key] for f in figures) for key in figures[0]}
        for threads, figures in rounds.items()
    }
    print(f"\n{args.sessions} sessions, {args.seconds:g} s, medians of {args.rounds} rounds:")
    for threads, s in summary.items():
        print(
            f"  --threads {threads}: RTF {s['rtf']:.2f}, dropped {s['dropped']:.0f} of "
            f"{s['sent']:.0f}, latency p50 {s['latency_ms_p50']:.0f} ms, "
            f"p90 {s['latency_ms_p90']:.0f} ms"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=2))


if __name__ == "__main__":
    main()
