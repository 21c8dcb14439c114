"""Live input to model steps: stateful resampling, re-chunking, and the two joined (``StepInput``).

Callers send audio at any rate in any frame size; the model eats 16 kHz mono in blocks of
``SAMPLES_PER_STEP``. ``StreamResampler`` keeps its filter's state between frames, so frame
boundaries leave no clicks and the output equals resampling the whole signal at once, and output
sample ``k`` lines up with input time ``k / out_rate`` as in a one-shot resample.

Latency: a resampler must see a little input past an output sample before it can compute it, so
it holds back some output (``delay_samples``). The default, ``quality="low-latency"``
(``hertz_agents.polyphase``), holds back a constant filter delay: 2.7 ms when the lower of the two
rates is 16 kHz (48, 44.1 or 24 kHz <-> 16 kHz), 5.4 ms between 8 and 16 kHz. soxr's qualities
(``"HQ"``, ``"VHQ"``, ...) are still available; soxr works in blocks and holds back a varying
6-40 ms (8 kHz: 12-115 ms), so it suits files better than live audio (docs/audio.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import soxr

from hertz_agents.audio import (
    check_channels,
    check_sample_rate,
    mix_to_mono,
    to_float32,
)
from hertz_agents.errors import AudioInputError
from hertz_agents.polyphase import MAX_BANK_SIZE, PolyphaseResampler, bank_size
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, samples_to_step_boundary

LOW_LATENCY = "low-latency"
"""The default quality of live resampling: ``PolyphaseResampler``, a constant delay of a few ms."""

FALLBACK_QUALITY = "HQ"
"""soxr quality used by ``"low-latency"`` for the odd rate pairs it does not design.

Those are the pairs whose bank would exceed ``MAX_BANK_SIZE``.
"""


class StreamResampler:
    """Stateful streaming resampler for float32 audio ``[n]`` or ``[n, channels]``.

    Args:
        in_rate: Input rate in Hz.
        out_rate: Output rate in Hz. Equal rates pass audio through untouched.
        channels: Channels per frame.
        quality: ``"low-latency"`` (default: a polyphase FIR with a constant delay of a few ms,
            flat to 0.9 of the lower Nyquist frequency, 70 dB alias rejection), or a soxr quality
            (``"QQ"``, ``"LQ"``, ``"MQ"``, ``"HQ"``, ``"VHQ"``), which holds back more, and by
            varying amounts. Rate pairs whose low-latency filter would be huge (rates such as
            44101 Hz, never the usual ones) use soxr ``"HQ"``.
    """

    def __init__(
        self, in_rate: int, out_rate: int, channels: int = 1, *, quality: str = LOW_LATENCY
    ):
        self.in_rate = check_sample_rate(in_rate, "in_rate")
        self.out_rate = check_sample_rate(out_rate, "out_rate")
        self.channels = check_channels(channels)
        self.quality = quality
        self._fir: PolyphaseResampler | None = None
        self._stream: soxr.ResampleStream | None = None
        if self.in_rate == self.out_rate:
            return
        if quality == LOW_LATENCY and bank_size(self.in_rate, self.out_rate) <= MAX_BANK_SIZE:
            self._fir = PolyphaseResampler(self.in_rate, self.out_rate, self.channels)
        else:
            soxr_quality = FALLBACK_QUALITY if quality == LOW_LATENCY else quality
            self._stream = soxr.ResampleStream(
                self.in_rate, self.out_rate, channels, dtype="float32", quality=soxr_quality
            )

    @property
    def delay_samples(self) -> float:
        """Output samples held back right now (they come out with later input or ``flush``).

        With ``"low-latency"`` this is the filter's constant delay (``polyphase.design(in_rate,
        out_rate).delay_samples``) less a fraction of a sample that depends on the input so far.
        """
        if self._fir is not None:
            return self._fir.held
        return 0.0 if self._stream is None else float(self._stream.delay())

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        ok = (x.ndim == 2 and x.shape[1] == self.channels) or (x.ndim == 1 and self.channels == 1)
        if not ok:
            want = "[n] or [n, 1]" if self.channels == 1 else f"[n, {self.channels}]"
            raise AudioInputError(
                f"StreamResampler({self.channels} ch) takes {want}, got shape {x.shape}."
            )
        return np.ascontiguousarray(x)

    def process(self, x: np.ndarray) -> np.ndarray:
        """Resample the next frame; returns the output that is ready, with the same number of dims.

        Args:
            x: float32 ``[n]`` (mono) or ``[n, channels]``; any ``n``, including 0.
        """
        x = self._check(x)
        if self._fir is not None:
            y = self._fir.process(x.reshape(x.shape[0], self.channels))  # [k, channels]
            return y.reshape(-1) if x.ndim == 1 else y
        if self._stream is None:
            return x.copy()
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """End the signal: return the held-back output and reset, ready for a fresh signal.

        Returns float32 ``[n]`` for a mono resampler, ``[n, channels]`` otherwise.
        """
        empty_shape = (0,) if self.channels == 1 else (0, self.channels)
        if self._fir is not None:
            return self._fir.flush().reshape(-1 if self.channels == 1 else (-1, self.channels))
        if self._stream is None:
            return np.zeros(empty_shape, dtype=np.float32)
        tail = self._stream.resample_chunk(np.zeros(empty_shape, dtype=np.float32), last=True)
        self._stream.clear()
        return tail

    def reset(self) -> None:
        """Drop held-back output and filter history (start of a new, unrelated signal)."""
        if self._fir is not None:
            self._fir.reset()
        if self._stream is not None:
            self._stream.clear()


class Rechunker:
    """Cuts a stream of float32 ``[n]`` arrays of any length into blocks of ``size`` samples.

    Args:
        size: Samples per block (``SAMPLES_PER_STEP`` for model steps).
    """

    def __init__(self, size: int = SAMPLES_PER_STEP):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"Rechunker size must be a positive int, got {size!r}.")
        self.size = size
        self._buf = np.zeros(size, dtype=np.float32)  # the partial block, [size]
        self._fill = 0

    @property
    def pending(self) -> int:
        """Samples received that do not yet make a whole block."""
        return self._fill

    def push(self, x: np.ndarray) -> list[np.ndarray]:
        """Add samples; return every block completed by them, oldest first (each a new array)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 1:
            raise AudioInputError(f"Rechunker takes mono [n] arrays, got shape {x.shape}.")
        blocks: list[np.ndarray] = []
        i = 0
        if self._fill:
            take = min(self.size - self._fill, x.shape[0])
            self._buf[self._fill : self._fill + take] = x[:take]
            self._fill += take
            i = take
            if self._fill < self.size:
                return blocks
            blocks.append(self._buf.copy())
            self._fill = 0
        while x.shape[0] - i >= self.size:
            blocks.append(x[i : i + self.size].copy())
            i += self.size
        rest = x.shape[0] - i
        self._buf[:rest] = x[i:]
        self._fill = rest
        return blocks

    def flush(self, *, pad: bool = True) -> np.ndarray | None:
        """Return the partial block and empty the buffer; None if there is none.

        The block is zero-padded to ``size`` unless ``pad=False``.
        """
        if not self._fill:
            return None
        out = self._buf.copy() if pad else self._buf[: self._fill].copy()
        if pad:
            out[self._fill :] = 0.0
        self._fill = 0
        return out

    def clear(self) -> None:
        """Drop the partial block."""
        self._fill = 0


class StepInput:
    """Caller PCM in, model steps out: validate, mix to mono, resample to 16 kHz, cut into steps.

    Example::

        steps = StepInput(48000, channels=2)
        for block in steps.push(frame_bytes):   # float32 [SAMPLES_PER_STEP] each
            ...

    Args:
        sample_rate: Rate of the audio that will be pushed, in Hz.
        channels: Interleaved channels of the pushed audio (mixed to mono by averaging).
        quality: Resampling quality (see ``StreamResampler``); the default adds a constant few ms.
        clock: Wall-clock time (``time.time``) to cut steps on the shared step boundaries
            (:func:`~hertz_agents.timing.samples_to_step_boundary`), or None to cut from the
            first sample. With a clock, the first push of a real-time stream is preceded by
            the silence that makes its steps end on those boundaries, so calls on one engine
            are ready together and share its batched tick. It costs no latency: each sample
            still waits at most one step for its step to end. Only frames shorter than half a
            step are aligned (a whole-step frame ends when it arrives, whatever the padding).
    """

    def __init__(
        self,
        sample_rate: int,
        channels: int = 1,
        *,
        quality: str = LOW_LATENCY,
        clock: Callable[[], float] | None = None,
    ):
        self.channels = channels
        self.quality = quality
        self._resampler = StreamResampler(sample_rate, SAMPLE_RATE, 1, quality=quality)
        self._chunker = Rechunker(SAMPLES_PER_STEP)
        self._clock = clock
        self._started = False  # something was pushed (alignment happens once, at the start)
        self.alignment_samples = 0  # silence put before the first push to align its steps

    @property
    def sample_rate(self) -> int:
        """Rate of the pushed audio, in Hz."""
        return self._resampler.in_rate

    @property
    def pending(self) -> int:
        """16 kHz samples waiting for a whole step (not counting ``delay_samples``)."""
        return self._chunker.pending

    @property
    def delay_samples(self) -> float:
        """16 kHz samples the resampler holds back right now."""
        return self._resampler.delay_samples

    def push(
        self,
        pcm: bytes | bytearray | memoryview | np.ndarray,
        *,
        sample_rate: int | None = None,
        channels: int | None = None,
    ) -> list[np.ndarray]:
        """Add caller audio; return the model steps it completes (float32 ``[SAMPLES_PER_STEP]``).

        Args:
            pcm: int16 bytes, or an int16/float array ``[n]`` or ``[n, channels]`` (see
                ``to_float32``).
            sample_rate: The audio's rate if it changed since the last push. A change ends the
                previous stream (its resampler tail is kept) and starts a new resampler.
            channels: The audio's channel count if it changed.

        Raises:
            AudioInputError: bad audio (see ``to_float32``) or a non-positive rate.
        """
        rate = self.sample_rate if sample_rate is None else check_sample_rate(sample_rate)
        frames = to_float32(pcm, self.channels if channels is None else channels)  # [n, channels]
        if channels is not None:
            self.channels = channels
        steps: list[np.ndarray] = []
        if rate != self.sample_rate:
            steps += self._chunker.push(self._resampler.flush())
            self._resampler = StreamResampler(rate, SAMPLE_RATE, 1, quality=self.quality)
        mono = mix_to_mono(frames)  # [n]; mixed first, so only one channel is resampled
        resampled = self._resampler.process(mono)
        if not self._started and resampled.size:
            self._started = True
            steps += self._chunker.push(self._alignment(resampled.size))
        steps += self._chunker.push(resampled)
        return steps

    def _alignment(self, frame_samples: int) -> np.ndarray:
        """Silence before the first frame so the steps end on the shared step boundaries."""
        if self._clock is None or frame_samples >= SAMPLES_PER_STEP // 2:
            return np.zeros(0, dtype=np.float32)
        # The frame just arrived; the boundary comes ``until`` samples of real time later, and
        # the step that ends there holds the padding, this frame and those samples.
        until = samples_to_step_boundary(self._clock())
        self.alignment_samples = (SAMPLES_PER_STEP - frame_samples - until) % SAMPLES_PER_STEP
        return np.zeros(self.alignment_samples, dtype=np.float32)

    def flush(self) -> list[np.ndarray]:
        """End of input: return the remaining steps, the last one zero-padded to a whole step."""
        steps = self._chunker.push(self._resampler.flush())
        last = self._chunker.flush(pad=True)
        if last is not None:
            steps.append(last)
        return steps

    def reset(self) -> None:
        """Forget everything pushed so far (a new caller, or a barge-in that discards input)."""
        self._resampler.reset()
        self._chunker.clear()
        self._started, self.alignment_samples = False, 0


__all__ = ["LOW_LATENCY", "Rechunker", "StepInput", "StreamResampler"]
