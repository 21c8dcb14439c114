"""Call hertz-dev on the phone (Twilio, Telnyx, Plivo): a bot for Pipecat's development runner.

    pip install pipecat-hertz                               # or, in this repository, scripts/setup
    ngrok http 7860                                         # or any public HTTPS URL to this port
    python examples/pipecat_phone_bot.py -t twilio -x <id>.ngrok.app --model hertz-dev

Then point the number's voice webhook at ``https://<id>.ngrok.app/`` (HTTP POST) and call it
(docs/pipecat.md has the steps for each provider). The webhook answers with a stream to
``wss://<id>.ngrok.app/ws`` that carries a single-use token for this call; a media stream that
comes without a valid token is refused (closed with code 1008) before it takes an engine slot.
With ``TWILIO_AUTH_TOKEN`` set, a Twilio webhook must also carry Twilio's request signature.

The provider streams 8 kHz mu-law to ``/ws``; Pipecat's serializer for the provider converts it to
16 kHz, the model's rate, and back; ``HertzDuplexService`` sits between the transport's input and
output. Set the provider's credentials (``TWILIO_ACCOUNT_SID``/``TWILIO_AUTH_TOKEN``,
``TELNYX_API_KEY``, ``PLIVO_AUTH_ID``/``PLIVO_AUTH_TOKEN``) to let the bot hang up the call when
its pipeline ends, which it does with the reason logged when the model fails for good.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fastapi import Request, WebSocket
from fastapi.responses import Response
from loguru import logger
from pipecat.runner.types import RunnerArguments, WebSocketRunnerArguments
from pipecat.runner.utils import parse_telephony_websocket
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport
from pipecat_hertz.example_args import BotOptions
from pipecat_hertz.runner import OnStarted, run_bot_main, run_call
from pipecat_hertz.telephony import TOKEN_PARAMETER, CallTokens, stream_xml, twilio_signature_valid

PROVIDERS = ("twilio", "telnyx", "plivo")
TOKENS = CallTokens()


def serializer(provider: str, call_data: Any) -> Any:
    """The provider's frame serializer; it hangs up the call when the pipeline ends if the
    provider's credentials are in the environment (else the caller hangs up)."""
    env = os.environ.get
    if provider == "twilio":
        from pipecat.serializers.twilio import TwilioFrameSerializer

        account, token = env("TWILIO_ACCOUNT_SID"), env("TWILIO_AUTH_TOKEN")
        return TwilioFrameSerializer(
            stream_sid=call_data.stream_id,
            call_sid=call_data.call_id,
            account_sid=account,
            auth_token=token,
            params=TwilioFrameSerializer.InputParams(auto_hang_up=bool(account and token)),
        )
    if provider == "telnyx":
        from pipecat.serializers.telnyx import TelnyxFrameSerializer

        return TelnyxFrameSerializer(
            stream_id=call_data.stream_id,
            outbound_encoding=call_data.outbound_encoding,
            inbound_encoding="PCMU",
            call_control_id=call_data.call_id,
            api_key=env("TELNYX_API_KEY"),
            params=TelnyxFrameSerializer.InputParams(auto_hang_up=bool(env("TELNYX_API_KEY"))),
        )
    from pipecat.serializers.plivo import PlivoFrameSerializer

    auth_id, token = env("PLIVO_AUTH_ID"), env("PLIVO_AUTH_TOKEN")
    return PlivoFrameSerializer(
        stream_id=call_data.stream_id,
        call_id=call_data.call_id,
        auth_id=auth_id,
        auth_token=token,
        params=PlivoFrameSerializer.InputParams(auto_hang_up=bool(auth_id and token)),
    )


def stream_token(websocket: WebSocket, call_data: Any) -> str | None:
    """The token the provider sent back: a ``<Stream>`` parameter, or the URL's last path part."""
    body = call_data.body if call_data is not None else {}
    return (
        body.get(TOKEN_PARAMETER)
        or websocket.path_params.get("token")
        or websocket.query_params.get("token")
    )


async def answer_call(
    runner_args: WebSocketRunnerArguments,
    options: BotOptions,
    *,
    on_started: OnStarted | None = None,
) -> None:
    """One phone call on the runner's ``/ws``: check its token, then run the pipeline."""
    websocket = runner_args.websocket
    try:
        provider, call_data = await parse_telephony_websocket(websocket)
    except ValueError as e:
        logger.warning(f"refused a media stream: {e}")
        return
    call_id = call_data.call_id or ""
    # Twilio's token is bound to the call it was minted for (the webhook knows its CallSid).
    if provider not in PROVIDERS or not TOKENS.consume(stream_token(websocket, call_data), call_id):
        logger.warning(
            f"refused a {provider} media stream without a valid call token (call {call_id!r})"
        )
        await websocket.close(code=1008, reason="a call token is required")
        return
    params = FastAPIWebsocketParams(
        audio_in_enabled=True,
        audio_out_enabled=True,
        audio_out_10ms_chunks=2,
        add_wav_header=False,
        serializer=serializer(provider, call_data),
    )
    transport = FastAPIWebsocketTransport(websocket=websocket, params=params)
    await run_call(
        transport,
        options,
        call_id=call_id or runner_args.session_id or "call",
        on_started=on_started,
    )


async def bot(runner_args: RunnerArguments) -> None:
    """The runner's entry point: a phone call's media stream."""
    options = BotOptions.from_cli(runner_args.cli_args)
    if not isinstance(runner_args, WebSocketRunnerArguments):
        logger.warning(
            "this bot answers phone calls (-t twilio|telnyx|plivo); browsers: pipecat_webrtc_bot.py"
        )
        return
    await answer_call(runner_args, options)


def add_call_webhook(app: Any, provider: str, public_host: str | None) -> None:
    """``POST /``: the provider's call webhook, answered with a stream that carries a call token.

    Registered before the runner's own ``POST /`` (whose stream URL carries no token), so it wins.
    """

    @app.post("/")
    async def call_webhook(request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        host = public_host or request.headers.get("host", "localhost")
        auth_token = os.environ.get("TWILIO_AUTH_TOKEN")
        if provider == "twilio" and auth_token:
            url = f"https://{host}{request.url.path}"
            if request.url.query:
                url += f"?{request.url.query}"
            if not twilio_signature_valid(
                auth_token, url, form, request.headers.get("x-twilio-signature")
            ):
                logger.warning("refused a call webhook without Twilio's signature")
                return Response("invalid signature", status_code=403)
        call_id = form.get("CallSid", "") if provider == "twilio" else ""
        return Response(
            stream_xml(provider, host, TOKENS.mint(call_id)), media_type="application/xml"
        )


def main() -> None:
    early = argparse.ArgumentParser(add_help=False)  # the runner's -t/-x, read before its main()
    early.add_argument("-t", "--transport")
    early.add_argument("-x", "--proxy")
    known, _ = early.parse_known_args()
    provider = known.transport if known.transport in PROVIDERS else "twilio"
    if known.transport not in (None, *PROVIDERS):
        print(f"error: this bot answers phone calls: -t {' | '.join(PROVIDERS)}", file=sys.stderr)
        raise SystemExit(2)
    host = known.proxy.split("://")[-1].rstrip("/") if known.proxy else None
    run_bot_main(__doc__.split("\n\n")[0], extra=lambda app: add_call_webhook(app, provider, host))


if __name__ == "__main__":
    main()
