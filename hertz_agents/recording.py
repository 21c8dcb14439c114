"""A stereo WAV of one call, caller | model, written on the event loop (never the engine thread)."""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP

__all__ = ["CallRecorder"]


class CallRecorder:
    """Writes each step as heard: the model's answer plays one step after the input it answers.

    Args:
        path: The WAV to write (16 kHz, 2 channels, 16-bit): left the caller, right the model.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._file: sf.SoundFile | None = sf.SoundFile(
            str(path), "w", SAMPLE_RATE, 2, subtype="PCM_16"
        )
        self._model_prev = np.zeros(SAMPLES_PER_STEP, dtype=np.float32)

    def write(self, caller: np.ndarray | None, model: np.ndarray) -> None:
        """One step: the caller's input (None: silence was fed) and the model's output for it."""
        if self._file is None:
            return
        left = caller if caller is not None else np.zeros(SAMPLES_PER_STEP, dtype=np.float32)
        self._file.write(np.stack([left, self._model_prev], axis=1).clip(-1, 1))
        self._model_prev = model

    def close(self) -> None:
        """Finish the file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
