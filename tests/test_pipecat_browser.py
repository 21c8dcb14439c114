"""A real browser talks to the WebRTC example: headless Chromium, its microphone fed from a WAV.

The example runs as a user would run it (a subprocess under Pipecat's development runner,
``-t webrtc``, the tiny model via --model, and the gate off: the tiny model's output is noise at
its quiet level, which the gate would silence). Chromium opens the demo page with
?autoconnect=1; its fake microphone plays a 523 Hz tone in bursts. The test reads the page's
WebRTC statistics through the DevTools protocol (the browser received the bot's audio), what the
page says about the model, and the bot's call recording (the bot heard the browser's tone).

Needs Debian's ``chromium`` (``apt-get install -y chromium``); skipped without it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "pipecat", reason="the Pipecat adapter needs `pip install 'hertz-agents[pipecat]'`"
)
websockets = pytest.importorskip(
    "websockets", reason="the browser test needs `pip install websockets`"
)

import soundfile as sf  # noqa: E402
from test_pipecat_support import free_port  # noqa: E402

from hertz_agents.timing import SAMPLE_RATE  # noqa: E402

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pipecat_webrtc_bot.py"
TONE_HZ = 523.0
CALL_S = 4.0

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Chromium is not installed (apt-get install -y chromium)"
)


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def list_pages(port: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as response:
        return [t for t in json.load(response) if t["type"] == "page"]


class DevTools:
    """Just enough of the Chrome DevTools protocol to evaluate JavaScript in the page."""

    def __init__(self, profile: Path) -> None:
        self.profile, self.ws, self.next_id = profile, None, 0

    async def connect(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        port_file = self.profile / "DevToolsActivePort"
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        while True:
            pages = await asyncio.to_thread(list_pages, port)
            if pages:
                break
            assert time.monotonic() < deadline, "Chromium opened no page"
            await asyncio.sleep(0.1)
        self.ws = await websockets.connect(pages[0]["webSocketDebuggerUrl"], max_size=None)

    async def evaluate(self, expression: str):
        self.next_id += 1
        await self.ws.send(
            json.dumps(
                {
                    "id": self.next_id,
                    "method": "Runtime.evaluate",
                    "params": {
                        "expression": expression,
                        "awaitPromise": True,
                        "returnByValue": True,
                    },
                }
            )
        )
        while True:
            reply = json.loads(await self.ws.recv())
            if reply.get("id") == self.next_id:
                result = reply["result"]
                assert "exceptionDetails" not in result, result["exceptionDetails"]
                return result["result"].get("value")


def tone_wav(path: Path) -> Path:
    rate = 48000
    t = np.arange(3 * rate) / rate
    bursts = (np.sin(2 * np.pi * 1.5 * t) > -0.3).astype(np.float64)  # on 60% of the time
    sf.write(
        path,
        (0.3 * np.sin(2 * np.pi * TONE_HZ * t) * bursts).astype(np.float32),
        rate,
        subtype="PCM_16",
    )
    return path


async def talk(profile: Path) -> tuple[dict, dict]:
    """Wait for the page to connect, let the call run, hang up; the page's inbound audio stats
    at the start and at the end of the call."""
    devtools = DevTools(profile)
    await devtools.connect()
    deadline = time.monotonic() + 30
    while True:
        stats = await devtools.evaluate("window.hertz ? window.hertz.stats() : null")
        if stats and (stats["inbound"] or {}).get("samples"):
            break
        assert time.monotonic() < deadline, f"the page did not connect: {stats}"
        assert (stats or {}).get("status") != "failed", stats
        await asyncio.sleep(0.2)
    await asyncio.sleep(CALL_S)
    shown = await devtools.evaluate("document.getElementById('model').textContent")
    assert stats["model"]["model"] in shown, (shown, stats["model"])  # the page says what talks
    last = (await devtools.evaluate("window.hertz.stats()"))["inbound"]
    await devtools.evaluate("document.getElementById('connect').click()")  # hang up
    await asyncio.sleep(1.0)
    await devtools.ws.close()
    return stats["inbound"], last


def test_chromium_talks_to_the_webrtc_bot(tiny_model_dir, tmp_path):
    port, records, profile = free_port(), tmp_path / "calls", tmp_path / "chromium"
    serve = [
        sys.executable,
        str(EXAMPLE),
        "-t",
        "webrtc",
        "--model",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--record-dir",
        str(records),
        "--gate-db",
        "off",
    ]
    browse = [
        CHROMIUM,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={tone_wav(tmp_path / 'tone.wav')}",
        "--autoplay-policy=no-user-gesture-required",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        f"http://127.0.0.1:{port}/?autoconnect=1",
    ]
    with (
        open(tmp_path / "bot.log", "w") as bot_log,
        open(tmp_path / "chromium.log", "w") as browser_log,
    ):
        bot = subprocess.Popen(serve, stdout=bot_log, stderr=subprocess.STDOUT)
        browser = None
        try:
            wait_http(f"http://127.0.0.1:{port}/api/model", 120)
            browser = subprocess.Popen(browse, stdout=browser_log, stderr=subprocess.STDOUT)
            first, last = asyncio.run(talk(profile))
        finally:
            if browser is not None:
                browser.terminate()
                browser.wait(10)
            bot.send_signal(signal.SIGINT)
            try:
                bot.wait(20)
            except subprocess.TimeoutExpired:
                bot.kill()
    # The browser received the bot's audio: the tiny model talks all the time, at about -20 dBFS.
    received_s = last["duration"] - first["duration"]
    # The mean square of the played audio.
    power = (last["energy"] - first["energy"]) / max(received_s, 1e-9)
    print(
        f"\nbrowser received {received_s:.2f} s of audio in {CALL_S:.1f} s, "
        f"{10 * np.log10(power + 1e-12):.1f} dBFS, "
        f"{last['concealed'] - first['concealed']} samples concealed"
    )
    assert abs(received_s - CALL_S) < 0.5
    assert power > 1e-4, "the browser received silence"
    # The bot heard the browser: its recording's caller channel holds the tone of the fake
    # microphone.
    (recording,) = records.glob("*.wav")
    caller = sf.read(recording, dtype="float32")[0][:, 0]
    assert len(caller) / SAMPLE_RATE >= CALL_S - 0.5
    spectrum = np.abs(np.fft.rfft(caller[SAMPLE_RATE:]))
    peak = np.fft.rfftfreq(len(caller) - SAMPLE_RATE, 1 / SAMPLE_RATE)[spectrum.argmax()]
    assert abs(peak - TONE_HZ) < 5 and np.sqrt(np.mean(caller**2)) > 0.03, (
        peak,
        os.fspath(recording),
    )
