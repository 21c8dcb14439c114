"""The training data path: synthetic conversations from espeak-ng, and the segment dataset.

The synthetic tests run the real espeak-ng (skipped where it is not installed) on short
conversations so they take seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from hertz_agents.timing import SAMPLE_RATE, SAMPLES_PER_STEP
from hertz_agents.train.data import AudioSegmentDataset, make_loader, set_epoch
from hertz_agents.train.synth import generate_corpus, make_conversation

needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="espeak-ng not installed"
)
SHORT = (4.0, 6.0)  # seconds: tiny conversations keep the tests fast


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)))) if x.size else 0.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate_corpus(root, n_train=2, n_val=1, seed=3, seconds=SHORT)
    return root


# --- the generator -------------------------------------------------------------------------------


@needs_espeak
def test_corpus_files_are_stereo_16k_with_a_timeline(corpus: Path) -> None:
    wavs = sorted((corpus / "train").glob("*.wav"))
    assert [p.name for p in wavs] == ["conv_00000.wav", "conv_00001.wav"]
    assert len(list((corpus / "val").glob("*.wav"))) == 1
    for wav in wavs:
        info = sf.info(str(wav))
        assert (info.channels, info.samplerate) == (2, SAMPLE_RATE)
        meta = json.loads(wav.with_suffix(".json").read_text())
        assert meta["sample_rate"] == SAMPLE_RATE
        assert {u["speaker"] for u in meta["utterances"] if u["kind"] == "turn"} == {0, 1}


@needs_espeak
def test_each_channel_speaks_exactly_in_its_own_utterances(corpus: Path) -> None:
    for wav in sorted((corpus / "train").glob("*.wav")):
        audio, _ = sf.read(str(wav), dtype="float32", always_2d=True)  # [N, 2]
        utterances = json.loads(wav.with_suffix(".json").read_text())["utterances"]
        for ch in (0, 1):
            mask = np.zeros(len(audio), bool)
            for u in utterances:
                if u["speaker"] == ch:
                    mask[u["start"] : u["end"]] = True
                    assert _rms(audio[u["start"] : u["end"], ch]) > 0.005, u
            assert mask.any()
            assert _rms(audio[~mask, ch]) < 1e-4  # no speech leaks outside the timeline
        assert not np.allclose(audio[:, 0], audio[:, 1])


@needs_espeak
def test_speakers_of_a_conversation_use_distinct_voices() -> None:
    for seed in range(8):
        a, b = make_conversation(seed, SHORT).speakers
        assert a.voice.split("+")[1] != b.voice.split("+")[1]


@needs_espeak
def test_listener_backchannels_and_turns_overlap_during_the_others_speech() -> None:
    convs = [make_conversation(seed, SHORT) for seed in range(4)]
    backchannels = [(c, u) for c in convs for u in c.utterances if u.kind == "backchannel"]
    assert backchannels
    for conv, bc in backchannels:
        # every backchannel falls (at least partly) inside a turn of the other speaker
        assert any(
            t.kind == "turn" and t.speaker != bc.speaker and t.start < bc.end and bc.start < t.end
            for t in conv.utterances
        ), bc
        assert bc.text and bc.end - bc.start < 2 * SAMPLE_RATE
    assert sum(len(c.overlaps()) for c in convs) > 0


@needs_espeak
def test_generation_is_deterministic_and_resumable(corpus: Path) -> None:
    a, b = make_conversation(11, SHORT), make_conversation(11, SHORT)
    assert np.array_equal(a.audio, b.audio) and a.utterances == b.utterances
    assert a.utterances != make_conversation(12, SHORT).utterances

    first = corpus / "train" / "conv_00000.wav"
    before = first.stat().st_mtime_ns
    paths = generate_corpus(corpus, n_train=2, n_val=1, seed=3, seconds=SHORT)
    assert first.stat().st_mtime_ns == before  # existing files are kept, not regenerated
    assert paths["train"][0] == first


# --- the dataset ---------------------------------------------------------------------------------


def _stereo(seconds: float, rate: int = SAMPLE_RATE, seed: int = 0) -> np.ndarray:
    """Two independent noisy tones, `[N, 2]`, loud enough to pass the silence check."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    left = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * rng.standard_normal(t.size)
    right = 0.2 * np.sin(2 * np.pi * 660 * t) + 0.01 * rng.standard_normal(t.size)
    return np.stack([left, right], axis=1).astype(np.float32)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    sf.write(tmp_path / "a.wav", _stereo(5.0), SAMPLE_RATE)
    (tmp_path / "sub").mkdir()
    sf.write(tmp_path / "sub" / "b.flac", _stereo(3.2, seed=1), SAMPLE_RATE)  # found recursively
    sf.write(tmp_path / "mono.wav", _stereo(4.0)[:, 0], SAMPLE_RATE)
    sf.write(tmp_path / "silent.wav", np.zeros((4 * SAMPLE_RATE, 2), np.float32), SAMPLE_RATE)
    sf.write(tmp_path / "short.wav", _stereo(0.5), SAMPLE_RATE)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot really audio" * 10)
    (tmp_path / "notes.txt").write_text("not audio, not scanned")
    return tmp_path


def test_segments_are_whole_steps_of_two_channels(folder: Path) -> None:
    # 1.3 s rounds down to 10 steps
    ds = AudioSegmentDataset(folder, channels=2, segment_seconds=1.3)
    assert ds.segment == 10 * SAMPLES_PER_STEP
    assert [f.path.name for f in ds.files] == ["a.wav", "b.flac"]
    assert len(ds) == 4 + 2  # 5.0 s and 3.2 s files give 4 and 2 segments of 1.25 s
    x = ds[0]
    assert x.dtype == torch.float32 and x.shape == (2, ds.segment)


def test_bad_files_are_skipped_and_reported(folder: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING"):
        ds = AudioSegmentDataset(folder, channels=2, segment_seconds=1.0)
    reasons = {p.name: r for p, r in ds.skipped}
    assert set(reasons) == {"mono.wav", "silent.wav", "short.wav", "corrupt.wav"}
    assert reasons["corrupt.wav"].startswith("unreadable")
    assert reasons["silent.wav"].startswith("silent")
    assert reasons["short.wav"].startswith("shorter than one segment")
    assert "stereo" in reasons["mono.wav"]
    for name in reasons:
        assert name in caplog.text  # each skip is logged with the file's name


def test_a_stereo_file_with_one_dead_channel_is_skipped_for_two_channels(tmp_path: Path) -> None:
    audio = _stereo(3.0)
    audio[:, 1] = 0.0
    sf.write(tmp_path / "half.wav", audio, SAMPLE_RATE)
    (reason,) = [
        r for _, r in AudioSegmentDataset(tmp_path, channels=2, segment_seconds=1.0).skipped
    ]
    assert reason.startswith("channel 1")
    assert len(AudioSegmentDataset(tmp_path, channels=1, segment_seconds=1.0).files) == 1


def test_mono_mode_mixes_stereo_down_and_takes_mono_files(folder: Path) -> None:
    stereo = AudioSegmentDataset(folder, channels=2, segment_seconds=1.0, random_crop=False)
    mono = AudioSegmentDataset(folder, channels=1, segment_seconds=1.0, random_crop=False)
    assert "mono.wav" in [f.path.name for f in mono.files]
    assert mono[0].shape == (1, mono.segment)
    torch.testing.assert_close(mono[0][0], stereo[0].mean(dim=0))


def test_other_sample_rates_are_resampled(tmp_path: Path) -> None:
    rate = 44_100
    sf.write(tmp_path / "cd.wav", _stereo(3.0, rate=rate), rate)
    ds = AudioSegmentDataset(tmp_path, channels=2, segment_seconds=1.0, random_crop=False)
    assert len(ds) == 3
    for i in range(len(ds)):
        x = ds[i].numpy()
        assert x.shape == (2, SAMPLE_RATE)
        spectrum = np.abs(np.fft.rfft(x[0]))  # 1 s at 16 kHz: bin k is k Hz
        assert abs(int(spectrum.argmax()) - 440) <= 1
    # the resampled segment matches resampling the whole file, away from the resampler's edges
    whole = AudioSegmentDataset(tmp_path, channels=2, segment_seconds=3.0, random_crop=False)[0]
    torch.testing.assert_close(
        ds[1][:, 500:-500], whole[:, SAMPLE_RATE + 500 : 2 * SAMPLE_RATE - 500], atol=2e-3, rtol=0
    )


@pytest.mark.skipif("MP3" not in sf.available_formats(), reason="libsndfile built without MP3")
def test_mp3_files_are_read(tmp_path: Path) -> None:
    sf.write(tmp_path / "talk.mp3", _stereo(3.0, rate=44_100), 44_100, format="MP3")
    ds = AudioSegmentDataset(tmp_path, channels=2, segment_seconds=1.0)
    assert not ds.skipped and ds[2].shape == (2, SAMPLE_RATE)


def test_validation_crops_are_fixed_and_training_crops_follow_seed_and_epoch(folder: Path) -> None:
    val = AudioSegmentDataset(folder, channels=2, segment_seconds=1.0, random_crop=False)
    assert [val.locate(i)[1] for i in range(5)] == [k * SAMPLE_RATE for k in range(5)]
    audio, _ = sf.read(str(folder / "a.wav"), dtype="float32")
    torch.testing.assert_close(val[1], torch.from_numpy(audio[SAMPLE_RATE : 2 * SAMPLE_RATE].T))

    train = AudioSegmentDataset(folder, channels=2, segment_seconds=1.0, seed=5)
    again = AudioSegmentDataset(folder, channels=2, segment_seconds=1.0, seed=5)
    offsets = [train.locate(i)[1] for i in range(len(train))]
    assert offsets == [again.locate(i)[1] for i in range(len(again))]
    train.set_epoch(1)
    assert offsets != [train.locate(i)[1] for i in range(len(train))]


def test_loader_batches_segments(folder: Path) -> None:
    ds = AudioSegmentDataset(folder, channels=2, segment_seconds=1.0)
    loader = make_loader(ds, batch_size=3, workers=0, shuffle=True)
    assert loader.sampler.__class__.__name__ == "RandomSampler"  # no process group: no sharding
    set_epoch(loader, 2)
    batches = list(loader)
    assert len(batches) == len(ds) // 3 and batches[0].shape == (3, 2, SAMPLE_RATE)
    val = make_loader(ds, batch_size=3, workers=0, shuffle=False)
    assert sum(len(b) for b in val) == len(ds)  # validation keeps the final short batch


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_loader_shards_when_a_process_group_is_initialised(tmp_path: Path) -> None:
    # A real one-process gloo group: make_loader must notice it without being told.
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1
    )
    try:
        ds = torch.utils.data.TensorDataset(torch.arange(10.0))
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=1)
        assert isinstance(loader.sampler, torch.utils.data.DistributedSampler)
        set_epoch(loader, 3)
        assert loader.sampler.epoch == 3
        assert sum(len(b[0]) for b in loader) == 8  # drop_last for training
    finally:
        torch.distributed.destroy_process_group()
