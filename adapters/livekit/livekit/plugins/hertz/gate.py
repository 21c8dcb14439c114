"""The audio gate for hertz-dev's output.

The model's quiet level it is set from is measured by the core
(``hertz_agents.engine.measure_quiet_level``, once per engine) when :meth:`DuplexModel.load`
loads it.
"""

from __future__ import annotations

from livekit.agents import llm

from .models import GateOptions


def build_gate(options: GateOptions) -> llm.AudioGate:
    """A fixed gate when the model's quiet level is known, else LiveKit's adaptive one."""
    if options.silence_rms is not None:
        return llm.FixedGate(
            options.silence_rms,
            activation_ratio=options.activation_ratio,
            deactivation_ratio=options.deactivation_ratio,
            min_silence_duration=options.min_silence_duration,
        )
    return llm.AdaptiveNoiseGate(
        activation_ratio=options.activation_ratio,
        deactivation_ratio=options.deactivation_ratio,
        min_silence_duration=options.min_silence_duration,
        window=options.window,
    )
