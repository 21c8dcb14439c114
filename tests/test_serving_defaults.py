"""A model says how it is served: its context (``seq_len``) and its rollover (``serving``).

hertz-small was trained on 128 positions and is served at that context with a ring cache
(docs/engine.md "Its context"); hertz-dev keeps the original's 2048 positions and refill.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import ar_overrides, codec_overrides, write_corpus

from hertz_agents.benchmark import bench_ticks
from hertz_agents.checkpoint import load_model, read_config
from hertz_agents.config import HertzConfig
from hertz_agents.engine.stepper import Stepper
from hertz_agents.errors import CheckpointError
from hertz_agents.locations import locate
from hertz_agents.train.ar_trainer import build_model
from hertz_agents.train.codec_trainer import train_codec
from hertz_agents.train.config import RecipeError, load_ar_config, load_codec_config


def test_the_default_model_is_served_at_its_training_length_with_a_ring():
    model = load_model("default", device="cpu")
    stepper = Stepper(model, 1)
    assert (stepper.context, stepper.rollover) == (128, "ring")
    # the caller's choice wins over the model's
    assert Stepper(model, 1, rollover="refill").rollover == "refill"
    # the recipe that trains it says the same, so a retrained model is served the same way
    recipe = load_ar_config("small_ar", [])
    assert recipe.ar.seq_len == recipe.resynthesizer.seq_len == 128
    assert recipe.serving.rollover == "ring"
    assert recipe.data.segment_seconds * 16000 // 2000 == 128


def test_official_sizes_keep_the_original_context_and_refill():
    config = HertzConfig()
    assert config.serving.rollover == "refill" and config.ar.seq_len == 2048
    assert HertzConfig.from_dict(config.to_dict()) == config


def test_a_sink_without_a_ring_is_refused(tiny_model_dir):
    model = load_model(tiny_model_dir, device="cpu")  # official layout, no serving block
    assert model.config.serving.rollover == "refill"
    with pytest.raises(ValueError, match="rollover='ring'"):
        Stepper(model, 1, sink=2)
    with pytest.raises(ValueError, match="rollover='ring'"):
        bench_ticks(model, 1, 1, sink=2)


def test_a_bad_serving_block_names_the_file_and_the_field(tmp_path: Path):
    directory = tmp_path / "model"
    shutil.copytree(locate("default").directory, directory)
    raw = json.loads((directory / "config.json").read_text())
    raw["serving"] = {"rollover": "wrap"}
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"config.json.*serving.rollover.*refill"):
        read_config(directory)
    raw["serving"] = {"rolover": "ring"}
    (directory / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="unknown fields"):
        read_config(directory)


def test_training_segments_longer_than_the_context_are_refused(tmp_path_factory):
    corpus = write_corpus(tmp_path_factory.mktemp("corpus"))
    threads = torch.get_num_threads()  # training sets the process's threads (run.threads)
    try:
        recipe = codec_overrides(corpus, tmp_path_factory.mktemp("c"), 1)
        codec = train_codec(load_codec_config("small_codec", recipe))
    finally:
        torch.set_num_threads(threads)
    overrides = ar_overrides(corpus, Path("unused"), codec, 1)
    ok = build_model(load_ar_config("small_ar", [*overrides, "ar.seq_len=16"]))
    assert ok.config.serving.rollover == "ring" and torch.is_tensor(ok.ar.rotary.cos)
    long = [*overrides, "data.segment_seconds=2.25", "ar.seq_len=16"]  # 18 steps
    with pytest.raises(RecipeError, match=r"18 steps.*context \(16 steps"):
        build_model(load_ar_config("small_ar", long))


def test_the_command_line_refuses_a_sink_before_loading_a_refill_model(tiny_model_dir):
    for command in (["bench", "--steps", "1"], ["serve", "--port", "0"]):
        done = subprocess.run(
            [sys.executable, "-m", "hertz_agents.cli", *command, "--model", str(tiny_model_dir)]
            + ["--device", "cpu", "--sink", "4"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert "add --rollover ring" in done.stderr and "Traceback" not in done.stderr


def test_info_says_the_context_and_the_rollover():
    done = subprocess.run(
        [sys.executable, "-m", "hertz_agents.cli", "info", "--model", "default"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "context 128 steps (16 s), ring at a rollover" in done.stdout
