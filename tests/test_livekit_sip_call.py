"""A real phone call into the example worker: baresip dials LiveKit SIP, which puts it in a room.

``scripts/livekit_dev_stack start`` runs the LiveKit server, Redis and LiveKit SIP on 127.0.0.1
(CI does it in .ci/run); ``scripts/livekit_sip_dispatch.py`` creates the inbound trunk and the
dispatch rule, as a user would. The caller is baresip (Debian's ``baresip-core``), a real SIP
user agent: it offers only G.711 mu-law (8 kHz, what the telephone network carries), plays real
speech from ../shared/audio as its microphone (``aufile``) and dumps what it sends and hears to
WAV files (``sndfile``); the test drives it over its TCP control socket (``ctrl_tcp``). The model
is the echo engine of ``livekit_room_support``, so what the phone hears can be matched to what it
said: audio went both ways, through the 8 kHz call leg, and the model heard the caller.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from livekit import api
from livekit_room_support import (
    ROOT,
    SPEECH,
    LiveKit,
    Worker,
    echo_server,
    envelope_delays,
    livekit_server,  # noqa: F401 - a fixture
    room_name,
)

pytestmark = pytest.mark.livekit_server

PHONE_RATE = 8_000  # G.711: what a phone call carries
SAY_S = 6.0  # about a dozen half-overlapping one-second windows of speech
MAX_DELAY_S = 2.0


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing(message: str) -> None:
    """Under CI a missing part fails the test (CI installs and starts all of them); else skip."""
    if _in_ci():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def sip_addr(livekit_server) -> tuple[str, int]:  # noqa: F811 - the fixture
    """LiveKit SIP's signalling address, from the env or the running dev stack."""
    addr = os.environ.get("HERTZ_LIVEKIT_SIP_ADDR")
    if not addr:
        result = subprocess.run(
            [str(ROOT / "scripts" / "livekit_dev_stack"), "env"],
            capture_output=True,
            text=True,
            check=False,
        )
        for word in result.stdout.split():
            if word.startswith("HERTZ_LIVEKIT_SIP_ADDR="):
                addr = word.partition("=")[2]
    if not addr:
        _missing("no LiveKit SIP: scripts/livekit_dev_stack start builds and starts it")
    if shutil.which("baresip") is None:
        _missing("no SIP caller: apt-get install baresip-core (scripts/setup does)")
    host, _, port = addr.rpartition(":")
    return host, int(port)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _netstring(text: str) -> bytes:
    data = text.encode()
    return b"%d:%s," % (len(data), data)


@dataclass
class Phone:
    """baresip as a phone: dials, talks from a WAV, records what it hears, hangs up."""

    workdir: Path
    say: Path  # 8 kHz mono 16-bit WAV played as the microphone from the moment the call opens
    events: list[dict] = field(default_factory=list)

    async def start(self) -> Phone:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ctrl = _free_port()
        (self.workdir / "config").write_text(
            "\n".join(
                [
                    "poll_method epoll",
                    "net_interface 127.0.0.1",  # its SDP and RTP on loopback too
                    f"sip_listen 127.0.0.1:{_free_port()}",
                    f"audio_source aufile,{self.say}",
                    "audio_player alsa,null",  # nothing to play on: sndfile records the audio
                    "audio_alert alsa,null",
                    f"ausrc_srate {PHONE_RATE}",
                    f"auplay_srate {PHONE_RATE}",
                    "ausrc_channels 1",
                    "auplay_channels 1",
                    "module_path /usr/lib/baresip/modules",
                    "module g711.so",
                    "module aufile.so",
                    "module alsa.so",
                    "module sndfile.so",
                    "module_app account.so",
                    "module_app menu.so",
                    "module_app ctrl_tcp.so",
                    f"snd_path {self.workdir}",
                    f"ctrl_tcp_listen 127.0.0.1:{ctrl}",
                    "",
                ]
            )
        )
        # regint=0: no registration, a trunk-style caller; G.711 mu-law only, as on the PSTN
        (self.workdir / "accounts").write_text(
            "<sip:+15550199@127.0.0.1>;regint=0;audio_codecs=PCMU\n"
        )
        self._log = (self.workdir / "baresip.log").open("w")
        self.proc = await asyncio.create_subprocess_exec(
            "baresip", "-f", str(self.workdir), stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                self._reader, self._writer = await asyncio.open_connection("127.0.0.1", ctrl)
                break
            except OSError:
                started = self.proc.returncode is None and time.monotonic() < deadline
                assert started, f"baresip did not start:\n{self.log()}"
                await asyncio.sleep(0.1)
        self._reading = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        buffer = b""
        while data := await self._reader.read(4096):
            buffer += data
            while b":" in buffer:
                size, _, rest = buffer.partition(b":")
                if len(rest) < int(size) + 1:
                    break
                self.events.append(json.loads(rest[: int(size)]))
                buffer = rest[int(size) + 1 :]

    async def command(self, command: str, params: str = "") -> None:
        self._writer.write(_netstring(json.dumps({"command": command, "params": params})))
        await self._writer.drain()

    def happened(self, kind: str) -> dict | None:
        return next((e for e in self.events if e.get("type") == kind), None)

    async def wait_for(self, kind: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while (event := self.happened(kind)) is None:
            assert time.monotonic() < deadline, f"no {kind} in {timeout} s:\n{self.log()[-3000:]}"
            await asyncio.sleep(0.05)
        return event

    def log(self) -> str:
        return (self.workdir / "baresip.log").read_text(errors="replace")

    def dump(self, direction: str) -> np.ndarray:
        """What the phone sent (``enc``) or heard (``dec``), at 8 kHz."""
        (path,) = self.workdir.glob(f"dump-*-{direction}.wav")
        audio, rate = sf.read(path, dtype="float32")
        assert rate == PHONE_RATE, f"{direction} ran at {rate} Hz"
        return audio

    async def stop(self) -> None:
        with suppress(AttributeError):
            self._reading.cancel()
            self._writer.close()
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=5)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self._log.close()


def _phone_speech(path: Path, seconds: float, total: float) -> np.ndarray:
    """Real speech then silence, as an 8 kHz WAV for aufile (which ends the call at its end)."""
    audio, rate = sf.read(SPEECH, dtype="float32", always_2d=True)
    talk = soxr.resample(audio[:, 0], rate, PHONE_RATE)[: int(seconds * PHONE_RATE)]
    out = np.zeros(int(total * PHONE_RATE), np.float32)
    out[: len(talk)] = talk
    sf.write(path, out, PHONE_RATE, subtype="PCM_16")
    return talk


async def _dispatch(livekit: LiveKit, agent: str, number: str, monkeypatch) -> None:
    """The inbound trunk and the dispatch rule, made by the project's script."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "livekit_sip_dispatch", ROOT / "scripts" / "livekit_sip_dispatch.py"
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for name, value in livekit.env().items():
        monkeypatch.setenv(name, value)
    args = script.parse_args(["--agent-name", agent, "--number", number, "--name", agent])
    assert await script.run(args) == 0


async def _undispatch(livekit: LiveKit, agent: str) -> None:
    async with livekit.api() as lkapi:
        for rule in (await lkapi.sip.list_dispatch_rule(api.ListSIPDispatchRuleRequest())).items:
            if rule.name == agent:
                await lkapi.sip.delete_dispatch_rule(
                    api.DeleteSIPDispatchRuleRequest(sip_dispatch_rule_id=rule.sip_dispatch_rule_id)
                )
        for trunk in (await lkapi.sip.list_inbound_trunk(api.ListSIPInboundTrunkRequest())).items:
            if trunk.name == f"{agent} trunk":
                await lkapi.sip.delete_trunk(
                    api.DeleteSIPTrunkRequest(sip_trunk_id=trunk.sip_trunk_id)
                )


async def _wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.1)


@pytest.fixture
async def phone_line(livekit_server, sip_addr, monkeypatch):  # noqa: F811 - the fixture
    """(agent name, SIP URI to dial): a number routed to the named agent; removed afterwards."""
    agent = room_name("hertz")
    number = f"+1555{uuid.uuid4().int % 10**7:07d}"
    await _dispatch(livekit_server, agent, number, monkeypatch)
    try:
        yield agent, f"sip:{number}@{sip_addr[0]}:{sip_addr[1]}"
    finally:
        await _undispatch(livekit_server, agent)


async def test_a_phone_call_is_answered_heard_both_ways_and_hanging_up_frees_the_slot(
    livekit_server,  # noqa: F811 - the fixture
    phone_line,
    tiny_model_dir,
    tmp_path,
):
    agent, uri = phone_line
    talk = _phone_speech(tmp_path / "say.wav", SAY_S, total=60.0)
    async with echo_server(tiny_model_dir) as (url, engine, _):
        worker = Worker(
            livekit_server,
            tmp_path / "worker.log",
            "--model",
            url,
            "--agent-name",
            agent,
            "--silence-rms",
            "0.001",
            "--record-dir",
            str(tmp_path / "calls"),
        )
        async with worker:
            phone = await Phone(tmp_path / "phone", tmp_path / "say.wav").start()
            try:
                dialled = time.monotonic()
                await phone.command("dial", uri)
                established = await phone.wait_for("CALL_ESTABLISHED", timeout=30)
                opened = time.monotonic()
                # the agent joins the caller's room and takes an engine slot
                await _wait_until(lambda: engine.active_sessions == 1, 30, "no agent took the call")
                agent_s = time.monotonic() - dialled
                await asyncio.sleep(max(0.0, opened + SAY_S + 3.0 - time.monotonic()))
                await phone.command("hangup")
                await phone.wait_for("CALL_CLOSED", timeout=10)
                # the job ends and the engine slot is free again
                await _wait_until(lambda: engine.active_sessions == 0, 20, "the slot stayed taken")
            finally:
                await phone.stop()
        log = worker.log()
    assert "Traceback" not in log, log[-3000:]

    # G.711 mu-law both ways: the 8 kHz leg a phone call has
    phone_log = phone.log()
    for direction in ("encoder", "decoder"):
        assert f"Set audio {direction}: PCMU 8000Hz" in phone_log, phone_log[-3000:]
    sent, heard = phone.dump("enc"), phone.dump("dec")
    assert np.sqrt(np.mean(sent[: len(talk)] ** 2)) > 0.01, "the phone sent no speech"
    # an echo comes back later, within a plausible delay: unrelated speech (tried: the same
    # speaker 10 and 20 s on, the recording reversed) matches at most 3 windows at random lags
    found = envelope_delays(sent[: int((SAY_S + 1) * PHONE_RATE)], heard, PHONE_RATE)
    delays = [d for d in found if 0.0 < d < MAX_DELAY_S]
    level = 20 * np.log10(np.sqrt(np.mean(heard**2)) + 1e-12)
    print(
        f"\nphone call ({established.get('param', '')}): answered {(opened - dialled):.1f} s "
        f"and the agent's session open {agent_s:.1f} s after dialling; heard "
        f"{len(heard) / PHONE_RATE:.1f} s at {level:.0f} dBFS; {len(delays)} windows of the "
        f"phone's speech found in it, median {np.median(delays or [0]) * 1000:.0f} ms later"
    )
    # the phone heard the model's audio, and it was the phone's own speech: the model heard it
    assert level > -40, "the phone heard silence"
    assert len(delays) >= 6, f"too little of the phone's speech came back: {found}"
    # the call recording the worker wrote: the caller's channel holds the phone's speech
    (recording,) = (tmp_path / "calls").glob("*.wav")
    call, _ = sf.read(recording, dtype="float32", always_2d=True)
    assert np.sqrt(np.mean(call[:, 0] ** 2)) > 0.01, "the model's input was silent"


async def test_an_engine_that_fails_mid_call_hangs_the_phone_up(
    livekit_server,  # noqa: F811 - the fixture
    phone_line,
    tiny_model_dir,
    tmp_path,
):
    agent, uri = phone_line
    _phone_speech(tmp_path / "say.wav", 2.0, total=60.0)
    async with echo_server(tiny_model_dir) as (url, engine, _):
        worker = Worker(
            livekit_server,
            tmp_path / "worker.log",
            "--model",
            url,
            "--agent-name",
            agent,
            "--silence-rms",
            "0.001",
        )
        async with worker:
            phone = await Phone(tmp_path / "phone", tmp_path / "say.wav").start()
            try:
                await phone.command("dial", uri)
                await phone.wait_for("CALL_ESTABLISHED", timeout=30)
                await _wait_until(lambda: engine.active_sessions == 1, 30, "no agent took the call")
                await asyncio.sleep(2.0)
                engine.close()  # the GPU server's engine dies (a fault, a restart)
                failed = time.monotonic()
                # the agent ends the room and LiveKit SIP hangs the phone up: no silent line
                closed = await phone.wait_for("CALL_CLOSED", timeout=30)
                hung_up_s = time.monotonic() - failed
            finally:
                await phone.stop()
            log = worker.log()
    print(f"\nthe phone was hung up {hung_up_s:.1f} s after the failure: {closed.get('param')}")
    # the far end hung up (a BYE from LiveKit SIP), not the phone itself
    assert "terminate call" not in phone.log(), phone.log()[-3000:]
    assert "hertz-dev" in log and "Traceback" not in log, log[-3000:]
