"""The room tests' gap finder, on recordings made here: it must find a hole inside a burst and
must not take a burst that began late or ended early for one (each burst of a real call has a
delay of its own, within tens of ms of the call's; the room tests judge real calls by this)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from livekit_room_support import RATE, early_ends, gaps_in_speech, late_starts

DELAY_S = 0.5


def _speech_like() -> np.ndarray:
    """Two loud one-second utterances with a second of quiet (not digital silence) between."""
    rng = np.random.default_rng(0)
    quiet = 0.002 * rng.standard_normal(RATE).astype(np.float32)
    loud = 0.3 * rng.standard_normal(RATE).astype(np.float32)
    return np.concatenate([quiet, loud, quiet, loud, quiet])


def _heard(
    sent: np.ndarray,
    *,
    late_s: float = 0.0,
    early_s: float = 0.0,
    hole_at_s: float | None = None,
):
    """What an agent echoing ``sent`` plays: bursts only (zeros between), ``DELAY_S`` later."""
    heard = np.zeros(len(sent) + 2 * RATE, np.float32)
    shift = int(DELAY_S * RATE)
    burst = np.abs(sent) > 0.05
    heard[shift : shift + len(sent)] = np.where(burst, sent, 0.0)
    if late_s:  # the second burst starts late: its first late_s never plays
        second = 3 * RATE + shift
        heard[second : second + int(late_s * RATE)] = 0.0
    if early_s:  # the first burst came early_s sooner than the call's delay: its end, too
        first, end = RATE + shift, 2 * RATE + shift
        n = int(early_s * RATE)
        heard[first - n : end - n] = heard[first:end].copy()
        heard[end - n : end] = 0.0
    if hole_at_s is not None:  # playback ran dry for 30 ms in the middle of the first burst
        at = int((hole_at_s + DELAY_S) * RATE)
        heard[at : at + int(0.03 * RATE)] = 0.0
    return SimpleNamespace(recording=lambda: heard, first_heard_at=0.0, said_from=0.0)


def test_a_hole_inside_a_burst_is_a_gap():
    sent = _speech_like()
    caller = _heard(sent, hole_at_s=1.5)
    assert gaps_in_speech(caller, sent, DELAY_S) == [0.03]
    assert late_starts(caller, sent, DELAY_S) == []
    assert early_ends(caller, sent, DELAY_S) == []


def test_a_burst_that_began_late_is_latency_not_a_gap():
    sent = _speech_like()
    caller = _heard(sent, late_s=0.035)
    assert gaps_in_speech(caller, sent, DELAY_S) == []
    assert late_starts(caller, sent, DELAY_S) == [0.035]
    assert early_ends(caller, sent, DELAY_S) == []


def test_a_burst_that_ended_early_is_not_a_gap():
    sent = _speech_like()
    caller = _heard(sent, early_s=0.025)
    assert gaps_in_speech(caller, sent, DELAY_S) == []
    assert early_ends(caller, sent, DELAY_S) == [0.025]
    assert late_starts(caller, sent, DELAY_S) == []


def test_a_hole_in_a_burst_that_came_early_is_still_a_gap():
    sent = _speech_like()
    caller = _heard(sent, early_s=0.025, hole_at_s=1.5)
    assert gaps_in_speech(caller, sent, DELAY_S) == [0.03]


def test_a_clean_echo_has_neither():
    sent = _speech_like()
    caller = _heard(sent)
    assert gaps_in_speech(caller, sent, DELAY_S) == []
    assert late_starts(caller, sent, DELAY_S) == []
    assert early_ends(caller, sent, DELAY_S) == []
