"""The wire protocol between ``hertz-agents serve`` and its clients, defined once for both sides.

One WebSocket per conversation at ``/v1/session``:

* the client opens with a JSON :class:`Start` (protocol version, sampling, prompt, seed) and the
  server answers :class:`Started` or :class:`Error` (then closes);
* audio travels as binary messages. Client to server: raw int16 little-endian PCM, mono, 16 kHz,
  any whole number of samples up to :attr:`Limits.max_frame_bytes`; the server cuts it into
  125 ms steps and numbers them 0, 1, 2... Server to client: one :class:`OutputFrame` per model
  step, a fixed header and exactly one step of int16 PCM, naming the input step it answers;
* control is small JSON: :class:`Settings` (a sampling delta, acknowledged with the full
  settings), :class:`MetricsRequest` / :class:`MetricsReply`, :class:`End` / :class:`Ended`.

Every JSON message is an object with a ``"type"``. Malformed input ends only the offending
session, with an :class:`Error` that says what was wrong and a WebSocket close code.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from hertz_agents.audio import float_to_pcm16, pcm16_to_float
from hertz_agents.errors import HertzError
from hertz_agents.sampling import OPTIONAL_SAMPLING_FIELDS, SAMPLING_FIELDS, SamplingSettings
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

PROTOCOL_VERSION = 1
"""Bumped on any incompatible change; a server refuses a start with another version."""

SESSION_PATH = "/v1/session"
INFO_PATH = "/v1/info"
COMPAT_PATH = "/audio"
COMPAT_TEMPERATURE_PATH = "/set_temperature"
COMPAT_PREFIX = "data:audio/raw;base64,"
"""The original hertz-dev server's text frames: this prefix, then base64 of int16 PCM at 16 kHz."""

STEP_BYTES = SAMPLES_PER_STEP * 2  # one step of int16 PCM
NO_INPUT = 0xFFFFFFFF  # OutputFrame.input_seq of a step the server ran on inserted silence


@dataclass(frozen=True)
class Limits:
    """What a server accepts. Sent to clients in :class:`Started` so they can stay inside it."""

    max_message_bytes: int = (
        2 * 1024 * 1024
    )  # any one WebSocket message (the start may carry a prompt)
    max_control_bytes: int = 16 * 1024  # a JSON message after the start
    max_frame_bytes: int = 8 * STEP_BYTES  # one binary audio message: up to 1 s
    max_prompt_bytes: int = (
        1024 * 1024
    )  # an inline prompt file, decoded (about 30 s of 16 kHz PCM16)
    max_prompt_seconds: float = 30.0  # an inline prompt's duration, read from its header
    max_session_seconds: float = 3600.0  # then the server ends the session ("session_limit")
    start_timeout: float = 2.0  # to send the start message after connecting
    idle_timeout: float = 30.0  # without any audio from the client, the session ends
    max_input_ahead_steps: int = 16  # audio sent faster than real time beyond this burst is dropped
    max_output_backlog_steps: int = 40  # a client this far behind reading its audio is disconnected
    heartbeat: float = 10.0  # WebSocket ping interval; a peer that does not answer is dropped
    # Budgets of one connection; beyond them it is closed with "rate_limited" (0: no limit).
    audio_messages_per_second: float = 50.0  # binary audio messages, with one second of burst
    control_messages_per_second: float = 5.0  # JSON messages after the start ...
    control_burst: int = 10  # ... of which this many at once
    min_audio_message_bytes: int = 320  # 10 ms; only a call's last audio message may be shorter
    step_burst: int = 8  # steps a client may send ahead of real time; no credit builds up idle
    max_send_stall_seconds: float = 2.0  # a send blocked this long: the client stopped reading

    def to_dict(self) -> dict[str, Any]:
        """The limits as sent in a Started message."""
        return asdict(self)


class ErrorCode(str, Enum):
    """Why the server ended or refused a session. The close code tells generic clients the same."""

    BAD_REQUEST = "bad_request"  # malformed JSON, unknown type or field, bad values
    BAD_AUDIO = "bad_audio"  # a binary frame that is not whole int16 samples, or too large
    UNSUPPORTED_VERSION = "unsupported_version"
    UNKNOWN_PROMPT = "unknown_prompt"
    BAD_PROMPT = "bad_prompt"  # an inline prompt that cannot be read, or inline prompts not allowed
    SERVER_FULL = "server_full"
    DRAINING = "draining"  # the server is shutting down and takes no new sessions
    TIMEOUT = "timeout"  # no start, or no audio, for too long
    SESSION_LIMIT = "session_limit"
    CLIENT_TOO_SLOW = "client_too_slow"  # the client stopped reading its audio
    RATE_LIMITED = "rate_limited"  # over a message-rate budget, or too many starts from its address
    INTERNAL = "internal"

    @property
    def close_code(self) -> int:
        """The WebSocket close code a session ended with this error gets."""
        return _CLOSE_CODES.get(self, 1008)

    @property
    def retry_elsewhere(self) -> bool:
        """True when the same request may succeed later or on another server."""
        return self in (ErrorCode.SERVER_FULL, ErrorCode.DRAINING)


# WebSocket close codes (RFC 6455): 1003 unsupported data, 1007 invalid payload, 1008 policy,
# 1009 too big, 1011 server error, 1013 try again later.
_CLOSE_CODES = {
    ErrorCode.BAD_REQUEST: 1008,
    ErrorCode.BAD_AUDIO: 1007,
    ErrorCode.UNSUPPORTED_VERSION: 1008,
    ErrorCode.SERVER_FULL: 1013,
    ErrorCode.DRAINING: 1013,
    ErrorCode.INTERNAL: 1011,
}
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001  # graceful shutdown: a client may reconnect (to this server's successor)


class ProtocolError(HertzError, ValueError):
    """A message that breaks the protocol; carries the :class:`ErrorCode` to report."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- JSON messages ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """A prompt in a start message: a name the server knows, or a short audio file sent inline."""

    name: str | None = None
    audio: bytes | None = None  # WAV/FLAC/OGG file bytes (base64 on the wire)

    def to_dict(self) -> dict[str, Any]:
        """The prompt as the start message carries it (a name, or base64 audio)."""
        if self.name is not None:
            return {"name": self.name}
        return {"audio_base64": base64.b64encode(self.audio or b"").decode("ascii")}


@dataclass(frozen=True)
class Start:
    """Client -> server, first: sampling, an optional prompt and seed."""

    type = "start"
    version: int = PROTOCOL_VERSION
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    prompt: Prompt | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Settings:
    """A sampling delta: only the fields present change."""

    type = "settings"
    sampling: dict[str, float | None]


@dataclass(frozen=True)
class MetricsRequest:
    """Client -> server: ask for the session's and the server's figures."""

    type = "metrics"


@dataclass(frozen=True)
class End:
    """Client -> server: end the session."""

    type = "end"


ClientMessage = Start | Settings | MetricsRequest | End


@dataclass(frozen=True)
class Started:
    """Server -> client: the session runs; its settings and the limits it is held to."""

    type = "started"
    session_id: str
    version: int
    sample_rate: int
    samples_per_step: int
    max_sessions: int
    active_sessions: int
    sampling: dict[str, float | None]
    limits: dict[str, Any]


@dataclass(frozen=True)
class SettingsApplied:
    """Server -> client: the sampling settings now in effect."""

    type = "settings"
    sampling: dict[str, float | None]


@dataclass(frozen=True)
class MetricsReply:
    """Server -> client: the session's and the server's figures."""

    type = "metrics"
    session: dict[str, Any]
    server: dict[str, Any]


@dataclass(frozen=True)
class Ended:
    """The server ended the session; ``reason``: ``"client"``, ``"shutdown"`` or an ErrorCode."""

    type = "ended"
    reason: str
    steps: int


@dataclass(frozen=True)
class Error:
    """Server -> client: why the session was refused or ended."""

    type = "error"
    code: str
    message: str


ServerMessage = Started | SettingsApplied | MetricsReply | Ended | Error


def encode(message: ClientMessage | ServerMessage) -> str:
    """Any message as its JSON text."""
    if isinstance(message, Start):
        body: dict[str, Any] = {
            "version": message.version,
            "sampling": sampling_to_dict(message.sampling),
            "seed": message.seed,
        }
        if message.prompt is not None:
            body["prompt"] = message.prompt.to_dict()
    else:
        body = {k: v for k, v in message.__dict__.items()}
    return json.dumps({"type": message.type, **body}, separators=(",", ":"), allow_nan=False)


def sampling_to_dict(settings: SamplingSettings) -> dict[str, float | None]:
    """Sampling settings as the JSON object the protocol sends."""
    return {name: getattr(settings, name) for name in SAMPLING_FIELDS}


def _object(text: str | bytes) -> dict[str, Any]:
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"a control message must be a JSON object ({e})"
        ) from None
    except RecursionError:  # nesting deeper than the interpreter's stack
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "a control message is nested too deeply; send a flat object"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, 'a control message must be a JSON object with a "type" string'
        )
    return obj


def _sampling_delta(value: Any) -> dict[str, float | None]:
    if not isinstance(value, dict):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f'"sampling" must be an object with keys from {SAMPLING_FIELDS}'
        )
    unknown = set(value) - set(SAMPLING_FIELDS)
    if unknown:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST,
            f"unknown sampling field(s) {sorted(unknown)}; use {SAMPLING_FIELDS}",
        )
    for name, v in value.items():
        nullable = name in OPTIONAL_SAMPLING_FIELDS
        if v is None and nullable:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, f"sampling {name} must be a finite number, got {v!r}"
            )
    return dict(value)


def apply_sampling(base: SamplingSettings, delta: dict[str, float | None]) -> SamplingSettings:
    """``base`` with ``delta`` applied, or a ProtocolError saying which value is out of range."""
    try:
        return base.replace(**delta)
    except (TypeError, ValueError) as e:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"bad sampling settings: {e}") from None


def _prompt(value: Any, limits: Limits) -> Prompt | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or len(value) != 1
        or not ({"name", "audio_base64"} & set(value))
    ):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, '"prompt" must be {"name": str} or {"audio_base64": str}'
        )
    if "name" in value:
        if not isinstance(value["name"], str) or not 0 < len(value["name"]) <= 128:
            raise ProtocolError(
                ErrorCode.BAD_REQUEST, "a prompt name must be a string of 1 to 128 characters"
            )
        return Prompt(name=value["name"])
    data = value["audio_base64"]
    if not isinstance(data, str) or len(data) > (limits.max_prompt_bytes + 2) // 3 * 4:
        raise ProtocolError(
            ErrorCode.BAD_PROMPT,
            f"an inline prompt must be a base64 string of at most "
            f"{limits.max_prompt_bytes} bytes decoded; register longer ones on the server",
        )
    try:
        audio = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(ErrorCode.BAD_PROMPT, "the inline prompt is not valid base64") from None
    if not audio:
        raise ProtocolError(ErrorCode.BAD_PROMPT, "the inline prompt is empty")
    return Prompt(audio=audio)


def parse_client_message(text: str | bytes, limits: Limits) -> ClientMessage:
    """Decode one JSON control message from a client, or raise ProtocolError."""
    obj = _object(text)
    kind = obj.pop("type")
    if kind == "start":
        version = obj.get("version")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"this server speaks protocol version {PROTOCOL_VERSION}, "
                f"the client sent {version!r}; "
                "use a matching hertz-agents version",
            )
        extra = set(obj) - {"version", "sampling", "prompt", "seed"}
        if extra:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown start field(s) {sorted(extra)}")
        seed = obj.get("seed")
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62
        ):
            raise ProtocolError(
                ErrorCode.BAD_REQUEST,
                f"seed must be null or an integer in [0, 2**62), got {seed!r}",
            )
        sampling = apply_sampling(SamplingSettings(), _sampling_delta(obj.get("sampling") or {}))
        return Start(version, sampling, _prompt(obj.get("prompt"), limits), seed)
    if kind == "settings":
        return Settings(_sampling_delta(obj.get("sampling")))
    if kind == "metrics":
        return MetricsRequest()
    if kind == "end":
        return End()
    raise ProtocolError(
        ErrorCode.BAD_REQUEST,
        f"unknown message type {kind!r}; expected start, settings, metrics or end",
    )


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Decode one JSON message from the server (client side; trusts the server's field set)."""
    obj = _object(text)
    kind = obj.pop("type")
    types: dict[str, type] = {
        "started": Started,
        "settings": SettingsApplied,
        "metrics": MetricsReply,
        "ended": Ended,
        "error": Error,
    }
    if kind not in types:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"unknown server message type {kind!r}")
    known = {f.name for f in fields(types[kind])}
    try:  # fields a newer server adds are ignored
        message: ServerMessage = types[kind](**{k: v for k, v in obj.items() if k in known})
        return message
    except TypeError as e:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"malformed {kind} message from the server: {e}"
        ) from None


# -- binary audio -------------------------------------------------------------------------------
_HEADER = struct.Struct("<IIB3xff")  # step, input_seq, flags, pad, compute_ms, queue_ms
FLAG_SILENCE_INPUT = 1
OUTPUT_FRAME_BYTES = _HEADER.size + STEP_BYTES


@dataclass(frozen=True)
class OutputFrame:
    """One model step from the server: the header fields and float32 audio [2000] at 16 kHz."""

    step: int  # the session's model step index, from 0
    input_seq: (
        int | None
    )  # which input step (0, 1, 2... as sent) it answers; None: inserted silence
    compute_ms: float  # the batched tick that made it
    queue_ms: float  # from its input step being complete to the tick starting
    audio: np.ndarray

    @property
    def silence_input(self) -> bool:
        """The server fed this step silence (the client's audio stalled)."""
        return self.input_seq is None


def encode_output(
    step: int, input_seq: int | None, compute_ms: float, queue_ms: float, audio: np.ndarray
) -> bytes:
    """Header + one step of PCM16. ``audio`` is float32 [2000]."""
    flags = FLAG_SILENCE_INPUT if input_seq is None else 0
    seq = NO_INPUT if input_seq is None else input_seq & 0xFFFFFFFF
    header = _HEADER.pack(step & 0xFFFFFFFF, seq, flags, compute_ms, queue_ms)
    return header + float_to_pcm16(audio)


def decode_output(data: bytes) -> OutputFrame:
    """One binary output frame -> :class:`OutputFrame` (ProtocolError if malformed)."""
    if len(data) != OUTPUT_FRAME_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_AUDIO, f"an output frame is {OUTPUT_FRAME_BYTES} bytes, got {len(data)}"
        )
    step, seq, flags, compute_ms, queue_ms = _HEADER.unpack_from(data)
    input_seq = None if flags & FLAG_SILENCE_INPUT else seq
    return OutputFrame(
        step, input_seq, compute_ms, queue_ms, pcm16_to_float(memoryview(data)[_HEADER.size :])
    )


def check_input_frame(data: bytes, limits: Limits) -> None:
    """Raise ProtocolError unless ``data`` is a usable binary audio message from a client."""
    if not data:
        raise ProtocolError(
            ErrorCode.BAD_AUDIO, "an audio message is empty; send int16 PCM samples"
        )
    if len(data) > limits.max_frame_bytes:
        raise ProtocolError(
            ErrorCode.BAD_AUDIO,
            f"an audio message holds at most {limits.max_frame_bytes} bytes "
            f"({limits.max_frame_bytes // 2} samples at {SAMPLE_RATE} Hz), got {len(data)}",
        )
    if len(data) % 2:
        raise ProtocolError(
            ErrorCode.BAD_AUDIO,
            f"audio is int16 PCM (2 bytes a sample), got an odd {len(data)} bytes",
        )


def json_safe(values: dict[str, Any]) -> dict[str, Any]:
    """Metrics dicts may hold NaN (no data yet); JSON has no NaN, so those become null."""
    return {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()
    }
