"""The browser example with ``-t daily``: Pipecat's ``DailyTransport`` (daily-python) in the bot.

A Daily room cannot be reached from a test (Daily's servers are on the internet), so this is the
part of a Daily call that can run here: the runner's ``DailyRunnerArguments`` go through the
example's ``bot()``, which builds the real ``DailyTransport`` with the example's parameters and
tries to join. The join fails, as it would for a wrong or expired room URL, and the call must
end with that reason instead of the model talking into a room nobody is in.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import time
from pathlib import Path

import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)
pytest.importorskip("daily", reason="-t daily needs `pip install 'pipecat-hertz[daily]'`")

from loguru import logger  # noqa: E402
from pipecat.runner.types import DailyRunnerArguments  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_webrtc_bot.py"
UNREACHABLE_ROOM = "http://127.0.0.1:9/hertz-test-room"  # the discard port: nothing answers


def load_example():
    spec = importlib.util.spec_from_file_location(EXAMPLE.stem, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_daily_room_that_cannot_be_joined_ends_the_call_with_the_reason(tiny_model_dir):
    bot = load_example()
    runner_args = DailyRunnerArguments(room_url=UNREACHABLE_ROOM, token=None)
    runner_args.cli_args = argparse.Namespace(
        model=str(tiny_model_dir), prompt=None, gate_db=None, record_dir=None
    )
    runner_args.handle_sigint = False
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="INFO")
    started = time.monotonic()
    try:
        # daily-python gives up on the room after about 20 s; without the fix the call ran on.
        await asyncio.wait_for(bot.bot(runner_args), 75)
    finally:
        logger.remove(sink)
    took = time.monotonic() - started
    ending = [line for line in lines if "ending the call" in line]
    assert ending, "the call did not end with a reason:\n" + "".join(lines[-20:])
    assert "Error joining" in ending[0] and UNREACHABLE_ROOM in ending[0], ending[0]
    print(f"\nthe call ended {took:.1f} s after it started: {ending[0].strip()[:160]}")
