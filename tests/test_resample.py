"""Streaming resampling, re-chunking into model steps, and StepInput.

StepInput turns caller PCM into 2000-sample steps.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import soxr

from hertz_agents.audio import RESAMPLE_QUALITY
from hertz_agents.errors import AudioInputError
from hertz_agents.polyphase import MAX_BANK_SIZE, PASSBAND, bank_size, design
from hertz_agents.resample import LOW_LATENCY, Rechunker, StepInput, StreamResampler
from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP, STEP_SECONDS

RATES = [8000, 24000, 44100, 48000]
# Callers' rates to the model's, and the model's to the rates callers ask for.
PAIRS = [(r, SAMPLE_RATE) for r in RATES] + [(SAMPLE_RATE, r) for r in RATES]


def _random_frames(x: np.ndarray, rng: np.random.Generator, max_len: int) -> list[np.ndarray]:
    """Split ``x`` along axis 0 into frames of random length 0..max_len (empty frames included)."""
    frames, i = [], 0
    while i < x.shape[0]:
        n = int(rng.integers(0, max_len + 1))
        frames.append(x[i : i + n])
        i += n
    return frames


def _stream(resampler: StreamResampler, frames: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([resampler.process(f) for f in frames] + [resampler.flush()])


def _sine(freq: float, rate: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _one_shot(in_rate: int, out_rate: int, x: np.ndarray, **kwargs) -> np.ndarray:
    """Resample all of ``x`` in one call with a fresh StreamResampler."""
    r = StreamResampler(in_rate, out_rate, 1 if x.ndim == 1 else x.shape[1], **kwargs)
    return np.concatenate([r.process(x), r.flush()])


def _level_db(y: np.ndarray, ref: float) -> float:
    return float(20 * np.log10(np.sqrt(np.mean(np.square(y, dtype=np.float64))) / ref + 1e-12))


@pytest.mark.parametrize("in_rate,out_rate", PAIRS)
@pytest.mark.parametrize("max_frame", [1, 37, 480, 5000])
def test_streaming_in_random_frames_equals_one_shot(
    in_rate: int, out_rate: int, max_frame: int
) -> None:
    # The filter state carries across frames exactly: any framing gives the samples of one call.
    rng = np.random.default_rng(in_rate + out_rate + max_frame)
    seconds = 0.1 if max_frame <= 37 else 0.5  # tiny frames are many Python calls
    # noise: every frequency
    x = (0.3 * rng.standard_normal(int(in_rate * seconds))).astype(np.float32)
    expected = _one_shot(in_rate, out_rate, x)
    got = _stream(StreamResampler(in_rate, out_rate), _random_frames(x, rng, max_frame))
    assert got.dtype == np.float32
    assert got.shape == expected.shape == (round(x.shape[0] * out_rate / in_rate),)
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("in_rate", RATES)
def test_soxr_qualities_are_still_available_and_equal_a_one_shot_soxr_resample(
    in_rate: int,
) -> None:
    # soxr compensates its filter's phase delay, so streaming output lines up sample for sample with
    # a one-shot resample of the whole signal: no edge needs to be skipped.
    rng = np.random.default_rng(in_rate)
    x = (0.3 * rng.standard_normal(in_rate // 2)).astype(np.float32)
    expected = soxr.resample(x, in_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    got = _stream(
        StreamResampler(in_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY), _random_frames(x, rng, 480)
    )
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("in_rate,out_rate", PAIRS)
def test_output_so_far_never_changes_with_future_input(in_rate: int, out_rate: int) -> None:
    rng = np.random.default_rng(1)
    prefix = rng.standard_normal(in_rate // 4).astype(np.float32) * 0.3
    outputs = []
    for seed in (2, 3):
        future = np.random.default_rng(seed).standard_normal(in_rate // 4).astype(np.float32) * 0.3
        r = StreamResampler(in_rate, out_rate)
        first = r.process(prefix)
        r.process(future)
        outputs.append(first)
    np.testing.assert_array_equal(outputs[0], outputs[1])


@pytest.mark.parametrize("quality", [LOW_LATENCY, RESAMPLE_QUALITY])
@pytest.mark.parametrize("in_rate", RATES)
def test_delay_samples_counts_exactly_the_held_back_output(in_rate: int, quality: str) -> None:
    rng = np.random.default_rng(4)
    r = StreamResampler(in_rate, SAMPLE_RATE, quality=quality)
    n_in = n_out = 0
    for _ in range(100):
        n = int(rng.integers(1, in_rate // 50))
        n_out += r.process(np.zeros(n, np.float32)).shape[0]
        n_in += n
        assert n_out + r.delay_samples == pytest.approx(n_in * SAMPLE_RATE / in_rate, abs=1e-6)
    n_out += r.flush().shape[0]
    assert n_out == round(n_in * SAMPLE_RATE / in_rate)


@pytest.mark.parametrize("in_rate,out_rate", PAIRS)
def test_the_held_back_output_is_the_constant_filter_delay_whatever_the_frames(
    in_rate: int, out_rate: int
) -> None:
    # soxr held back 6-115 ms, varying from frame to frame; this holds back the filter's delay, a
    # few ms, less under one sample: output k is released once input delay_s past it has arrived.
    delay = design(in_rate, out_rate).delay_samples  # in output samples
    assert delay / out_rate <= (0.0055 if min(in_rate, out_rate) == 8000 else 0.0028)
    rng = np.random.default_rng(5)
    r = StreamResampler(in_rate, out_rate)
    for _ in range(200):
        r.process(np.zeros(int(rng.integers(0, in_rate // 50)), np.float32))
        assert delay - 1 < r.delay_samples <= delay


@pytest.mark.parametrize("in_rate,out_rate", PAIRS)
@pytest.mark.parametrize("frame_s", [0.01, STEP_SECONDS])
def test_no_output_comes_in_bursts(in_rate: int, out_rate: int, frame_s: float) -> None:
    # Fed 10 ms frames (a transport) or whole steps (the model's output), every frame after the
    # first returns the frame's own duration of output, to the sample: nothing is saved up.
    frame = round(in_rate * frame_s)
    r = StreamResampler(in_rate, out_rate)
    sizes = [r.process(np.zeros(frame, np.float32)).shape[0] for _ in range(30)]
    assert sizes[0] >= frame * out_rate / in_rate - design(in_rate, out_rate).delay_samples - 1
    assert max(abs(n - frame * out_rate / in_rate) for n in sizes[1:]) < 1


@pytest.mark.parametrize("in_rate,out_rate", PAIRS)
def test_passband_sines_come_out_as_the_ideal_resampled_sine(in_rate: int, out_rate: int) -> None:
    # Output sample k is input time k / out_rate (the delay is in when it is released, not in
    # where it sits): a sine anywhere in the passband comes out as the same sine, gain 1.
    amp, nyquist = 0.5, min(in_rate, out_rate) / 2
    for freq in (50.0, 440.0, 1000.0, 0.5 * nyquist, PASSBAND * nyquist):
        y = _one_shot(in_rate, out_rate, _sine(freq, in_rate, 0.3, amp))
        ideal = amp * np.sin(2 * np.pi * freq * np.arange(y.shape[0]) / out_rate)
        settled = slice(out_rate // 50, -out_rate // 50)  # the sine starts and stops abruptly
        np.testing.assert_allclose(y[settled], ideal[settled], atol=1e-3, err_msg=f"{freq} Hz")


@pytest.mark.parametrize("in_rate,out_rate", [p for p in PAIRS if p[1] < p[0]])
def test_tones_above_the_output_nyquist_are_rejected_by_60_db(in_rate: int, out_rate: int) -> None:
    nyquist = out_rate / 2
    # from just above it to the input's own
    for freq in np.linspace(nyquist, in_rate / 2, 12)[1:-1]:
        y = _one_shot(in_rate, out_rate, _sine(float(freq), in_rate, 0.3, 0.5))
        assert _level_db(y[out_rate // 50 : -out_rate // 50], 0.5 / np.sqrt(2)) <= -60, (
            f"{freq:.0f} Hz"
        )


@pytest.mark.parametrize("in_rate,out_rate", [p for p in PAIRS if p[1] > p[0]])
def test_upsampling_leaves_no_image_above_the_input_nyquist(in_rate: int, out_rate: int) -> None:
    for freq in (440.0, 0.5 * in_rate / 2, PASSBAND * in_rate / 2):
        y = _one_shot(in_rate, out_rate, _sine(freq, in_rate, 1.0, 0.5))[
            out_rate // 10 : -out_rate // 10
        ]
        spectrum = np.abs(np.fft.rfft(y * np.hanning(y.shape[0])))
        bins = np.fft.rfftfreq(y.shape[0], 1 / out_rate)
        images = spectrum[bins > in_rate / 2].max()
        assert 20 * np.log10(images / spectrum.max()) <= -60, f"{freq:.0f} Hz"


def test_constant_input_comes_out_constant() -> None:
    # Every phase of the filter sums to one, so there is no ripple at out_rate / up (44.1 kHz:
    # 441 phases) on DC or on slowly varying signals.
    y = _one_shot(SAMPLE_RATE, 44100, np.full(SAMPLE_RATE // 2, 0.25, np.float32))
    np.testing.assert_allclose(y[2000:-2000], 0.25, atol=1e-6)


def test_48k_stereo_10ms_frames_cost_well_under_a_tenth_of_a_millisecond() -> None:
    # Measured ~15-30 us a frame either way on 2 shared cores. CPU time counts every thread, so a
    # BLAS that spun up threads would show here too; the bound is loose for shared CI machines.
    x = (0.1 * np.random.default_rng(6).standard_normal((48000, 2))).astype(np.float32)
    frames = np.split(x, 100)
    for in_rate, out_rate, fs in (
        (48000, SAMPLE_RATE, frames),
        (SAMPLE_RATE, 48000, [f[:160] for f in frames]),
    ):
        r = StreamResampler(in_rate, out_rate, channels=2)
        start = time.process_time()
        for f in fs:
            r.process(f)
        per_frame = (time.process_time() - start) / len(fs)
        assert per_frame < 0.0005, f"{in_rate} -> {out_rate}: {per_frame * 1e6:.0f} us a frame"


def test_odd_rate_pairs_fall_back_to_soxr() -> None:
    # 44101/16000 does not reduce: its filter bank would be megabytes, so soxr does that one.
    assert bank_size(44101, SAMPLE_RATE) > MAX_BANK_SIZE
    r = StreamResampler(44101, SAMPLE_RATE)
    n = r.process(np.zeros(44101, np.float32)).shape[0] + r.flush().shape[0]
    assert n == SAMPLE_RATE


@pytest.mark.parametrize("in_rate", [8000, 16000, 44100, 48000])
def test_440hz_sine_in_10ms_frames_comes_out_continuous_and_in_phase(in_rate: int) -> None:
    amp = 0.5
    x = _sine(440.0, in_rate, 2.0, amp)
    steps = StepInput(in_rate)
    out = np.concatenate(
        [b for f in np.array_split(x, len(x) // (in_rate // 100)) for b in steps.push(f)]
    )
    assert out.shape[0] >= SAMPLES_PER_STEP * 15
    settled = out[200:-200]  # skip the onset (the sine starts abruptly) and the last, padded edge
    # A continuous sine never jumps more than 2 A sin(pi f / fs) from one sample to the next.
    max_jump = 2 * amp * np.sin(np.pi * 440.0 / SAMPLE_RATE)
    assert np.max(np.abs(np.diff(settled))) <= max_jump * 1.001
    # No delay and no gain error: the output is the same sine sampled at 16 kHz.
    ideal = _sine(440.0, SAMPLE_RATE, 2.0, amp)[: out.shape[0]]
    np.testing.assert_allclose(out[200:-200], ideal[200 : out.shape[0] - 200], atol=1e-3)


def test_equal_rates_pass_audio_through_untouched() -> None:
    x = np.random.default_rng(5).standard_normal(1234).astype(np.float32)
    r = StreamResampler(SAMPLE_RATE, SAMPLE_RATE)
    y = r.process(x)
    np.testing.assert_array_equal(y, x)
    assert y is not x and r.delay_samples == 0.0 and r.flush().shape == (0,)


def test_stereo_stream_equals_each_channel_alone() -> None:
    rng = np.random.default_rng(6)
    x = (0.3 * rng.standard_normal((4800, 2))).astype(np.float32)
    both = _stream(StreamResampler(48000, SAMPLE_RATE, channels=2), _random_frames(x, rng, 700))
    assert both.shape[1] == 2
    for ch in range(2):
        alone = _stream(StreamResampler(48000, SAMPLE_RATE), _random_frames(x[:, ch], rng, 300))
        np.testing.assert_allclose(both[:, ch], alone, atol=1e-6)


def test_resampler_rejects_wrong_shapes_and_rates() -> None:
    with pytest.raises(AudioInputError, match=r"\[n, 2\]"):
        StreamResampler(48000, SAMPLE_RATE, channels=2).process(np.zeros(10, np.float32))
    with pytest.raises(AudioInputError, match="positive"):
        StreamResampler(0, SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="positive"):
        StreamResampler(48000, -1)


def test_flush_resets_for_a_fresh_signal() -> None:
    x = _sine(300.0, 48000, 0.3)
    r = StreamResampler(48000, SAMPLE_RATE)
    first = _stream(r, [x])
    second = _stream(r, [x])
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize("size", [1, 7, SAMPLES_PER_STEP])
def test_rechunker_yields_exact_blocks_of_the_input_in_order(size: int) -> None:
    rng = np.random.default_rng(size)
    x = rng.standard_normal(10_007).astype(np.float32)
    chunker = Rechunker(size)
    blocks = []
    for frame in _random_frames(x, rng, 3 * size + 5):
        blocks += chunker.push(frame)
    assert all(b.shape == (size,) and b.dtype == np.float32 for b in blocks)
    n_whole = len(x) // size
    assert len(blocks) == n_whole and chunker.pending == len(x) - n_whole * size
    if blocks:
        np.testing.assert_array_equal(np.concatenate(blocks), x[: n_whole * size])
    tail = chunker.flush()
    rest = len(x) - n_whole * size
    if rest:
        assert tail is not None and tail.shape == (size,)
        np.testing.assert_array_equal(tail[:rest], x[n_whole * size :])
        assert not tail[rest:].any()  # zero padding
    else:
        assert tail is None
    assert chunker.pending == 0 and chunker.flush() is None


def test_rechunker_blocks_do_not_alias_the_input_or_each_other() -> None:
    chunker = Rechunker(4)
    x = np.arange(10, dtype=np.float32)
    blocks = chunker.push(x)
    x[:] = -1
    blocks += chunker.push(np.arange(2, dtype=np.float32))
    np.testing.assert_array_equal(np.concatenate(blocks), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1])
    assert chunker.pending == 0 and chunker.flush(pad=False) is None


def test_rechunker_flush_without_padding_returns_only_the_remainder() -> None:
    chunker = Rechunker(SAMPLES_PER_STEP)
    chunker.push(np.ones(5, np.float32))
    tail = chunker.flush(pad=False)
    assert tail is not None and tail.shape == (5,)


def test_step_input_int16_stereo_bytes_at_48k_match_the_manual_pipeline() -> None:
    rng = np.random.default_rng(7)
    pcm = (rng.standard_normal((48000, 2)) * 3000).astype(np.int16)  # 1 s, [n, 2]
    steps = StepInput(48000, channels=2)
    got = []
    for frame in _random_frames(pcm, rng, 960):
        got += steps.push(frame.tobytes())
    got += steps.flush()
    assert all(s.shape == (SAMPLES_PER_STEP,) and s.dtype == np.float32 for s in got)
    mono = pcm.astype(np.float32).mean(axis=1) / 32768.0
    expected = _one_shot(48000, SAMPLE_RATE, mono)
    assert len(got) == -(-expected.shape[0] // SAMPLES_PER_STEP)  # ceil: the last step is padded
    flat = np.concatenate(got)
    np.testing.assert_allclose(flat[: expected.shape[0]], expected, atol=1e-5)
    assert not flat[expected.shape[0] :].any()


def test_step_input_nan_raises_and_leaves_the_stream_intact() -> None:
    x = _sine(200.0, 48000, 0.5)
    clean, broken = StepInput(48000), StepInput(48000)
    a = clean.push(x[:12000]) + clean.push(x[12000:])
    b = broken.push(x[:12000])
    bad = x[12000:].copy()
    bad[3] = np.nan
    with pytest.raises(AudioInputError, match="NaN"):
        broken.push(bad)
    b += broken.push(x[12000:])
    assert len(a) == len(b)
    for s, t in zip(a, b, strict=True):
        np.testing.assert_array_equal(s, t)


def test_step_input_follows_a_rate_change() -> None:
    steps = StepInput(48000)
    got = steps.push(_sine(300.0, 48000, 0.5)) + steps.push(
        _sine(300.0, 8000, 0.5), sample_rate=8000
    )
    got += steps.flush()
    assert steps.sample_rate == 8000
    # 0.5 s at each rate is 1 s at 16 kHz: 8 steps, nothing lost or duplicated at the switch.
    assert len(got) == SAMPLE_RATE // SAMPLES_PER_STEP


def test_step_input_pending_and_reset() -> None:
    steps = StepInput(SAMPLE_RATE)
    assert steps.push(np.zeros(SAMPLES_PER_STEP + 10, np.float32))[0].shape == (SAMPLES_PER_STEP,)
    assert steps.pending == 10 and steps.delay_samples == 0.0
    steps.reset()
    assert steps.pending == 0 and steps.flush() == []


class _FakeClock:
    """Wall-clock time that a test advances by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("start", [1_700_000_000.0, 1_700_000_000.031, 1_700_000_000.119])
@pytest.mark.parametrize("rate,frame_ms", [(16000, 20), (48000, 10), (8000, 20)])
def test_step_input_with_a_clock_ends_its_steps_on_the_shared_boundaries(start, rate, frame_ms):
    # Real-time frames: each push happens when its frame's last sample has arrived.
    clock = _FakeClock(start)
    steps = StepInput(rate, clock=clock)
    frame = np.full(rate * frame_ms // 1000, 0.1, np.float32)
    ended_at = []
    for i in range(1500 // frame_ms):  # 1.5 s
        clock.now = start + (i + 1) * frame_ms / 1000
        ended_at += [clock.now] * len(steps.push(frame))
    assert len(ended_at) >= 11
    # Every step ends within one frame (and the resampler's few samples) after a multiple of
    # 125 ms since the epoch, whichever phase the call started at.
    for t in ended_at:
        after_boundary = (t + 1e-6) % STEP_SECONDS  # 1e-6: float time a hair before one
        assert after_boundary < frame_ms / 1000 + 0.002, (t, after_boundary)
    # The padding is silence before the caller's first sample, and only that.
    first = np.concatenate(steps.push(np.zeros(0, np.float32)) or [np.zeros(0)])
    assert first.size == 0
    assert 0 <= steps.alignment_samples < SAMPLES_PER_STEP


def test_step_input_without_a_clock_or_with_whole_steps_is_not_padded():
    steps = StepInput(SAMPLE_RATE)  # no clock: cut from the first sample, as before
    assert steps.push(np.ones(SAMPLES_PER_STEP, np.float32))[0].min() == 1.0
    clocked = StepInput(SAMPLE_RATE, clock=_FakeClock(1_700_000_000.05))
    out = clocked.push(np.ones(SAMPLES_PER_STEP, np.float32))  # a whole step in one frame
    assert clocked.alignment_samples == 0 and out[0].min() == 1.0
    clocked.reset()  # a new stream aligns again
    clocked.push(np.ones(160, np.float32))
    assert clocked.alignment_samples > 0
