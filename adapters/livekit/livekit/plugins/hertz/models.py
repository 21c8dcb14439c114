"""Model names and option types of the hertz-dev plugin."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hertz_agents.timing import STEP_SECONDS

HertzModels = Literal["default", "hertz-dev"]
"""Two-channel (full-duplex) checkpoints the core knows by name. A checkpoint directory, an
``hertz_agents.engine.Engine`` or ``"hertz://host:port"`` (a remote inference server) work too."""

DEFAULT_MODEL: HertzModels = "default"

DEFAULT_SAMPLE_RATE = 24_000
"""Rate of the audio the plugin hands LiveKit: a room's default output rate, so nothing resamples
it again on the way out. The model itself speaks at 16 kHz."""

DEFAULT_PREBUFFER = 0.3
"""Seconds of the model's output held before playing starts: a cushion in the output queue that
rides out late steps (the model produces exactly in real time, so an empty queue turns any late
step into an audible gap). It adds the same to the caller's mouth-to-ear latency. LiveKit's own
console holds 0.3 s for duplex models for the same reason."""


def download_model(model: str | os.PathLike[str] = DEFAULT_MODEL) -> Path | None:
    """Make sure ``model``'s checkpoint is on disk, downloading an official one; returns its folder.

    None for ``hertz://`` (the server holds the weights). Raises ``ModelNotFound`` for a name or
    folder that is not there and cannot be downloaded (the message says what to do).
    """
    from hertz_agents.backend import is_remote_url
    from hertz_agents.checkpoint import resolve_model_dir
    from hertz_agents.errors import ModelNotFound

    if is_remote_url(str(model)):
        return None
    directory, variant = resolve_model_dir(model)
    if variant is not None:
        from hertz_agents.download import download_variant

        return download_variant(variant, directory)
    if not directory.is_dir():
        raise ModelNotFound(f"no checkpoint at {directory}: put the model there or set HERTZ_MODEL")
    return directory


@dataclass(frozen=True)
class GateOptions:
    """How the adapter's audio gate splits the model's continuous output into audible bursts.

    hertz-dev never stops producing audio: while it listens it emits a low noise floor. The gate
    opens on a frame ``activation_ratio`` times louder than that floor and closes after
    ``min_silence_duration`` seconds below ``deactivation_ratio`` times it. Only audio inside a
    burst is played by ``AgentSession``; use the plain-``rtc`` path to play every sample.

    Attributes:
        silence_rms: The model's quiet level (RMS of full scale). None: measured once per engine
            by :meth:`DuplexModel.load`, or, when it cannot be measured (a remote engine), learned
            during the call by LiveKit's adaptive gate.
        activation_ratio: Loudness over the floor that opens a burst.
        deactivation_ratio: Loudness over the floor under which the burst counts as quiet.
        min_silence_duration: Quiet seconds that close a burst (four model steps by default).
        window: Seconds of history the adaptive gate learns its floor from (unused with a
            known ``silence_rms``).
    """

    silence_rms: float | None = None
    activation_ratio: float = 3.0
    deactivation_ratio: float = 1.8
    min_silence_duration: float = 4 * STEP_SECONDS
    window: float = 10.0
