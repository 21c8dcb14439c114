"""Training recipes: TOML into dataclasses, strict about typos, overridable from the command
line; the shipped recipes are consistent; the `train` commands parse."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hertz_agents.train.cli import add_train_commands
from hertz_agents.train.config import CONFIG_DIR, load_ar_config, load_codec_config, parse_overrides
from hertz_agents.train.loop import make_optimizer, make_scheduler


def test_overrides_parse_toml_values_and_bare_strings() -> None:
    got = parse_overrides(
        ["optim.lr=3e-4", "run.device=cpu", 'model.freeze=["codec","ar"]', "log.plot=false"]
    )
    assert got == {
        "optim": {"lr": 3e-4},
        "run": {"device": "cpu"},
        "model": {"freeze": ["codec", "ar"]},
        "log": {"plot": False},
    }


def test_unknown_tables_and_keys_are_errors_naming_the_known_ones(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nstep = 10\n")
    with pytest.raises(ValueError, match="unknown keys \\['step'\\].*steps"):
        load_codec_config(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        load_ar_config(None, ["codec.encode_channels=4"])  # [codec] is the codec phase's table


def test_shipped_recipes_load_and_the_small_vocab_matches_its_codebook() -> None:
    assert {p.stem for p in CONFIG_DIR.glob("*.toml")} >= {
        "small_codec",
        "small_ar",
        "finetune_ar",
        "codec",
    }
    for p in CONFIG_DIR.glob("*.toml"):
        (load_codec_config if "codec" in p.stem else load_ar_config)(p)
    ar = load_ar_config("small_ar")
    assert ar.ar.vocab_size == ar.quantizer.codebook_size
    assert ar.model.split and ar.data.channels == 2
    codec = load_codec_config("small_codec")
    assert codec.codec.encode_channels == 8 and codec.codec.strides == (2, 2, 4, 5, 5, 5)


def test_schedule_warms_up_then_decays_to_the_floor() -> None:
    import torch

    cfg = load_ar_config(
        None, ["optim.steps=100", "optim.warmup_steps=10", "optim.lr=1.0", "optim.min_lr_ratio=0.1"]
    )
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(2, 2))], cfg.optim)
    sched = make_scheduler(opt, cfg.optim)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and all(
        a >= b for a, b in zip(lrs[9:], lrs[10:], strict=False)
    )


def test_train_commands_parse() -> None:
    parser = argparse.ArgumentParser(prog="hertz-agents")
    add_train_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["train", "ar", "--config", "small_ar", "--set", "optim.steps=5", "--resume"]
    )
    assert (
        args.phase == "ar"
        and args.overrides == ["optim.steps=5"]
        and args.resume == "latest"
        and callable(args.func)
    )
    args = parser.parse_args(["train", "small", "--ckpt", "x"])
    assert args.ckpt == "x" and args.func.__name__ == "run_small_command"
