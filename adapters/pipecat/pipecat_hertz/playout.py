"""One model step on its way to the speaker: stall check, speech gate and pacer."""

from __future__ import annotations

import numpy as np
from loguru import logger

from hertz_agents.session import OutputChunk
from pipecat_hertz.gate import SpeechGate
from pipecat_hertz.metrics import StepStats
from pipecat_hertz.pacing import OutputPacer


def shape_step(
    chunk: OutputChunk,
    now: float,
    *,
    gate: SpeechGate,
    pacer: OutputPacer | None,
    stats: StepStats,
    who: object,
) -> np.ndarray | None:
    """The audio of ``chunk`` (arrived at ``now``, monotonic) to play, or None to play nothing.

    Notes a stall (a long gap since the last step), gates the step, and asks the pacer whether
    it may be queued and how much of its silent end to cut; stalls and dropped steps are logged
    as ``who``'s WARNINGs, at most once a second.
    """
    gap = stats.arrival(now)
    if gap is not None and stats.warning_due(now):
        logger.warning(f"{who}: no model step for {gap * 1000:.0f} ms (a stall of the engine)")
    was_open = gate.is_open
    audio = gate.process(chunk.audio, chunk.rms, chunk.sample_rate)
    if len(audio) == 0:
        return None
    duration = len(audio) / chunk.sample_rate
    # The silence at the step's end, which the pacer may cut: all of it when the gate is closed
    # (less the fade-out when it just closed), none while it is open.
    silent_end = 0.0 if gate.is_open else duration - (gate.fade_ms / 1000 if was_open else 0.0)
    cut = 0.0 if pacer is None else pacer.admit(duration, now, silent_end=silent_end)
    if cut is None:
        stats.drop()
        if stats.warning_due(now):
            logger.warning(
                f"{who}: dropped {stats.take_unreported_drops()} model step(s): the output queue "
                "is not draining (a stall)"
            )
        return None
    audio = audio[: len(audio) - int(round(cut * chunk.sample_rate))]
    return audio if len(audio) else None
