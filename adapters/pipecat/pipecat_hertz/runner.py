"""hertz-dev bots under Pipecat's development runner (``pipecat.runner.run``).

A bot module defines ``bot(runner_args)`` and calls :func:`run_bot_main`, which adds the
project's flags (``--model``, ``--prompt``, ``--gate-db``, ``--record-dir``) to the runner's,
loads the model before the server accepts a call, adds a few routes to the runner's app (the
bot's own page at ``/`` if it has one, and ``/api/model``, which says what talks), and keeps the
console at INFO (the runner sets DEBUG; ``-v`` brings it back). :func:`run_call` runs one call's
pipeline with the fatal-error policy that ends the call: a model that cannot be loaded, a full
engine, a lost server or a session the engine ended end the call with the reason instead of
leaving the caller in silence, and so does a transport that fails before anyone has connected
(a Daily room that cannot be joined).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger
from pipecat.frames.frames import ErrorFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
from pipecat.transports.base_transport import BaseTransport
from pipecat.workers.runner import WorkerRunner

from hertz_agents.timing import SAMPLE_RATE
from pipecat_hertz.example_args import (
    BotOptions,
    add_model_arguments,
    describe_model,
    preload_or_exit,
)
from pipecat_hertz.service import HertzDuplexService
from pipecat_hertz.settings import HertzDuplexSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

OnStarted = Callable[[PipelineWorker], Awaitable[None]]
END_GRACE_SECONDS = 3.0  # a failed call's graceful end (2 s of trailing silence) before a cancel
LATE_PEER_SECONDS = 1.0  # a peer that connects to a failed call: time for the error to reach it


def _set_console_level(verbose: int) -> None:
    """INFO by default (no per-frame lines); ``-v`` DEBUG, ``-vv`` TRACE."""
    logger.remove()
    logger.add(sys.stderr, level="INFO" if not verbose else "DEBUG" if verbose == 1 else "TRACE")


def configure_app(
    app: FastAPI, *, options: BotOptions, page: Path | None = None, verbose: int = 0
) -> None:
    """Add the bot's routes to the runner's FastAPI ``app``.

    They go in before the runner adds its own, so that the bot's page, not the runner's redirect
    to its prebuilt client, answers ``/``.
    """
    from fastapi.responses import FileResponse

    model = {"model": str(options.model), "description": describe_model(options.model)}

    if page is not None:

        @app.get("/", include_in_schema=False)
        async def bot_page() -> FileResponse:
            return FileResponse(page)

    @app.get("/api/model")
    async def model_info() -> dict[str, str]:
        """What talks: the page shows it."""
        return model

    @asynccontextmanager
    async def console_level(_app: Any) -> AsyncIterator[None]:
        _set_console_level(verbose)  # after the runner's main() set DEBUG
        logger.info(f"model: {describe_model(options.model)}")
        yield

    app.router.lifespan_context = console_level


def run_bot_main(
    description: str, *, page: Path | None = None, extra: Callable[[Any], None] | None = None
) -> None:
    """Parse the flags, load the model, then hand over to Pipecat's development runner.

    ``extra(app)`` may add more routes to the runner's app before the runner adds its own.
    """
    from pipecat.runner import run

    parser = argparse.ArgumentParser(description=description)
    add_model_arguments(parser)
    ours = argparse.ArgumentParser(add_help=False)
    add_model_arguments(ours)
    ours.add_argument("-v", "--verbose", action="count", default=0)  # the runner's flag, read early
    known, _ = ours.parse_known_args()
    _set_console_level(0)
    preload_or_exit(known.model, known.prompt)
    configure_app(run.app, options=BotOptions.from_cli(known), page=page, verbose=known.verbose)
    if extra is not None:
        extra(run.app)
    run.main(parser)


async def run_call(
    transport: BaseTransport,
    options: BotOptions,
    *,
    call_id: str,
    on_started: OnStarted | None = None,
) -> None:
    """One call: ``transport.input() -> HertzDuplexService -> transport.output()`` at 16 kHz.

    A permanent error of the service (see docs/pipecat.md, Errors) ends the pipeline gracefully
    (``ProcessorUnusablePolicy.END``), after the error has reached the client: Pipecat's RTVI
    sends it to a browser as an ``error`` message, which the example page shows.
    """
    record = Path(options.record_dir) / f"{call_id}.wav" if options.record_dir else None
    if record is not None:
        record.parent.mkdir(parents=True, exist_ok=True)
    settings = HertzDuplexSettings(prompt=options.prompt, gate_threshold_db=options.gate_db)
    hertz = HertzDuplexService(model=options.model, settings=settings, record_path=record)
    worker = PipelineWorker(
        Pipeline([transport.input(), hertz, transport.output()]),
        params=PipelineParams(
            audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE, enable_metrics=True
        ),
        processor_unusable_policy=ProcessorUnusablePolicy.END,
    )

    # add_event_handler, not the (untyped) event_handler decorator: the handlers stay typed
    async def on_error(_service: HertzDuplexService, error: ErrorFrame) -> None:
        if not hertz.is_usable:
            logger.error(f"call {call_id}: ending the call: {error.error}")
            ending.append(asyncio.create_task(cancel_if_still_running()))

    async def cancel_if_still_running() -> None:
        # Pipecat's END policy drains the pipeline (2 s of trailing silence included). An EndFrame
        # that meets a WebRTC transport still setting up its tracks can stall there, leaving the
        # caller connected to a dead bot: past the grace period, cancel instead.
        await asyncio.sleep(END_GRACE_SECONDS)
        if not worker.has_finished():
            logger.warning(
                f"call {call_id}: did not end within {END_GRACE_SECONDS:g} s; cancelling"
            )
            await worker.cancel()

    connected = False
    ending: list[asyncio.Task[None]] = []  # the fallback that cancels a call that will not end
    hang_ups: list[asyncio.Task[None]] = []  # peers that connected after the call failed

    async def on_client_connected(_transport: BaseTransport, client: Any) -> None:
        nonlocal connected
        connected = True
        if not hertz.is_usable:
            hang_ups.append(asyncio.create_task(hang_up_late_peer(client)))

    async def hang_up_late_peer(client: Any) -> None:
        # The call failed while the peer was still connecting (a model that cannot be reached
        # fails within milliseconds). Pipecat's end then found no connection to close, and the
        # one that completes afterwards would stay open, silent: close it once the error message
        # (sent as soon as the data channel opens) has had a moment to reach the caller.
        await asyncio.sleep(LATE_PEER_SECONDS)
        disconnect = getattr(client, "disconnect", None)  # SmallWebRTCConnection's
        if disconnect is not None:
            logger.info(f"call {call_id}: the peer connected to a failed call; hanging up")
            await disconnect()

    async def on_client_disconnected(_transport: BaseTransport, _client: Any) -> None:
        logger.info(f"call {call_id} ended")
        await worker.cancel()

    async def on_pipeline_error(_worker: PipelineWorker, error: ErrorFrame) -> None:
        # Pipecat counts a transport that cannot join its room (Daily) or connect as a non-fatal
        # error, so the model would talk to nobody until the idle timeout, which this service
        # holds off while it speaks. Before anyone has connected, such an error ends the call.
        if not connected and error.processor in (transport.input(), transport.output()):
            logger.error(f"call {call_id}: ending the call: {error.error}")
            await worker.cancel()

    hertz.add_event_handler("on_error", on_error)
    transport.add_event_handler("on_client_connected", on_client_connected)
    transport.add_event_handler("on_client_disconnected", on_client_disconnected)
    worker.add_event_handler("on_pipeline_error", on_pipeline_error)
    if on_started is not None:

        async def on_pipeline_started(_worker: PipelineWorker, _frame: Any) -> None:
            await on_started(worker)

        worker.add_event_handler("on_pipeline_started", on_pipeline_started)

    logger.info(f"call {call_id} started")
    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    try:
        await runner.run()
    finally:
        for task in ending:
            task.cancel()
        # the pipeline may end before a late peer is hung up; that must still happen
        await asyncio.gather(*hang_ups, return_exceptions=True)
