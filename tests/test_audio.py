"""Reading, writing and validating audio: real recordings, float round trips, every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr

from hertz_agents.audio import (
    RESAMPLE_QUALITY,
    dbfs,
    mix_to_mono,
    read_audio,
    rms,
    to_float32,
    write_audio,
)
from hertz_agents.errors import (
    AudioInputError,
    CheckpointError,
    EngineFull,
    HertzError,
    ModelNotFound,
    SessionClosed,
)
from hertz_agents.timing import SAMPLE_RATE

# Real recordings live outside the repository (see shared/audio/README.md); never copied in.
AUDIO_DIR = Path(
    os.environ.get("HERTZ_TEST_AUDIO", Path(__file__).resolve().parents[2] / "shared" / "audio")
)
needs_audio = pytest.mark.skipif(
    not AUDIO_DIR.is_dir(), reason=f"real recordings not found in {AUDIO_DIR}"
)


# --- errors -----------------------------------------------------------------------------------


def test_error_hierarchy_lets_callers_catch_broadly_or_narrowly() -> None:
    assert issubclass(AudioInputError, HertzError) and issubclass(AudioInputError, ValueError)
    assert issubclass(ModelNotFound, CheckpointError) and issubclass(CheckpointError, HertzError)
    assert issubclass(EngineFull, HertzError) and issubclass(SessionClosed, HertzError)


# --- to_float32 -------------------------------------------------------------------------------


def test_int16_bytes_scale_to_float_and_deinterleave() -> None:
    pcm = np.array([0, 16384, -32768, 32767, 100, -100], dtype="<i2")
    mono = to_float32(pcm.tobytes(), channels=1)
    assert mono.dtype == np.float32 and mono.shape == (6, 1)
    np.testing.assert_array_equal(mono[:, 0], pcm / 32768.0)
    stereo = to_float32(bytearray(pcm.tobytes()), channels=2)
    assert stereo.shape == (3, 2)
    np.testing.assert_array_equal(stereo[:, 0], np.array([0, -32768, 100]) / 32768.0)
    np.testing.assert_array_equal(to_float32(memoryview(pcm.tobytes()), 2), stereo)


def test_int16_bytes_with_odd_length_or_partial_frame_raise() -> None:
    with pytest.raises(AudioInputError, match="even length"):
        to_float32(b"\x00\x01\x02", channels=1)
    with pytest.raises(AudioInputError, match="whole number of 2-channel frames"):
        to_float32(np.zeros(3, np.int16).tobytes(), channels=2)


def test_arrays_of_int16_and_float_in_both_shapes() -> None:
    ints = np.array([[1000, -1000], [2000, -2000]], dtype=np.int16)
    np.testing.assert_array_equal(to_float32(ints, 2), ints / 32768.0)
    floats = np.array([0.5, -0.25, 1.0], dtype=np.float64)
    out = to_float32(floats)
    assert out.dtype == np.float32 and out.shape == (3, 1)
    np.testing.assert_array_equal(out[:, 0], floats)
    assert to_float32(np.zeros((0,), np.float32)).shape == (0, 1)


def test_channels_first_array_gets_a_transpose_hint() -> None:
    with pytest.raises(AudioInputError, match=r"audio\.T"):
        to_float32(np.zeros((2, 480), np.float32), channels=2)
    with pytest.raises(AudioInputError, match="shaped"):
        to_float32(np.zeros((480, 3), np.float32), channels=2)
    with pytest.raises(AudioInputError, match="dims"):
        to_float32(np.zeros((1, 2, 3), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_samples_raise(bad: float) -> None:
    x = np.zeros(100, np.float32)
    x[42] = bad
    with pytest.raises(AudioInputError, match="NaN/inf"):
        to_float32(x)


def test_unsupported_input_types_raise_with_a_hint() -> None:
    with pytest.raises(AudioInputError, match="int16 values stored as floats"):
        to_float32(np.array([0.0, 12000.0, -8000.0]))
    with pytest.raises(AudioInputError, match="not supported"):
        to_float32(np.zeros(4, np.int32))
    with pytest.raises(AudioInputError, match="numpy array"):
        to_float32([0.0, 0.1])  # type: ignore[arg-type]
    with pytest.raises(AudioInputError, match="positive int"):
        to_float32(np.zeros(4, np.float32), channels=0)


# --- mixing and levels ------------------------------------------------------------------------


def test_mix_to_mono_averages_on_either_axis() -> None:
    frames = np.array([[1.0, 0.0], [0.5, -0.5], [0.2, 0.4]], dtype=np.float32)  # [n, C]
    np.testing.assert_allclose(mix_to_mono(frames), [0.5, 0.0, 0.3], atol=1e-7)
    np.testing.assert_allclose(mix_to_mono(frames.T, channel_axis=0), [0.5, 0.0, 0.3], atol=1e-7)
    mono = np.array([0.1, 0.2], dtype=np.float64)
    assert mix_to_mono(mono).dtype == np.float32
    np.testing.assert_array_equal(mix_to_mono(mono[:, None]), mono.astype(np.float32))


def test_rms_and_dbfs_of_a_full_scale_sine_and_of_silence() -> None:
    sine = np.sin(2 * np.pi * 440 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
    assert rms(sine) == pytest.approx(1 / np.sqrt(2), rel=1e-4)
    assert dbfs(sine) == pytest.approx(-3.0103, abs=1e-3)
    assert dbfs(0.01 * sine) == pytest.approx(-43.0103, abs=1e-3)
    assert rms(np.zeros(0)) == 0.0 and dbfs(np.zeros(10)) == -120.0
    assert dbfs(np.full(10, 1e-9), floor=-90.0) == -90.0


# --- read_audio on real recordings ------------------------------------------------------------


@needs_audio
def test_read_countdown_resamples_48k_mono_to_16k() -> None:
    path = AUDIO_DIR / "countdown_mono.wav"
    info = sf.info(str(path))
    assert info.samplerate == 48000 and info.channels == 1
    audio = read_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 2 and audio.shape[0] == 1
    assert audio.flags.c_contiguous
    assert audio.shape[1] == pytest.approx(info.frames * SAMPLE_RATE / 48000, abs=1)
    raw, _ = sf.read(str(path), dtype="float32")
    expected = soxr.resample(raw, 48000, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
    np.testing.assert_allclose(audio[0], expected, atol=1e-6)
    assert -60 < dbfs(audio) < 0  # real speech, not silence


@needs_audio
def test_read_stereo_duo_keeps_mixes_or_duplicates_channels() -> None:
    path = AUDIO_DIR / "bob_duo.wav"
    stereo = read_audio(path)
    assert stereo.shape[0] == 2 and stereo.shape[1] == sf.info(str(path)).frames
    assert not np.allclose(stereo[0], stereo[1])  # one speaker per channel
    np.testing.assert_allclose(read_audio(path, channels=1)[0], stereo.mean(axis=0), atol=1e-6)
    np.testing.assert_array_equal(read_audio(path, channels=2), stereo)
    mono_as_stereo = read_audio(AUDIO_DIR / "countdown_mono.wav", channels=2)
    np.testing.assert_array_equal(mono_as_stereo[0], mono_as_stereo[1])


@needs_audio
def test_read_at_another_rate() -> None:
    audio = read_audio(AUDIO_DIR / "bob_duo.wav", sample_rate=24000, channels=1)
    frames = sf.info(str(AUDIO_DIR / "bob_duo.wav")).frames
    assert audio.shape == (1, round(frames * 24000 / SAMPLE_RATE))


# --- writing and round trips ------------------------------------------------------------------


def test_float_wav_round_trip_is_not_quantized(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    audio = (0.5 * rng.standard_normal((2, 4000))).clip(-1, 1).astype(np.float32)  # [C, N]
    audio[0, 0] = 1e-7  # far below int16 resolution
    path = tmp_path / "float.wav"
    write_audio(path, audio, SAMPLE_RATE)
    assert sf.info(str(path)).subtype == "FLOAT"
    np.testing.assert_array_equal(read_audio(path), audio)


def test_pcm16_write_quantizes_and_clips(tmp_path: Path) -> None:
    audio = np.array([0.0, 0.25, -0.5, 1.5, -3.0, 0.1234567], dtype=np.float32)  # [N] mono
    path = tmp_path / "pcm.wav"
    write_audio(path, audio, SAMPLE_RATE, subtype="PCM_16")
    assert sf.info(str(path)).subtype == "PCM_16"
    back = read_audio(path)[0]
    np.testing.assert_allclose(back, np.clip(audio, -1, 1), atol=1 / 32768 + 1e-7)


HAS_MP3 = "MP3" in sf.available_formats()


@pytest.mark.parametrize(
    "suffix",
    [
        ".flac",
        ".ogg",
        pytest.param(".mp3", marks=pytest.mark.skipif(not HAS_MP3, reason="no MP3 in libsndfile")),
    ],
)
def test_flac_ogg_and_mp3_are_read(tmp_path: Path, suffix: str) -> None:
    sine = 0.5 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050).astype(np.float32)
    path = tmp_path / f"sine{suffix}"
    sf.write(str(path), sine, 22050)
    audio = read_audio(path)
    assert audio.shape[0] == 1
    # An MP3 encoder may pad up to one 1152-sample frame (about 840 samples at 16 kHz).
    assert abs(audio.shape[1] - SAMPLE_RATE) <= (840 if suffix == ".mp3" else 0)
    assert dbfs(audio) == pytest.approx(dbfs(sine), abs=0.5)


def test_more_than_two_channels_average_to_mono_or_keep_the_first_two(tmp_path: Path) -> None:
    frames = np.tile(np.array([[0.1, 0.2, 0.3, 0.6]], np.float32), (1600, 1))  # [N, 4]
    path = tmp_path / "quad.wav"
    sf.write(str(path), frames, SAMPLE_RATE, subtype="FLOAT")
    assert read_audio(path).shape == (4, 1600)
    np.testing.assert_allclose(read_audio(path, channels=1)[0], 0.3, atol=1e-7)
    np.testing.assert_array_equal(read_audio(path, channels=2), frames[:, :2].T)


def test_write_rejects_frames_first_arrays_and_nan(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match=r"audio\.T"):
        write_audio(tmp_path / "x.wav", np.zeros((16000, 2), np.float32), SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="NaN"):
        write_audio(tmp_path / "x.wav", np.array([0.0, np.nan], np.float32), SAMPLE_RATE)


# --- bad files --------------------------------------------------------------------------------


def test_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match="does not exist"):
        read_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioInputError, match="not a file"):
        read_audio(tmp_path)


def test_empty_files_raise(tmp_path: Path) -> None:
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    with pytest.raises(AudioInputError, match="empty"):
        read_audio(zero_bytes)
    no_frames = tmp_path / "no_frames.wav"
    sf.write(str(no_frames), np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioInputError, match="no audio samples"):
        read_audio(no_frames)


def test_corrupt_file_raises(tmp_path: Path) -> None:
    junk = tmp_path / "junk.wav"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(AudioInputError, match="could not read"):
        read_audio(junk)


def test_nan_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "nan.wav"
    x = np.zeros(1600, np.float32)
    x[800] = np.nan
    sf.write(str(path), x, SAMPLE_RATE, subtype="FLOAT")  # write_audio itself refuses NaN
    with pytest.raises(AudioInputError, match="NaN/inf"):
        read_audio(path)


def test_too_short_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    write_audio(path, np.zeros(SAMPLE_RATE // 10, np.float32), SAMPLE_RATE)  # 0.1 s
    with pytest.raises(AudioInputError, match="shorter than the 1 s"):
        read_audio(path, min_seconds=1.0)
    assert read_audio(path, min_seconds=0.1).shape == (1, SAMPLE_RATE // 10)


def test_bad_arguments_raise() -> None:
    with pytest.raises(AudioInputError, match="channels"):
        read_audio("whatever.wav", channels=3)
    with pytest.raises(AudioInputError, match="sample_rate"):
        read_audio("whatever.wav", sample_rate=0)
