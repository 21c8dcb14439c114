"""``HertzDuplexSettings``: the service's settings, updatable at runtime, in Pipecat's style."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loguru import logger
from pipecat.frames.frames import ServiceUpdateSettingsFrame
from pipecat.services.settings import ServiceSettings
from pipecat.utils.types import NOT_GIVEN, NotGiven, is_given

from hertz_agents.sampling import SamplingSettings
from pipecat_hertz.gate import AUTO

SAMPLING_FIELDS = ("token_temp", "categorical_temp", "gaussian_temp", "top_p", "min_p")
"""The settings that map one to one onto ``hertz_agents.SamplingSettings``."""

RUNTIME_FIELDS = (*SAMPLING_FIELDS, "prompt", "gate_threshold_db", "seed")
"""The settings a running service applies (``model`` is fixed when the service is created)."""


def _not_given() -> NotGiven:
    return NOT_GIVEN


@dataclass
class HertzDuplexSettings(ServiceSettings):
    """Settings for :class:`~pipecat_hertz.HertzDuplexService`.

    Used as a full store (the service's ``settings``) and as a sparse delta: send
    ``ServiceUpdateSettingsFrame(delta=HertzDuplexSettings(temperature=0.7))`` to change a field
    while the pipeline runs. Sampling changes apply from the next model step; a new ``prompt``
    restarts the conversation with that prompt (the model's memory of the call is dropped).

    Parameters:
        model: The model to load (a name, a checkpoint directory or ``hertz://host:port``), as
            an alternative to the service's ``model=`` argument. Fixed once the service exists:
            a runtime update of it is refused.
        token_temp: Temperature of the model's token sampling (0 means greedy).
        temperature: Pipecat's usual name for ``token_temp`` (either may be given, not both).
        categorical_temp: Temperature of the latent mixture's component choice.
        gaussian_temp: Scale of the latent mixture's noise.
        top_p: Nucleus sampling on the token, or None for off.
        min_p: Min-p filtering on the token, or None for off.
        seed: Seed of the session's sampling (None: random), for reproducible calls. A change
            applies to the next session (a prompt change, a reopened session).
        prompt: Path of a WAV (mono, or stereo caller | model) the conversation starts from,
            or None.
        gate_threshold_db: RMS level (dBFS) from which a model step counts as speech; quieter
            steps are played as silence. ``"auto"`` (the default) sets it 10 dB above the model's
            own quiet level; None plays everything (see ``pipecat_hertz.gate``).
    """

    token_temp: float | NotGiven = field(default_factory=_not_given)
    temperature: float | NotGiven = field(default_factory=_not_given)
    categorical_temp: float | NotGiven = field(default_factory=_not_given)
    gaussian_temp: float | NotGiven = field(default_factory=_not_given)
    top_p: float | None | NotGiven = field(default_factory=_not_given)
    min_p: float | None | NotGiven = field(default_factory=_not_given)
    seed: int | None | NotGiven = field(default_factory=_not_given)
    prompt: str | None | NotGiven = field(default_factory=_not_given)
    gate_threshold_db: float | str | None | NotGiven = field(default_factory=_not_given)

    _aliases: ClassVar[dict[str, str]] = {"temperature": "token_temp"}

    def __post_init__(self) -> None:
        # `temperature` is only a spelling: it is folded into `token_temp` so that the store, the
        # deltas and `changed` all speak of one field.
        if is_given(self.temperature):
            if is_given(self.token_temp) and self.token_temp != self.temperature:
                raise ValueError(
                    f"temperature={self.temperature!r} and token_temp={self.token_temp!r} are the "
                    "same setting: give one of them"
                )
            self.token_temp = self.temperature
            self.temperature = NOT_GIVEN

    @classmethod
    def defaults(cls, model: str | None) -> HertzDuplexSettings:
        """A full store: the original sampling, no prompt, a random seed, the default gate."""
        sampling = SamplingSettings()
        store = cls(
            model=model,
            token_temp=sampling.token_temp,
            categorical_temp=sampling.categorical_temp,
            gaussian_temp=sampling.gaussian_temp,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            seed=None,
            prompt=None,
            gate_threshold_db=AUTO,
        )
        store.temperature = store.token_temp  # the store mirrors the alias (no field is unset)
        return store

    def apply_update(self, delta: HertzDuplexSettings) -> dict[str, Any]:
        """Merge a delta (see ``ServiceSettings.apply_update``); keeps ``temperature`` mirrored."""
        changed = super().apply_update(delta)
        if is_given(self.temperature) and is_given(self.token_temp):
            self.temperature = self.token_temp
        return changed

    @classmethod
    def from_mapping(cls, settings: Any) -> HertzDuplexSettings:
        """A delta from a plain dict (Pipecat's older ``settings={...}`` frames)."""
        delta = super().from_mapping(settings)
        delta.__post_init__()
        return delta

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
        level = (
            isinstance(gate, (int, float))
            and not isinstance(gate, bool)
            and math.isfinite(gate)
            and gate <= 0
        )
        if gate is not None and gate != AUTO and not level:
            raise ValueError(
                f"gate_threshold_db must be a level in dBFS (<= 0, e.g. -45), 'auto' or None, "
                f"got {gate!r}"
            )
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(
                f"prompt must be the path of a WAV file (str) or None, got {self.prompt!r}"
            )
        if self.seed is not None and (
            not isinstance(self.seed, int) or isinstance(self.seed, bool)
        ):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.extra:
            raise ValueError(
                f"unknown settings {sorted(self.extra)}; HertzDuplexSettings has "
                f"{', '.join(('model', 'temperature', *RUNTIME_FIELDS))}"
            )


def delta_for(frame: ServiceUpdateSettingsFrame, service: object) -> HertzDuplexSettings | None:
    """The settings ``frame`` asks ``service`` to apply, or None to pass the frame on.

    A frame targeted at the service (``service=``) is applied whole. An untargeted one is
    applied when it is ours (a ``HertzDuplexSettings`` delta) or a plain ``settings`` dict, whose
    keys this service does not know are left for others (and logged); an untargeted delta of
    another service's type is passed on with a warning, since it is easy to send
    ``LLMSettings(temperature=...)`` meaning this service.
    """
    if frame.service is not None and frame.service is not service:
        return None
    if isinstance(frame.delta, HertzDuplexSettings):
        return frame.delta
    if frame.delta is not None:
        if frame.service is service:
            return HertzDuplexSettings.from_mapping(frame.delta.given_fields())
        logger.warning(
            f"{service}: not applying an untargeted {type(frame.delta).__name__} update; send "
            "HertzDuplexSettings, or target this service with service=..."
        )
        return None
    delta = HertzDuplexSettings.from_mapping(frame.settings)
    if frame.service is None and delta.extra:
        logger.warning(
            f"{service}: settings {sorted(delta.extra)} are not this service's; not applied"
        )
        delta.extra = {}
    return delta if delta.given_fields() else None
