"""How a full-duplex service fits Pipecat's turn machinery: turns are kept, interruptions are not.

Pipecat's user aggregators detect the caller's turns (a VAD start strategy) and, by default,
broadcast an ``InterruptionFrame`` when one starts, which would cut whatever is queued for the
bot. hertz-dev hears the caller all the time and stops talking by itself, so the service asks, in
its ``ServiceMetadataFrame``, for turn strategies that still announce the caller's turns
(``UserStarted``/``UserStoppedSpeakingFrame``, for TTFB and for anything else that follows
turns) but never interrupt. A user who passes their own ``user_turn_strategies`` keeps them.

While the caller speaks, the service also pushes ``UserSpeakingFrame`` as Pipecat's VAD does,
which keeps the pipeline's idle timeout from ending a call in which only the caller talks (the
output transport's ``BotSpeakingFrame`` does the same while the model talks). Speech is told
from a frame's level: no VAD is needed.
"""

from __future__ import annotations

import numpy as np
from pipecat.turns.user_start import VADUserTurnStartStrategy
from pipecat.turns.user_stop import SpeechTimeoutUserTurnStopStrategy
from pipecat.turns.user_turn_strategies import UserTurnStrategies

from hertz_agents.audio import INT16_SCALE

CALLER_SPEECH_DB = -45.0
"""A caller frame at or above this RMS level (dBFS) counts as speech. Speech is -35 to -15 dBFS;
a quiet room, a phone line's noise and comfort noise stay well below."""


def full_duplex_turn_strategies() -> UserTurnStrategies:
    """Turn strategies for user aggregators around the service: VAD turns, no interruptions."""
    return UserTurnStrategies(
        start=[VADUserTurnStartStrategy(enable_interruptions=False)],
        stop=[SpeechTimeoutUserTurnStopStrategy()],
    )


def caller_speech_level(pcm16: bytes, channels: int = 1) -> bool:
    """Whether int16 audio (interleaved ``channels``) is loud enough to be the caller speaking."""
    samples = np.frombuffer(pcm16[: len(pcm16) // 2 * 2], dtype="<i2")
    if samples.size == 0:
        return False
    mean_square = float(np.mean(np.square(samples, dtype=np.float64))) / INT16_SCALE**2
    return mean_square > 0 and 10.0 * np.log10(mean_square) >= CALLER_SPEECH_DB
