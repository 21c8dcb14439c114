"""Call hertz-dev on the phone: a Pipecat bot for Twilio Media Streams.

    pip install 'hertz-agents[pipecat]'
    python examples/pipecat_phone_bot.py --model default      # listens on http://localhost:8765
    ngrok http 8765                                           # or any public HTTPS URL to this port

Then, in the Twilio console, open Phone Numbers > Manage > Active numbers > your number, and under
"Voice Configuration" set "A call comes in" to Webhook, ``https://<your-public-host>/twiml``,
HTTP POST. Save and call the number. (docs/pipecat.md has the details.)

Twilio fetches ``/twiml``, which tells it to stream the call to ``wss://<host>/ws``; there, Twilio
sends the caller's audio as 8 kHz mu-law in 20 ms messages and plays whatever audio the bot sends
back. Pipecat's ``TwilioFrameSerializer`` speaks that protocol, ``FastAPIWebsocketTransport``
carries it, and ``HertzDuplexService`` sits in between. The pipeline runs at 16 kHz, the model's
rate: the serializer converts 8 kHz to 16 kHz and back, once each way, and the service converts
nothing (see docs/pipecat.md for the latency budget).

Set ``TWILIO_ACCOUNT_SID`` and ``TWILIO_AUTH_TOKEN`` to let the bot hang up the call when its
pipeline ends; without them the caller hangs up.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any
from xml.sax.saxutils import quoteattr

import uvicorn
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.serializers.twilio import TwilioFrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat.workers.runner import WorkerRunner
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings
from pipecat_hertz.example_args import add_model_arguments, preload_or_exit

from hertz_agents.timing import SAMPLE_RATE


async def twilio_start(websocket: WebSocket) -> dict[str, Any]:
    """Read Twilio's opening messages ("connected", then "start"); returns the "start" payload."""
    async for text in websocket.iter_text():
        message = json.loads(text)
        if message.get("event") == "start":
            return message["start"]
    raise ConnectionError("the websocket closed before Twilio's start message")


async def run_bot(
    websocket: WebSocket,
    *,
    model: Any,
    prompt: str | None,
    gate_db: Any = "auto",
    on_started: Callable[[PipelineWorker], Awaitable[None]] | None = None,
) -> None:
    """One phone call: Twilio's audio through hertz-dev and back."""
    start = await twilio_start(websocket)
    account, token = os.environ.get("TWILIO_ACCOUNT_SID"), os.environ.get("TWILIO_AUTH_TOKEN")
    serializer = TwilioFrameSerializer(
        stream_sid=start["streamSid"],
        call_sid=start.get("callSid"),
        account_sid=account,
        auth_token=token,
        params=TwilioFrameSerializer.InputParams(auto_hang_up=bool(account and token)),
    )
    transport = FastAPIWebsocketTransport(
        websocket,
        FastAPIWebsocketParams(
            audio_in_enabled=True, audio_out_enabled=True, audio_out_10ms_chunks=2, serializer=serializer
        ),
    )
    settings = HertzDuplexSettings(prompt=prompt, gate_threshold_db=gate_db)
    hertz = HertzDuplexService(model=model, settings=settings)
    worker = PipelineWorker(
        Pipeline([transport.input(), hertz, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE, enable_metrics=True),
    )

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, websocket):
        logger.info(f"call {start.get('callSid')} ended")
        await worker.cancel()

    if on_started is not None:

        @worker.event_handler("on_pipeline_started")
        async def on_pipeline_started(worker, frame):
            await on_started(worker)

    logger.info(f"call {start.get('callSid')} from stream {start['streamSid']}")
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(
    model: Any = "default",
    *,
    prompt: str | None = None,
    gate_db: float | str | None = "auto",
    public_host: str | None = None,
    on_started: Callable[[PipelineWorker], Awaitable[None]] | None = None,
) -> FastAPI:
    """The bot's web server: TwiML at ``/twiml``, Twilio's media stream at ``/ws``.

    ``model``: a model name or directory (loaded before the server starts answering), an
    ``hertz_agents`` Engine, or ``hertz://host:port``. ``gate_db``: the speech gate's threshold
    ("auto", a level in dBFS, or None for no gate). ``public_host``: the host name Twilio
    reaches this server at (default: the Host header of Twilio's webhook request).
    ``on_started``: called with each call's pipeline worker once it runs (to queue frames into it).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(model, (str, os.PathLike)) and not str(model).startswith("hertz://"):
            logger.info(f"loading hertz-dev model {model!r}...")
            await HertzDuplexService.preload(model, prompt=prompt)
            logger.info("model loaded; waiting for calls")
        yield

    app = FastAPI(lifespan=lifespan)

    @app.api_route("/twiml", methods=["GET", "POST"])
    async def twiml(request: Request) -> Response:
        host = public_host or request.headers.get("host", "localhost")
        stream = quoteattr(f"wss://{host}/ws")
        xml = f'<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url={stream}/></Connect></Response>'
        return Response(xml, media_type="application/xml")

    @app.websocket("/ws")
    async def media_stream(websocket: WebSocket) -> None:
        await websocket.accept()
        await run_bot(websocket, model=model, prompt=prompt, gate_db=gate_db, on_started=on_started)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--public-host", help="host name Twilio reaches this server at (default: from the request)")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    preload_or_exit(args.model, args.prompt)
    app = create_app(args.model, prompt=args.prompt, gate_db=args.gate_db, public_host=args.public_host)
    logger.info(f"point your Twilio number's voice webhook at https://<public host>/twiml (port {args.port})")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
