"""When the caller is talking, from the level of the audio they send.

hertz-dev detects no turns, but ``AgentSession`` keeps the user's state ("speaking", "listening",
"away") from the ``input_speech_started`` / ``input_speech_stopped`` events a duplex plugin sends.
Without them the caller looked silent for the whole call and showed as "away" after
``user_away_timeout`` (15 s) while talking. The events only set that state: with a duplex model
the framework never interrupts on them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

SPEECH_DBFS = -45.0
"""A frame this loud (RMS, dB below full scale) is speech: well above a quiet line's noise floor
(about -60 dBFS on a phone line), well below conversational speech (about -30 to -15 dBFS)."""
HANGOVER_SECONDS = 0.8
"""Quiet this long ends the caller's speech: longer than the pauses inside a sentence."""


def is_speech(pcm: np.ndarray, speech_dbfs: float = SPEECH_DBFS) -> bool:
    """Whether a frame of int16 samples (any channel layout) is louder than ``speech_dbfs``."""
    if pcm.size == 0:
        return False
    samples = pcm.astype(np.float32) / 32768.0
    power = float(np.mean(samples * samples))
    return power > 0 and 10 * np.log10(power) > speech_dbfs


class CallerSpeech:
    """Calls ``on_start`` when the caller starts talking and ``on_stop`` after their speech ends.

    Speech ends ``hangover_seconds`` after the last loud frame, on the event loop's clock, so a
    caller whose frames stop coming (a muted or unpublished track) is not left "speaking".
    """

    def __init__(
        self,
        on_start: Callable[[], None],
        on_stop: Callable[[], None],
        *,
        speech_dbfs: float = SPEECH_DBFS,
        hangover_seconds: float = HANGOVER_SECONDS,
    ) -> None:
        self._on_start, self._on_stop = on_start, on_stop
        self._speech_dbfs = speech_dbfs
        self._hangover = hangover_seconds
        self._end: asyncio.TimerHandle | None = None

    @property
    def speaking(self) -> bool:
        """Whether the caller is talking now."""
        return self._end is not None

    def update(self, pcm: np.ndarray) -> None:
        """Take one caller frame (int16, any channel layout); on the event loop's thread."""
        if not is_speech(pcm, self._speech_dbfs):
            return
        started = self._end is None
        if self._end is not None:
            self._end.cancel()
        self._end = asyncio.get_running_loop().call_later(self._hangover, self._stopped)
        if started:
            self._on_start()

    def close(self) -> None:
        """Forget the caller's speech without a last event (the call is over)."""
        if self._end is not None:
            self._end.cancel()
            self._end = None

    def _stopped(self) -> None:
        self._end = None
        self._on_stop()
