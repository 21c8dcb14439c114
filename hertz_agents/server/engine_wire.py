"""What the server's front end and its engine process say to each other (docs/server.md).

Both ends hold one ``multiprocessing`` connection (a Unix socket pair). Every message is one
``send_bytes`` frame whose first byte is its kind. The frames of every step (audio in, audio out)
are fixed binary layouts, so nothing is pickled per step; the rare control messages (open,
sampling, stats) are pickled. ``time.monotonic()`` is the same clock in both processes on Linux,
so step times cross unchanged.

Nothing here imports torch: the front end stays light.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hertz_agents.timing import SAMPLES_PER_STEP

__all__ = [
    "AUDIO_BYTES",
    "OUTPUT",
    "SUBMIT",
    "EngineSpec",
    "Kind",
]

AUDIO_BYTES = SAMPLES_PER_STEP * 4  # float32


class Kind:
    """The first byte of each frame."""

    # front end -> engine process
    SUBMIT = b"S"  # SUBMIT header + one input step
    OPEN = b"O"  # pickled (slot id, sampling, prompt, seed)
    SAMPLING = b"U"  # pickled (slot id, sampling)
    CLOSE = b"C"  # pickled slot id
    STALL = b"Z"  # pickled seconds: fault injection for tests (Engine.inject_stall)
    QUIT = b"Q"  # close the engine and exit
    # engine process -> front end
    READY = b"R"  # pickled {"max_sessions", "bytes_per_session"}
    FAILED = b"E"  # pickled message: the engine could not start
    OPENED = b"o"  # pickled (slot id, error class name or None, message)
    OUTPUTS = b"B"  # a count, then that many OUTPUT records, each followed by its audio
    ENDED = b"c"  # pickled (slot id, message): the engine ended the slot
    STATS = b"T"  # pickled {"alive", "ticks", "tick_sizes"}


SUBMIT = struct.Struct("<IQd")  # slot id, input sequence number, complete_at
OUTPUT = struct.Struct("<IQqdddI?")
"""slot id, step, input_seq (-1: silence fed), queue_ms, compute_ms, input_complete,
input steps the engine dropped so far, silence_input."""
COUNT = struct.Struct("<I")


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads: the model, the engine's options, prompts to prefill.

    Attributes:
        model: A variant name, ``"default"`` or a checkpoint directory.
        device: ``cpu``, ``cuda``... (None: the default).
        dtype: ``bfloat16``, ``float16`` or ``float32`` (None: the device's default).
        adapter: A LoRA adapter folder merged into the weights, or None.
        engine_options: Keyword arguments of ``Engine`` (``max_sessions``, ``context``...).
        prompts: Prompt WAVs prefilled before the engine reports ready.
        threads: torch CPU threads in the engine process (None: torch's default).
    """

    model: str
    device: str | None = None
    dtype: str | None = None
    adapter: str | None = None
    engine_options: dict = field(default_factory=dict)
    prompts: tuple[str, ...] = ()
    threads: int | None = None
