"""The AR phase: losses look no further ahead than the latent they predict, it trains on a
frozen codec, freezes what it is told to, exports a loadable model, resumes exactly, and can
start from a trained model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import soundfile as sf
import torch
from train_fixtures import ar_overrides, codec_overrides, write_corpus

from hertz_agents.checkpoint import load_model
from hertz_agents.train.ar_trainer import NextStepObjective, build_model, freeze, train_ar
from hertz_agents.train.codec_trainer import train_codec
from hertz_agents.train.config import load_ar_config, load_codec_config
from hertz_agents.train.logs import read_log


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def codec_dir(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("codec")
    return train_codec(load_codec_config("small_codec", codec_overrides(corpus, out, steps=2)))


def _cfg(corpus: Path, out: Path, codec_dir: Path, steps: int = 4, *extra: str):
    return load_ar_config("small_ar", [*ar_overrides(corpus, out, codec_dir, steps), *extra])


def test_losses_at_t_ignore_latents_after_t_plus_1(
    corpus: Path, codec_dir: Path, tmp_path: Path
) -> None:
    """Changing latent k changes no loss term at positions before k - 1: the trunk at t sees
    latents <= t and predicts token t+1; the resynthesizer sees the code of t+1 and predicts it."""
    torch.manual_seed(0)
    net = build_model(_cfg(corpus, tmp_path, codec_dir))
    objective = NextStepObjective(net).eval()
    latents = torch.randn(2, 12, 64)
    ce, nll, _ = objective(latents)
    k = 7
    changed = latents.clone()
    changed[:, k] += 3.0
    ce2, nll2, _ = objective(changed)
    torch.testing.assert_close(ce[:, : k - 1], ce2[:, : k - 1])
    torch.testing.assert_close(nll[:, : k - 1], nll2[:, : k - 1])
    assert not torch.allclose(nll[:, k - 1], nll2[:, k - 1])  # the target itself moved


def test_ar_phase_trains_and_exports_a_full_model(
    corpus: Path, codec_dir: Path, tmp_path: Path
) -> None:
    final = train_ar(_cfg(corpus, tmp_path / "run", codec_dir, 6, "optim.lr=3e-3"))
    net = load_model(str(final), device="cpu", dtype=torch.float32)
    meta = json.loads((final / "config.json").read_text())
    assert meta["format"] == "hertz-agents" and meta["training"]["phase"] == "ar"
    assert net.config.split and net.config.ar.vocab_size == 16
    # The codec inside the model is the frozen one it was trained on.
    codec = load_model(str(final)).codec.state_dict()
    from hertz_agents.train.export import load_codec

    for k, v in load_codec(codec_dir).state_dict().items():
        torch.testing.assert_close(codec[k], v)
    train = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["split"] == "train"]
    assert train[-1]["loss"] < train[0]["loss"]
    # Validation: a baseline at step 0, codebook usage, the best step kept, samples to hear.
    val = [r for r in read_log(tmp_path / "run" / "log.jsonl") if r["split"] == "val"]
    assert [r["step"] for r in val] == [0, 2, 4, 6]
    assert all(
        1 <= r["tokens_used"] <= 16 and 1 <= r["token_perplexity"] <= r["tokens_used"] for r in val
    )
    best = min(val[1:], key=lambda r: r["ce"])
    best_meta = json.loads((tmp_path / "run" / "best" / "config.json").read_text())["training"]
    assert best_meta["best"]["metric"] == "ce" and best_meta["best"]["step"] == best["step"]
    assert best_meta["best"]["value"] == pytest.approx(best["ce"], abs=1e-6)  # the log rounds
    for step in (0, 2, 4, 6):
        for name in ("continuation", "roundtrip"):
            audio, rate = sf.read(tmp_path / "run" / "samples" / f"step_{step:07d}" / f"{name}.wav")
            assert rate == 16000 and audio.shape == (16000, 2)  # 1 s, one channel per speaker


def test_freeze_keeps_named_parts_fixed(corpus: Path, codec_dir: Path, tmp_path: Path) -> None:
    start = train_ar(_cfg(corpus, tmp_path / "a", codec_dir, 2))
    before = load_model(str(start)).state_dict()
    final = train_ar(
        _cfg(
            corpus,
            tmp_path / "b",
            codec_dir,
            3,
            f'model.init_from="{start}"',
            'model.freeze=["codec","quantizer","ar"]',
            "ar.dim=64",  # ignored: init_from's sizes win, and the record must say so
        )
    )
    after = load_model(str(final)).state_dict()
    # The recipe recorded with the model describes the model saved (init_from's sizes).
    recorded = json.loads((final / "config.json").read_text())["training"]["config"]
    assert recorded["ar"] == json.loads((start / "config.json").read_text())["ar"]
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("codec.", "ar.", "resynthesizer.quantizer.")):
            assert same, k
    assert not all(
        torch.equal(before[k], after[k]) for k in before if k.startswith("resynthesizer.stack.")
    )


def test_freeze_rejects_unknown_parts(corpus: Path, codec_dir: Path) -> None:
    net = build_model(_cfg(corpus, Path("unused"), codec_dir))
    with pytest.raises(ValueError, match="unknown parts"):
        freeze(net, ("trunk",))


def test_ar_resume_matches_an_uninterrupted_run(
    corpus: Path, codec_dir: Path, tmp_path: Path
) -> None:
    full = train_ar(_cfg(corpus, tmp_path / "full", codec_dir, 4, 'model.latents="sample"'))
    train_ar(
        _cfg(corpus, tmp_path / "cut", codec_dir, 4, 'model.latents="sample"', "run.stop_at_step=2")
    )
    resumed = train_ar(
        _cfg(corpus, tmp_path / "cut", codec_dir, 4, 'model.latents="sample"'),
        resume=tmp_path / "cut",
    )
    a, b = load_model(str(full)).state_dict(), load_model(str(resumed)).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    la = [r["loss"] for r in read_log(tmp_path / "full" / "log.jsonl") if r["split"] == "train"]
    lb = [r["loss"] for r in read_log(tmp_path / "cut" / "log.jsonl") if r["split"] == "train"]
    assert la == lb and len(la) == 4


def test_latent_cache_is_reused_for_means_and_rebuilt_for_another_codec(
    corpus: Path, codec_dir: Path, tmp_path: Path
) -> None:
    from hertz_agents.train.codec_trainer import train_codec as _train_codec
    from hertz_agents.train.data import AudioSegmentDataset
    from hertz_agents.train.export import load_codec
    from hertz_agents.train.latents import cached_latents

    codec = load_codec(codec_dir)
    data = AudioSegmentDataset(corpus / "train", 2, 1.0, random_crop=False)
    path = tmp_path / "train.pt"
    stats = cached_latents(path, codec, data, 0, with_logvar=True, progress=False)  # [N, 2, T, 64]
    assert stats.shape[1:] == (2, 8, 64)
    means = cached_latents(path, codec, data, 0, with_logvar=False, progress=False)
    torch.testing.assert_close(means, stats[:, 0])  # read from the same file, not encoded again
    other = load_codec(
        _train_codec(
            load_codec_config("small_codec", codec_overrides(corpus, tmp_path / "c", steps=1))
        )
    )
    again = cached_latents(path, other, data, 0, with_logvar=False, progress=False)
    assert again.shape == means.shape and not torch.equal(again, means)
    # The same file names with other contents: encoded again, not read from the cache.
    changed = write_corpus(tmp_path / "changed", seed=7)
    same_names = AudioSegmentDataset(changed / "train", 2, 1.0, random_crop=False)
    assert [f.path.name for f in same_names.files] == [f.path.name for f in data.files]
    fresh = cached_latents(path, other, same_names, 0, with_logvar=False, progress=False)
    assert not torch.equal(fresh, again)
