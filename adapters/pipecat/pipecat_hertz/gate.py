"""A per-step speech gate for the model's output.

hertz-dev never stops producing audio: when it is "silent" it still emits faint noise and
breaths. Pipecat decides whether the bot is speaking from the samples it plays (any sample above
about -64 dBFS counts as speech), so ungated, the bot would be "speaking" for the whole call and
``BotStoppedSpeakingFrame`` would never come. The gate turns quiet steps into exact zeros.

The decision is made once per model step (125 ms), from the RMS level of the step at 16 kHz, so
it needs no look-ahead and adds no latency. A step that opens the gate passes whole, so the
onset of speech inside it is kept. Hysteresis and a hangover keep soft word endings, and short
ramps at the transitions avoid clicks.

Models differ in how loud their "silence" is, so by default the threshold is set from the
model's own quiet level (its output while it hears silence, measured once per engine, see
``hertz_agents.engine.measure_quiet_level``): ``AUTO_MARGIN_DB`` above it, and never below
``MIN_THRESHOLD_DB``, so that what passes is louder than what Pipecat calls silence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

AUTO = "auto"
"""Threshold setting: from the model's measured quiet level."""

DEFAULT_THRESHOLD_DB = -45.0
"""The threshold (RMS, dBFS) when the quiet level is unknown.

Speech is typically -35 to -15 dBFS.
"""

AUTO_MARGIN_DB = 10.0
"""How far above the model's quiet level a step must be to open the gate."""

MIN_THRESHOLD_DB = -55.0
"""The lowest automatic threshold: quieter steps would count as silence for Pipecat anyway."""


def threshold_db(setting: float | str | None, quiet_rms: float | None) -> float | None:
    """The gate threshold for a ``gate_threshold_db`` setting: a level, None (no gate) or "auto"."""
    if setting != AUTO:
        return setting  # type: ignore[return-value]
    if quiet_rms is None:
        return DEFAULT_THRESHOLD_DB
    quiet_db = 20.0 * math.log10(quiet_rms) if quiet_rms > 0 else -math.inf
    return max(MIN_THRESHOLD_DB, quiet_db + AUTO_MARGIN_DB)


@dataclass
class SpeechGate:
    """Open/closed per model step; closed steps come out as zeros.

    Args:
        threshold_db: RMS level (dBFS, of the 16 kHz step) at which a closed gate opens.
            None disables the gate: every step passes unchanged.
        hysteresis_db: An open gate stays open while steps are above
            ``threshold_db - hysteresis_db``.
        hangover_steps: Quiet steps that still pass before the gate closes.
        fade_ms: Length of the ramps applied when the gate opens or closes.
    """

    threshold_db: float | None = DEFAULT_THRESHOLD_DB
    hysteresis_db: float = 6.0
    hangover_steps: int = 1
    fade_ms: float = 4.0
    is_open: bool = field(default=False, init=False)
    _quiet_steps: int = field(default=0, init=False)

    def reset(self) -> None:
        """Close the gate (a new conversation)."""
        self.is_open = False
        self._quiet_steps = 0

    def _decide(self, level_rms: float) -> bool:
        assert self.threshold_db is not None
        level_db = 20.0 * math.log10(level_rms) if level_rms > 0 else -math.inf
        if level_db >= self.threshold_db:
            self._quiet_steps = 0
            return True
        if self.is_open and level_db >= self.threshold_db - self.hysteresis_db:
            self._quiet_steps = 0
            return True
        if self.is_open and self._quiet_steps < self.hangover_steps:
            self._quiet_steps += 1
            return True
        return False

    def process(self, audio: np.ndarray, level_rms: float, sample_rate: int) -> np.ndarray:
        """Gate one step of audio (float32 ``[n]`` at ``sample_rate``).

        ``level_rms`` is the step's RMS at 16 kHz. Returns the audio to play: unchanged while
        open, zeros while closed, with ramps on the step where the gate changes state.
        ``is_open`` tells the state after this step.
        """
        if self.threshold_db is None:
            self.is_open = True
            return audio
        was_open, self.is_open = self.is_open, self._decide(level_rms)
        if was_open and self.is_open:
            return audio
        ramp_len = min(len(audio), max(1, int(sample_rate * self.fade_ms / 1000)))
        if self.is_open:  # opening: fade in over the first few ms
            out = np.array(audio, dtype=np.float32, copy=True)
            out[:ramp_len] *= np.linspace(0.0, 1.0, ramp_len, dtype=np.float32)
            return out
        out = np.zeros(len(audio), dtype=np.float32)
        if was_open:  # closing: fade the start of this step out, then silence
            out[:ramp_len] = audio[:ramp_len] * np.linspace(1.0, 0.0, ramp_len, dtype=np.float32)
        return out
