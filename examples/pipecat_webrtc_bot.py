"""Talk to hertz-dev from a browser: a Pipecat bot for Pipecat's development runner.

    pip install pipecat-hertz                               # or, in this repository, scripts/setup
    python examples/pipecat_webrtc_bot.py                   # then open http://localhost:7860
    python examples/pipecat_webrtc_bot.py -t webrtc --model hertz-dev --prompt voice.wav
    python examples/pipecat_webrtc_bot.py -t webrtc --host 0.0.0.0 \\
        --ice-servers stun:stun.l.google.com:19302 '{"urls": "turn:turn.example.com:3478",
        "username": "user", "credential": "pass"}'          # across NAT: STUN, and TURN if needed
    python examples/pipecat_webrtc_bot.py -t daily          # a Daily room: pipecat-ai[daily]

``bot(runner_args)`` is the whole bot; Pipecat's runner (``pipecat.runner.run``) serves it: the
page at ``/`` (``examples/web/index.html``; the runner's prebuilt client stays at ``/client``),
``POST /start`` and the SmallWebRTC signalling at ``/api/offer``, the ICE servers given with
``--ice-servers`` (or ``PIPECAT_ICE_SERVERS``) to the bot's peer connection and, through
``/start``, to the page's. The pipeline is ``transport.input() -> HertzDuplexService ->
transport.output()`` at 16 kHz, the model's rate. The weights load once, before the server accepts
calls; every call opens a cheap session on the shared engine, and concurrent calls are batched.
When the service fails for good (the engine is full, the server is gone) the call ends and the
page shows why.
"""

from __future__ import annotations

from pathlib import Path

from loguru import logger
from pipecat.runner.types import DailyRunnerArguments, RunnerArguments, WebSocketRunnerArguments
from pipecat.runner.utils import create_transport
from pipecat.transports.base_transport import TransportParams
from pipecat_hertz.example_args import BotOptions
from pipecat_hertz.runner import run_bot_main, run_call

PAGE = Path(__file__).parent / "web" / "index.html"


def daily_params():
    from pipecat.transports.daily.transport import DailyParams  # needs pipecat-ai[daily]

    return DailyParams(audio_in_enabled=True, audio_out_enabled=True, audio_out_10ms_chunks=2)


TRANSPORT_PARAMS = {
    "webrtc": lambda: TransportParams(
        audio_in_enabled=True, audio_out_enabled=True, audio_out_10ms_chunks=2
    ),
    "daily": daily_params,
}


async def bot(runner_args: RunnerArguments) -> None:
    """One call, from the browser (SmallWebRTC) or a Daily room."""
    if isinstance(runner_args, WebSocketRunnerArguments):  # the runner serves /ws in every mode
        logger.warning(
            "refused a websocket call: this bot answers browsers; phone calls: pipecat_phone_bot.py"
        )
        await runner_args.websocket.close(code=1008)
        return
    transport = await create_transport(runner_args, TRANSPORT_PARAMS)
    call_id = runner_args.session_id or (
        runner_args.room_url if isinstance(runner_args, DailyRunnerArguments) else ""
    )
    await run_call(transport, BotOptions.from_cli(runner_args.cli_args), call_id=call_id or "call")


if __name__ == "__main__":
    run_bot_main(__doc__.split("\n\n")[0], page=PAGE)
