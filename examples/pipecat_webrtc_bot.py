"""Talk to hertz-dev from a browser: a Pipecat bot on the SmallWebRTC transport, and a web page.

    pip install 'hertz-agents[pipecat]'
    python examples/pipecat_webrtc_bot.py                 # then open http://localhost:7860
    python examples/pipecat_webrtc_bot.py --model ckpt/hertz-small --prompt voice.wav --record-dir calls

The pipeline is just ``transport.input() -> HertzDuplexService -> transport.output()``: the
model hears the browser's microphone and answers in the same stream, 8 steps a second. Audio
runs at 16 kHz, the model's own rate, end to end, so nothing but the WebRTC codec resamples (see
docs/pipecat.md for the latency budget). The weights load once, before the server accepts calls;
every call opens a cheap session on the shared engine, and concurrent calls are batched.
"""

from __future__ import annotations

import argparse
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import BackgroundTasks, FastAPI
from fastapi.responses import FileResponse
from loguru import logger
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.transports.base_transport import TransportParams
from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
from pipecat.transports.smallwebrtc.request_handler import (
    SmallWebRTCPatchRequest,
    SmallWebRTCRequest,
    SmallWebRTCRequestHandler,
)
from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport
from pipecat.workers.runner import WorkerRunner
from pipecat_hertz import HertzDuplexService, HertzDuplexSettings
from pipecat_hertz.example_args import add_model_arguments, preload_or_exit

from hertz_agents.timing import SAMPLE_RATE

PAGE = Path(__file__).parent / "web" / "index.html"


async def run_bot(
    connection: SmallWebRTCConnection, *, model: Any, prompt: str | None, gate_db: Any, record_dir: Path | None
) -> None:
    """One call: a pipeline from the browser's microphone through hertz-dev to its speaker."""
    transport = SmallWebRTCTransport(
        webrtc_connection=connection,
        params=TransportParams(audio_in_enabled=True, audio_out_enabled=True, audio_out_10ms_chunks=2),
    )
    record = record_dir / f"{connection.pc_id}.wav" if record_dir else None
    settings = HertzDuplexSettings(prompt=prompt, gate_threshold_db=gate_db)
    hertz = HertzDuplexService(model=model, settings=settings, record_path=record)
    worker = PipelineWorker(
        Pipeline([transport.input(), hertz, transport.output()]),
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE, enable_metrics=True),
    )

    @transport.event_handler("on_client_disconnected")
    async def on_client_disconnected(transport, client):
        logger.info(f"call {connection.pc_id} ended")
        await worker.cancel()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    await runner.run()


def create_app(
    model: Any = "default",
    *,
    prompt: str | None = None,
    gate_db: float | str | None = "auto",
    record_dir: str | os.PathLike[str] | None = None,
) -> FastAPI:
    """The bot's web server: the page at ``/`` and SmallWebRTC signalling at ``/api/offer``.

    ``model`` is a model name or directory (loaded before the server starts answering), an
    ``hertz_agents`` Engine, or ``hertz://host:port`` for a remote inference server. ``gate_db``
    is the speech gate's threshold: "auto", a level in dBFS, or None for no gate.
    """
    webrtc = SmallWebRTCRequestHandler()
    records = Path(record_dir) if record_dir is not None else None
    if records is not None:
        records.mkdir(parents=True, exist_ok=True)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if isinstance(model, (str, os.PathLike)) and not str(model).startswith("hertz://"):
            logger.info(f"loading hertz-dev model {model!r}...")
            await HertzDuplexService.preload(model, prompt=prompt)
            logger.info("model loaded; open the page to talk")
        yield
        await webrtc.close()

    app = FastAPI(lifespan=lifespan)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE)

    @app.post("/api/offer")
    async def offer(request: SmallWebRTCRequest, background_tasks: BackgroundTasks) -> dict[str, str] | None:
        async def on_connection(connection: SmallWebRTCConnection) -> None:
            background_tasks.add_task(
                run_bot, connection, model=model, prompt=prompt, gate_db=gate_db, record_dir=records
            )

        return await webrtc.handle_web_request(request, on_connection)

    @app.patch("/api/offer")
    async def ice_candidates(request: SmallWebRTCPatchRequest) -> dict[str, str]:
        await webrtc.handle_patch_request(request)
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--record-dir", help="record every call here (stereo WAV: caller | model)")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args()
    preload_or_exit(args.model, args.prompt)
    app = create_app(args.model, prompt=args.prompt, gate_db=args.gate_db, record_dir=args.record_dir)
    logger.info(f"open http://{args.host}:{args.port} in a browser to talk to hertz-dev")
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
