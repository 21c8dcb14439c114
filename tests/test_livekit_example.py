"""examples/livekit_agent.py as a worker definition: one engine per worker, loaded in prewarm,
calls batched in job threads, and a load that tells LiveKit's dispatcher when the worker is full.
The worker running for real is tested in test_livekit_console.py."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT / "adapters" / "livekit"))

from livekit.agents import JobExecutorType, JobProcess  # noqa: E402
from livekit.plugins import hertz  # noqa: E402

from hertz_agents.engine import loaded_engines  # noqa: E402


def import_example(monkeypatch, **env: str):
    for name in (
        "HERTZ_MODEL",
        "HERTZ_AGENT_NAME",
        "HERTZ_SILENCE_RMS",
        "HERTZ_MAX_SESSIONS",
        "HERTZ_LIVEKIT_IO",
        "HERTZ_EXECUTOR",
        "HERTZ_PREBUFFER",
        "HERTZ_HTTP_PORT",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["livekit_agent.py"])
    spec = importlib.util.spec_from_file_location(
        "livekit_agent_under_test", ROOT / "examples" / "livekit_agent.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_worker_runs_calls_in_threads_and_reports_engine_slots_as_its_load(monkeypatch):
    example = import_example(monkeypatch)
    server = example.server
    assert server._job_executor_type == JobExecutorType.THREAD  # every call in this process
    assert isinstance(server.load_fnc, hertz.WorkerLoad)
    assert server._load_threshold == 1.0  # full when every engine slot is taken
    assert server.setup_fnc is example.load_model
    assert server._agent_name == ""  # automatic dispatch: joins every new room


def test_a_remote_engine_runs_calls_in_processes_unless_told_otherwise(monkeypatch):
    # no weights to share in this process: separate job processes isolate the calls
    remote = import_example(monkeypatch, HERTZ_MODEL="hertz://gpu-1:8000")
    assert remote.server._job_executor_type == JobExecutorType.PROCESS
    assert remote.server.load_fnc._remote == "hertz://gpu-1:8000"  # the server tells its load
    threads = import_example(monkeypatch, HERTZ_MODEL="hertz://gpu-1:8000", HERTZ_EXECUTOR="thread")
    assert threads.server._job_executor_type == JobExecutorType.THREAD


def test_flags_become_settings_and_the_rest_is_left_for_livekit(monkeypatch):
    example = import_example(monkeypatch)
    for name in ("HERTZ_MODEL", "HERTZ_AGENT_NAME"):  # so the test's changes are undone after it
        monkeypatch.setenv(name, "")
    rest = example.read_flags(
        ["--model", "/ckpt/x", "--agent-name", "hertz", "start", "--log-level", "debug"]
    )
    assert rest == ["start", "--log-level", "debug"]
    assert os.environ["HERTZ_MODEL"] == "/ckpt/x" and os.environ["HERTZ_AGENT_NAME"] == "hertz"
    assert import_example(monkeypatch, HERTZ_AGENT_NAME="hertz").server._agent_name == "hertz"


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--prebuffer", "abc"), ("--prebuffer", "-1"), ("--max-sessions", "0"), ("--http-port", "x")],
)
def test_a_bad_number_stops_the_worker_at_startup_and_says_which(flag, value):
    # before this check, --prebuffer abc started a worker whose every call failed in prewarm
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "livekit_agent.py"), flag, value, "start"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LIVEKIT_URL": "ws://127.0.0.1:9"},  # never reached
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{flag} must be" in done.stderr and repr(value) in done.stderr


async def test_prewarm_in_every_job_thread_shares_one_engine_and_one_gate_measurement(
    monkeypatch, tiny_model_dir
):
    example = import_example(monkeypatch, HERTZ_MODEL=str(tiny_model_dir))
    procs = [
        JobProcess(executor_type=JobExecutorType.THREAD, user_arguments=None, http_proxy=None)
        for _ in range(3)
    ]
    threads = [threading.Thread(target=example.load_model, args=(p,)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    models = [p.userdata["hertz"] for p in procs]
    assert len({id(m.engine) for m in models}) == 1, "each job thread loaded its own weights"
    assert models[0].engine in loaded_engines()
    quiet = models[0]._opts.gate.silence_rms
    assert quiet is not None and all(m._opts.gate.silence_rms == quiet for m in models)

    # calls from the three job threads fill the one engine, and the worker's load says so
    engine = models[0].engine
    before = example.server.load_fnc(example.server)
    sessions = [m.session() for m in models]
    assert all(await asyncio.gather(*(s.wait_open() for s in sessions)))
    assert example.server.load_fnc(example.server) == pytest.approx(
        before + 3 / engine.max_sessions
    )
    for s in sessions:
        await s.aclose()
