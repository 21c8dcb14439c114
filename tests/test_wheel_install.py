"""Install like a user: the built wheels in a fresh virtualenv outside the checkout, no network.

``scripts/build_dists`` builds every wheel; they go into a new virtualenv in a temporary folder,
and from a working directory outside the checkout (no PYTHONPATH, HF_HUB_OFFLINE=1) the test runs
``hertz-agents generate`` on the default model, a Pipecat pipeline through ``run_test``, the
LiveKit plugin's ``DuplexModel.load()``, and ``hertz-agents serve`` with a remote
``DuplexSession``.

What is not installed from scratch, and why (see :mod:`user_install`): torch. The new virtualenv
sees the machine's pinned torch (the one ``scripts/setup`` installed) through a folder of links
to it and its own dependencies, as a user who installed torch first would have it; copying
several GB of CUDA wheels per run would add minutes. Every other dependency is installed with
``pip install --no-index`` from a wheelhouse cached in ``~/.cache/hertz-agents/wheelhouse``,
which is filled from the package registry only when a wheel is missing from it.
"""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from user_install import UserInstall, install_like_a_user

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> UserInstall:
    return install_like_a_user(tmp_path_factory.mktemp("user-install"))


def test_the_install_is_the_wheels_not_the_checkout(user: UserInstall):
    code = (
        "import json, hertz_agents, hertz_agents_small, pipecat_hertz\n"
        "from livekit.plugins import hertz\n"
        "modules = (hertz_agents, hertz_agents_small, pipecat_hertz, hertz)\n"
        "print(json.dumps([m.__file__ for m in modules]))\n"
    )
    files = json.loads(user.python(code).stdout)
    assert all(f.startswith(str(user.site_packages)) for f in files), files
    checkout = Path(__file__).resolve().parents[1]
    assert checkout not in user.workdir.parents and checkout not in user.venv.parents
    # The core wheel carries neither adapter nor the weights: those come from their own wheels.
    assert not (user.site_packages / "ckpt").exists()
    names = {p.name.split("-")[0] for p in user.site_packages.glob("*.dist-info")}
    assert {"hertz_agents", "hertz_agents_small", "pipecat_hertz", "livekit_plugins_hertz"} <= names


def test_cli_generates_with_the_default_model(user: UserInstall):
    prompt = user.workdir / "prompt.wav"
    rng = np.random.default_rng(0)
    sf.write(prompt, (0.05 * rng.standard_normal((16000, 2))).astype(np.float32), 16000)
    result = user.run(
        [
            "hertz-agents",
            "generate",
            "--prompt",
            str(prompt),
            "--seconds",
            "1",
            "--out",
            "out.wav",
            "--seed",
            "1",
        ]
    )
    audio, rate = sf.read(user.workdir / "out.wav", always_2d=True)
    assert rate == 16000 and audio.shape == (16000, 2), result.stdout
    assert np.isfinite(audio).all() and np.abs(audio).max() > 0


def test_info_says_the_default_model_comes_from_its_package(user: UserInstall):
    out = user.run(["hertz-agents", "info", "--model", "default"]).stdout
    assert re.search(
        rf"^default: {re.escape(str(user.site_packages))}\S*hertz-small "
        r"\(the hertz-agents-small package\)",
        out,
        re.M,
    ), out
    assert "two-channel" in out


def test_pipecat_pipeline_runs_through_run_test(user: UserInstall):
    script = textwrap.dedent("""
        import asyncio

        import numpy as np
        from pipecat.frames.frames import InputAudioRawFrame, OutputAudioRawFrame
        from pipecat.tests.utils import SleepFrame, run_test
        from pipecat_hertz import HertzDuplexService

        async def main():
            rate, frame = 16000, 320  # 20 ms frames
            t = np.arange(frame * 75) / rate
            pcm = (3000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
            frames = []
            for i in range(0, len(pcm), frame):
                chunk = pcm[i:i + frame].tobytes()
                frames += [InputAudioRawFrame(chunk, rate, 1), SleepFrame(0.02)]
            down, _ = await run_test(HertzDuplexService(model="default"), frames_to_send=frames,
                                     start_timeout=120)
            audio = [f for f in down if isinstance(f, OutputAudioRawFrame)]
            print("model audio frames:", len(audio), sum(f.num_frames for f in audio))

        asyncio.run(main())
    """)
    out = user.python(script).stdout
    frames, samples = map(int, re.search(r"model audio frames: (\d+) (\d+)", out).groups())
    assert frames > 0 and samples > 0, out


def test_livekit_plugin_loads_the_default_model(user: UserInstall):
    out = user.python(
        "from livekit.plugins import hertz\n"
        "model = hertz.DuplexModel.load()\n"
        "print('loaded', type(model).__name__)\n"
    ).stdout
    assert "loaded DuplexModel" in out


def test_server_serves_a_remote_duplex_session(user: UserInstall):
    server = subprocess.Popen(
        [
            str(user.bin / "hertz-agents"),
            "serve",
            "--model",
            "default",
            "--port",
            "0",
            "--max-sessions",
            "2",
        ],
        cwd=user.workdir,
        env=user.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = None
        lines = []
        for line in server.stdout:  # the server prints its address once it listens
            lines.append(line)
            found = re.search(r"hertz://[\w.]+:\d+", line)
            if found:
                url = found.group(0)
                break
        assert url, "".join(lines)
        script = textwrap.dedent(f"""
            import asyncio

            import numpy as np
            from hertz_agents import DuplexSession

            async def main():
                session = await DuplexSession.open("{url}", output_sample_rate=16000)
                chunks = []
                async with session:
                    silence = np.zeros(2000, dtype=np.float32)
                    for _ in range(6):
                        await session.push_audio(silence, sample_rate=16000)
                    async for chunk in session:
                        chunks.append(chunk.audio)
                        if len(chunks) == 4:
                            break
                print("remote chunks:", len(chunks), sum(len(c) for c in chunks))

            asyncio.run(main())
        """)
        out = user.python(script).stdout
        count, samples = map(int, re.search(r"remote chunks: (\d+) (\d+)", out).groups())
        assert count == 4 and samples == 4 * 2000, out
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
