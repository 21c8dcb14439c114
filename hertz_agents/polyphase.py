"""A streaming polyphase resampler with a small, constant delay (the default for live audio).

Why not soxr for live audio: soxr's streaming resampler releases output in blocks, so it holds
back a varying 6-115 ms, depending on the ratio, and sometimes releases two model steps at once
(docs/audio.md). This resampler is a plain FIR filter: each output sample is released as soon as
the input it reads has arrived, so it always holds back the same amount: the filter's delay.

The filter: for ``out_rate / in_rate = up / down`` (reduced by their gcd), a linear-phase
windowed-sinc low-pass at the rate ``up * in_rate`` (Kaiser window), flat up to ``PASSBAND`` of
the lower Nyquist frequency and at least ``STOPBAND_DB`` down from that Nyquist frequency on, so
nothing above the output's Nyquist folds back and no image of the input survives. Kaiser's formula
sets its length from the transition band, so the delay depends only on the lower rate: 2.7 ms when
it is 16 kHz (16 <-> 48, 44.1, 24 kHz), 5.4 ms at 8 kHz.

How it is computed: output ``k`` is the filter centred on input time ``k * down / up``, the
alignment of a one-shot resample; it reads ``taps`` inputs with one of ``up`` phases of the filter.
The pattern repeats every ``up`` outputs and ``down`` inputs (a "period"), so the outputs of a
period are a fixed linear map of a window of input. A period's outputs are cut into ``groups`` of
``width`` outputs, each reading a window of ``span`` inputs (so few of a window's inputs meet a
zero weight); the windows of all periods and groups are strided views of one buffer, and a single
``einsum`` applies the bank ``[groups, width, span]`` to them: no copy of the input, and no BLAS
call (BLAS would start threads for the larger products, beside the model's own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

PASSBAND = 0.9
"""The response is flat (to about 5e-4) up to this fraction of the lower Nyquist frequency."""

STOPBAND_DB = 70.0
"""Attenuation from the lower Nyquist frequency up: of aliases when going down, images going up."""

MAX_BANK_SIZE = 1 << 21
"""Largest bank (float32 entries, 8 MB) ``design`` builds; rate pairs that need more (odd rates
whose ratio reduces to thousands over thousands, none of the usual ones) are left to soxr."""


@dataclass(frozen=True)
class PolyphaseFilter:
    """The resampling filter for one rate pair, shared and read-only (build it with ``design``).

    Attributes:
        in_rate, out_rate: Rates in Hz.
        up, down: ``out_rate / in_rate`` reduced: a period is ``up`` outputs per ``down`` inputs.
        half_width: Half the filter's length, in samples at ``up * in_rate``: its delay.
        taps: Inputs each output reads.
        origin: Index of the first output of period 0 (period ``q`` starts at ``origin + q * up``),
            chosen so that a frame of a whole number of ``down`` inputs completes whole periods.
        first: Absolute index of the first input period 0 reads; period ``q`` reads ``q * down``
            later.
        stride: Inputs between the windows of consecutive groups of a period.
        bank: ``[groups, width, span]`` float32: the weights of output ``g * width + j`` of a period
            over the ``span`` inputs from ``first + g * stride`` (zero outside its ``taps``).
    """

    in_rate: int
    out_rate: int
    up: int
    down: int
    half_width: int
    taps: int
    origin: int
    first: int
    stride: int
    bank: np.ndarray

    @property
    def delay_s(self) -> float:
        """The delay in seconds.

        An output sample is released once input ``delay_s`` past it has arrived.
        """
        return self.half_width / (self.up * self.in_rate)

    @property
    def delay_samples(self) -> float:
        """The same delay in output samples."""
        return self.half_width / self.down


def _layout(in_rate: int, out_rate: int, passband: float, stopband_db: float) -> tuple[int, ...]:
    """(up, down, half_width, taps, origin, width, groups, stride): the design's sizes, cheaply."""
    g = math.gcd(in_rate, out_rate)
    up, down = out_rate // g, in_rate // g
    transition = (1.0 - passband) * min(in_rate, out_rate) / 2 / in_rate  # cycles per input sample
    # Kaiser's formula, in inputs
    length = (stopband_db - 7.95) / (2.285 * 2 * math.pi * transition)
    half_width = math.ceil(length * up / 2)  # at the rate up * in_rate
    taps = 2 * half_width // up + 1
    # After q * down inputs, the outputs before q * up + ready0 are complete: periods start there.
    origin = ((-1 - half_width) // down + 1) % up
    # Groups narrow enough that a group's window is at most ~1.25 taps long.
    groups = -(-up // max(1, taps * up // (4 * down)))
    width = -(-up // groups)
    stride = width * down // up
    return up, down, half_width, taps, origin, width, groups, stride


def bank_size(
    in_rate: int, out_rate: int, passband: float = PASSBAND, stopband_db: float = STOPBAND_DB
) -> int:
    """About the float32 entries of the bank ``design`` would build.

    Compare with ``MAX_BANK_SIZE``.
    """
    up, down, _, taps, _, width, groups, _ = _layout(in_rate, out_rate, passband, stopband_db)
    return groups * width * (taps + width * down // up + 1)


@lru_cache(maxsize=32)
def design(
    in_rate: int, out_rate: int, passband: float = PASSBAND, stopband_db: float = STOPBAND_DB
) -> PolyphaseFilter:
    """Design the filter for ``in_rate -> out_rate`` (cached: all sessions at one rate share it).

    Args:
        in_rate: Input rate in Hz (a positive int).
        out_rate: Output rate in Hz (a positive int).
        passband: Flat band, as a fraction of the lower Nyquist frequency (0 < passband < 1).
        stopband_db: Attenuation from the lower Nyquist frequency up (> 50 dB).
    """
    if not (0.0 < passband < 1.0 and stopband_db > 50.0):
        raise ValueError(
            f"need 0 < passband < 1 and stopband_db > 50, got {passband}, {stopband_db}"
        )
    up, down, half_width, taps, origin, width, groups, stride = _layout(
        in_rate, out_rate, passband, stopband_db
    )
    beta = 0.1102 * (stopband_db - 8.7)  # Kaiser's window shape for this attenuation
    cutoff = (1.0 + passband) / 2 * min(in_rate, out_rate) / 2 / in_rate  # cycles per input sample

    # Output origin + i of period 0 (i < up) reads the `taps` inputs up to last[i]; `dist` is each
    # one's distance from the output's time, in samples at the rate up * in_rate.
    k = origin + np.arange(up)
    last = (k * down + half_width) // up
    # [up, taps]
    dist = (half_width - (k * down + half_width) % up)[:, None] + up * (
        np.arange(taps) - (taps - 1)
    )
    u = np.clip(dist / half_width, -1.0, 1.0)
    window = np.where(
        np.abs(dist) <= half_width, np.i0(beta * np.sqrt(1.0 - u * u)) / np.i0(beta), 0.0
    )
    rows = 2 * cutoff * np.sinc(2 * cutoff * dist / up) * window  # [up, taps]
    # every phase passes DC exactly: no spurs at multiples of the gcd rate
    rows /= rows.sum(axis=1, keepdims=True)

    first = int(last[0]) - (taps - 1)
    # where each output's taps start in its window
    offset = last - last[0] - np.arange(up) // width * stride
    assert offset.min() >= 0, "a group's window starts after one of its outputs' taps"
    span = int(offset.max()) + taps
    bank = np.zeros((groups, width, span), dtype=np.float32)
    for i in range(up):  # once per design
        bank[i // width, i % width, offset[i] : offset[i] + taps] = rows[i]
    bank.flags.writeable = False
    return PolyphaseFilter(
        in_rate, out_rate, up, down, half_width, taps, origin, first, stride, bank
    )


class PolyphaseResampler:
    """Streaming resampler with a constant delay, for float32 frames ``[n, channels]``.

    The output equals a one-shot resample with the same filter, whatever the framing (to float32
    rounding), and output sample ``k`` lines up with input time ``k / out_rate``. After each frame,
    every output whose inputs have all arrived has been returned: what is held back (``held``)
    stays within one output sample below ``filter.delay_samples``.

    Args:
        in_rate, out_rate: Rates in Hz (equal rates work, and only delay).
        channels: Channels per frame.
    """

    def __init__(self, in_rate: int, out_rate: int, channels: int = 1):
        self.filter = design(in_rate, out_rate)
        self.channels = channels
        self.reset()

    def reset(self) -> None:
        """Forget all input: the next sample is time 0 of a new signal, with silence before it."""
        f = self.filter
        self._n_in = 0  # inputs received
        self._k = 0  # next output to return
        # absolute index of self._hist[:, 0]
        self._base = min(0, f.first + (-f.origin // f.up) * f.down)
        # [ch, m]: inputs still read
        self._hist = np.zeros((self.channels, -self._base), dtype=np.float32)

    @property
    def held(self) -> float:
        """Output samples owed for the input so far and not yet returned."""
        return (self._n_in * self.filter.up - self._k * self.filter.down) / self.filter.down

    def process(self, x: np.ndarray) -> np.ndarray:
        """Add the next frame, float32 ``[n, channels]``.

        Returns:
            The outputs it completes, ``[k, channels]``.
        """
        f = self.filter
        self._n_in += x.shape[0]
        return self._run(x, max(0, (self._n_in * f.up - 1 - f.half_width) // f.down + 1))

    def flush(self) -> np.ndarray:
        """End the signal (silence follows it): return its remaining outputs and reset.

        The outputs are ``[k, channels]``.

        The signal lasts ``round(inputs * up / down)`` output samples, as in a one-shot resample.
        """
        f = self.filter
        total = (2 * self._n_in * f.up + f.down) // (2 * f.down)
        out = self._run(np.zeros((0, self.channels), dtype=np.float32), max(total, self._k))
        self.reset()
        return out

    def _run(self, x: np.ndarray, stop: int) -> np.ndarray:
        """Append ``x`` ``[n, ch]`` to the history.

        Returns:
            Outputs ``self._k .. stop-1`` as ``[k, ch]``.
        """
        f = self.filter
        ch, start = self.channels, self._k
        groups, width, span = f.bank.shape
        have = self._hist.shape[1] + x.shape[0]
        y = np.zeros((ch, 0), dtype=np.float32)
        if stop > start:
            # The periods p0..p1-1 hold the outputs wanted. Inputs not received yet read as zeros:
            # the outputs that need them are dropped here and computed again once they arrive.
            p0, p1 = (start - f.origin) // f.up, -((f.origin - stop) // f.up)
            lo = p0 * f.down + f.first - self._base  # where period p0's window starts in buf
            need = lo + (p1 - 1 - p0) * f.down + (groups - 1) * f.stride + span
            buf = np.concatenate(
                [self._hist, x.T, np.zeros((ch, max(0, need - have)), np.float32)], axis=1
            )
            size = buf.itemsize
            windows = np.ndarray(  # [ch, periods, groups, span]: overlapping views into buf
                (ch, p1 - p0, groups, span),
                dtype=np.float32,
                buffer=buf,
                offset=lo * size,
                strides=(buf.shape[1] * size, f.down * size, f.stride * size, size),
            )
            y = np.einsum("cpgs,gjs->cpgj", windows, f.bank).reshape(ch, p1 - p0, groups * width)
            if groups * width != f.up:  # the last group's unused outputs
                y = y[:, :, : f.up]
            skip = start - (p0 * f.up + f.origin)
            y = y.reshape(ch, -1)[:, skip : skip + stop - start]  # [ch, k]
        else:
            buf = np.concatenate([self._hist, x.T], axis=1)
        # Keep the inputs from the window of the period holding the next output on.
        keep = min(((stop - f.origin) // f.up) * f.down + f.first - self._base, have)
        self._hist = buf[:, keep:have].copy()
        self._base += keep
        self._k = stop
        return np.ascontiguousarray(y.T)


__all__ = [
    "MAX_BANK_SIZE",
    "PASSBAND",
    "STOPBAND_DB",
    "PolyphaseFilter",
    "PolyphaseResampler",
    "bank_size",
    "design",
]
