"""The codec phase: it trains, exports a loadable codec, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import codec_overrides, write_corpus

from hertz_agents.train.codec_trainer import train_codec
from hertz_agents.train.config import load_codec_config
from hertz_agents.train.export import load_codec
from hertz_agents.train.logs import read_log


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def _train(corpus: Path, out: Path, steps: int, resume: Path | None = None, stop: int = 0) -> Path:
    cfg = load_codec_config(
        "small_codec", [*codec_overrides(corpus, out, steps), f"run.stop_at_step={stop}"]
    )
    return train_codec(cfg, resume=resume)


def test_codec_phase_trains_and_exports_a_loadable_codec(corpus: Path, tmp_path: Path) -> None:
    final = _train(corpus, tmp_path / "run", steps=4)
    codec = load_codec(final)
    meta = json.loads((final / "config.json").read_text())
    assert meta["format"] == "hertz-agents-codec" and meta["training"]["steps"] == 4
    assert codec.config.encode_channels == 2
    records = read_log(tmp_path / "run" / "log.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(
        k in train[-1] for k in ("mel", "spectral", "kl", "adversarial", "feature", "disc")
    )  # critics on
    val = [r for r in records if r["split"] == "val"]
    assert val and all(torch.isfinite(torch.tensor(r["mel_distance"])) for r in val)
    for name in ("original", "roundtrip"):  # samples to listen to at each validation
        assert (tmp_path / "run" / "samples" / "step_0000004" / f"{name}.wav").exists()
    assert (tmp_path / "run" / "best" / "codec.safetensors").exists()
    # The inference model has plain weights: no weight-norm parametrizations in the export.
    assert not any("parametrizations" in k for k in codec.state_dict())


def test_codec_resume_matches_an_uninterrupted_run(corpus: Path, tmp_path: Path) -> None:
    full = _train(corpus, tmp_path / "full", steps=4)
    _train(corpus, tmp_path / "cut", steps=4, stop=2)  # stops after the checkpoint at step 2
    resumed = _train(corpus, tmp_path / "cut", steps=4, resume=tmp_path / "cut")
    a, b = load_codec(full).state_dict(), load_codec(resumed).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    log_full = [r for r in read_log(tmp_path / "full" / "log.jsonl") if r["split"] == "train"]
    log_cut = [r for r in read_log(tmp_path / "cut" / "log.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in log_cut] == [1, 2, 3, 4]  # the resumed log reads as one run
    for x, y in zip(log_full, log_cut, strict=True):
        assert x["loss"] == y["loss"] and x.get("disc") == y.get("disc"), (x, y)
