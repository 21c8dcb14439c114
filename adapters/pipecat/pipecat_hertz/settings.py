"""``HertzDuplexSettings``: the service's runtime-updatable settings, in Pipecat's settings style."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from pipecat.services.settings import ServiceSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven

from hertz_agents.sampling import SamplingSettings
from pipecat_hertz.gate import AUTO

SAMPLING_FIELDS = ("token_temp", "categorical_temp", "gaussian_temp", "top_p", "min_p")
"""The settings that map one to one onto ``hertz_agents.SamplingSettings``."""


def _not_given() -> NotGiven:
    return NOT_GIVEN


@dataclass
class HertzDuplexSettings(ServiceSettings):
    """Settings for :class:`~pipecat_hertz.HertzDuplexService`.

    Used as a full store (the service's ``settings``) and as a sparse delta: send
    ``ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(token_temp=0.7))`` to change a field
    while the pipeline runs. Sampling changes apply from the next model step; a new ``prompt``
    restarts the conversation with that prompt (the model's memory of the call is dropped).

    Parameters:
        model: The model the service was created with (read-only at runtime).
        token_temp: Temperature of the model's token sampling (0 means greedy). Alias: ``temperature``.
        categorical_temp: Temperature of the latent mixture's component choice.
        gaussian_temp: Scale of the latent mixture's noise.
        top_p: Nucleus sampling on the token, or None for off.
        min_p: Min-p filtering on the token, or None for off.
        prompt: Path of a WAV (mono, or stereo caller | model) the conversation starts from, or None.
        gate_threshold_db: RMS level (dBFS) from which a model step counts as speech; quieter
            steps are played as silence. ``"auto"`` (the default) sets it 10 dB above the model's
            own quiet level; None plays everything (see ``pipecat_hertz.gate``).
    """

    token_temp: float | NotGiven = field(default_factory=_not_given)
    categorical_temp: float | NotGiven = field(default_factory=_not_given)
    gaussian_temp: float | NotGiven = field(default_factory=_not_given)
    top_p: float | None | NotGiven = field(default_factory=_not_given)
    min_p: float | None | NotGiven = field(default_factory=_not_given)
    prompt: str | None | NotGiven = field(default_factory=_not_given)
    gate_threshold_db: float | str | None | NotGiven = field(default_factory=_not_given)

    _aliases: ClassVar[dict[str, str]] = {"temperature": "token_temp"}

    @classmethod
    def defaults(cls, model: str | None) -> HertzDuplexSettings:
        """A full store with the original sampling, no prompt and the default gate."""
        sampling = SamplingSettings()
        return cls(
            model=model,
            token_temp=sampling.token_temp,
            categorical_temp=sampling.categorical_temp,
            gaussian_temp=sampling.gaussian_temp,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            prompt=None,
            gate_threshold_db=AUTO,
        )

    def sampling(self) -> SamplingSettings:
        """The sampling part of a full store, validated (raises ValueError on a bad value)."""
        values = {name: getattr(self, name) for name in SAMPLING_FIELDS}
        missing = [name for name, value in values.items() if isinstance(value, NotGiven)]
        if missing:
            raise ValueError(f"sampling settings not set: {', '.join(missing)}")
        return SamplingSettings(**values)

    def check(self) -> None:
        """Validate a full store: raises ValueError saying which field is wrong and why."""
        self.sampling()
        gate = self.gate_threshold_db
        level = isinstance(gate, (int, float)) and not isinstance(gate, bool) and math.isfinite(gate) and gate <= 0
        if gate is not None and gate != AUTO and not level:
            raise ValueError(
                f"gate_threshold_db must be a level in dBFS (<= 0, e.g. -45), 'auto' or None, got {gate!r}"
            )
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"prompt must be the path of a WAV file (str) or None, got {self.prompt!r}")
