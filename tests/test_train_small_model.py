"""The shipped small model (ckpt/hertz-small): it loads as the default model, stays small,
says what it is, and runs the streaming step the engine runs."""

from __future__ import annotations

import json

import pytest
import torch

from hertz_agents.checkpoint import DEFAULT_DIR_NAME, ckpt_root, count_parameters, load_model
from hertz_agents.train.bench import measure_step
from hertz_agents.train.config import load_ar_config, load_codec_config

SMALL = ckpt_root() / DEFAULT_DIR_NAME
pytestmark = pytest.mark.skipif(
    not (SMALL / "model.safetensors").exists(), reason="ckpt/hertz-small not built"
)


def test_small_model_loads_as_default_and_is_under_30_mb() -> None:
    net = load_model("default", device="cpu", dtype=torch.float32)
    assert (SMALL / "model.safetensors").stat().st_size < 30e6
    assert count_parameters(net) * 4 < 30e6
    assert net.config.split and net.channels == 2


def test_small_model_matches_its_recipe_and_says_it_is_not_conversational() -> None:
    meta = json.loads((SMALL / "config.json").read_text())
    assert "NOT a conversational model" in meta["notes"]
    ar, codec = load_ar_config("small_ar"), load_codec_config("small_codec")
    assert meta["ar"]["dim"] == ar.ar.dim and meta["ar"]["vocab_size"] == ar.ar.vocab_size
    assert meta["codec"]["encode_channels"] == codec.codec.encode_channels
    quality = meta["training"]["quality"]
    assert quality["ar_val"]["ce_nats"] < quality["ar_val"]["unigram_ce_nats"]


def test_small_model_steps_a_session() -> None:
    net = load_model("default", device="cpu", dtype=torch.float32)
    cost = measure_step(net, batch=2, steps=3, warmup=1, context=8)
    assert cost.total_ms > 0
