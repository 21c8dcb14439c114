"""Recipe mistakes through the `train` command: each is one line on stderr naming the key, exit
code 2, no traceback, and nothing is done (no run folder, no model loaded, no data scanned)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import write_corpus

from hertz_agents.train.cli import main


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"), files=1, seconds=1.0)


@pytest.fixture()
def base(corpus: Path, tmp_path: Path) -> list[str]:
    codec = tmp_path / "codec"
    codec.mkdir()
    return [
        "--set", f'run.out_dir="{tmp_path / "run"}"',
        "--set", f'data.train="{corpus / "train"}"',
        "--set", f'data.val="{corpus / "val"}"',
        "--set", f'model.codec_from="{codec}"',
        "--set", "run.device=cpu",
    ]  # fmt: skip


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], expect: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert err.startswith("error: ") and expect in err, err
    return err


AR_MISTAKES = [
    (["optim.stepz=5"], "unknown keys ['stepz']"),
    (["trainer.steps=5"], "unknown keys ['trainer']"),
    (["optim.steps=10.5"], "optim.steps must be a whole number"),
    (['optim.steps="ten"'], "optim.steps must be a whole number"),
    (["optim.steps=true"], "optim.steps must be a whole number"),
    (["optim.steps=0"], "optim.steps must be at least 1"),
    (["optim.batch_size=-2"], "optim.batch_size must be at least 1"),
    (["optim.lr=0"], "optim.lr must be above 0"),
    (['optim.lr="fast"'], "optim.lr must be a number"),
    (["optim.betas=[0.9]"], "optim.betas must be a list of 2 values"),
    (["optim.betas=[0.9, 1.5]"], "optim.betas[1] must be in [0, 1)"),
    (['optim.schedule="linear"'], "optim.schedule must be one of"),
    (['optim.optimizer="sgd"'], "optim.optimizer must be one of"),
    (["optim.min_lr_ratio=2"], "optim.min_lr_ratio must be between 0 and 1"),
    (["log.every=0"], "log.every must be at least 1"),
    (["log.plot=1"], "log.plot must be true or false"),
    (['model.freeze="codec"'], "model.freeze must be a list"),  # not split into letters
    (['model.freeze=["codec","trunk"]'], "model.freeze has unknown parts ['trunk']"),
    (['model.latents="median"'], "model.latents must be one of"),
    (['model.init_from="no/such/model"'], "model.init_from: no model"),
    (["data.train=/no/such/folder"], "data.train: no such folder"),
    (["data.val=/no/such/folder"], "data.val: no such folder"),
    (["data.channels=3"], "data.channels must be one of"),
    (["data.segment_seconds=0.01"], "data.segment_seconds must be at least one model step"),
    (["data.workers=-1"], "data.workers must be at least 0"),
    (['run.precision="fp16"'], "run.precision must be one of"),
    (['run.strategy="zero3"'], "run.strategy must be one of"),
    (['run.device="tpu"'], "run.device must be"),
    (['run.on_nonfinite="ignore"'], "run.on_nonfinite must be one of"),
    (["ar.vocab_size=100"], "ar.vocab_size 100 != the quantizer's codebook"),
    (["ar.dim=[1]"], "ar.dim must be a whole number"),
    (['quantizer.fsq_levels="8,8"'], "quantizer.fsq_levels must be a list"),
    (["lora.rank=-1"], "lora.rank must be at least 0"),
    (['lora.base_dtype="int4"'], "lora.base_dtype must be one of"),
    (["optim=3"], "optim is a table"),
    (["optim.steps.x=3"], "optim.steps must be a whole number, got {'x': 3}"),
    (["optim.steps"], "is not key=value"),
]


@pytest.mark.parametrize(("overrides", "expect"), AR_MISTAKES, ids=[m[1][:40] for m in AR_MISTAKES])
def test_ar_recipe_mistakes_are_one_line_and_exit_2_before_any_work(
    capsys: pytest.CaptureFixture[str],
    base: list[str],
    tmp_path: Path,
    overrides: list[str],
    expect: str,
) -> None:
    argv = ["ar", "--config", "small_ar", *base]
    for item in overrides:
        argv += ["--set", item]
    _fails(capsys, argv, expect)
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_on_a_machine_without_it_is_refused(
    capsys: pytest.CaptureFixture[str], base: list[str]
) -> None:
    _fails(
        capsys,
        ["ar", "--config", "small_ar", *base, "--set", 'run.device="cuda"'],
        "has no CUDA GPU",
    )


def test_codec_recipe_mistakes(
    capsys: pytest.CaptureFixture[str], corpus: Path, tmp_path: Path
) -> None:
    base = [
        "codec", "--config", "small_codec",
        "--set", f'run.out_dir="{tmp_path / "run"}"',
        "--set", f'data.train="{corpus / "train"}"',
        "--set", f'data.val="{corpus / "val"}"',
    ]  # fmt: skip
    _fails(capsys, [*base, "--set", 'run.strategy="fsdp"'], "the codec trains with")
    _fails(
        capsys, [*base, "--set", 'discriminator.loss="wgan"'], "discriminator.loss must be one of"
    )
    _fails(capsys, [*base, "--set", "codec.strides=5"], "codec.strides must be a list")
    _fails(capsys, [*base, "--set", 'init_from="nowhere"'], "init_from: no model")
    _fails(capsys, [*base, "--set", "loss.kl=-1"], "loss.kl must be at least 0")


def test_missing_or_broken_recipe_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    _fails(capsys, ["ar", "--config", "no_such_recipe"], "no recipe 'no_such_recipe'")
    broken = tmp_path / "broken.toml"
    broken.write_text("[optim\nsteps = 3\n")
    _fails(capsys, ["ar", "--config", str(broken)], "is not valid TOML")


def test_resume_without_a_checkpoint_is_an_error_unless_asked_to_start_fresh(
    capsys: pytest.CaptureFixture[str], base: list[str]
) -> None:
    _fails(capsys, ["ar", "--config", "small_ar", *base, "--resume"], "has no checkpoint to resume")
    _fails(
        capsys,
        ["ar", "--config", "small_ar", *base, "--resume", "/no/such/ckpt"],
        "not a checkpoint",
    )


def test_the_real_command_exits_2_with_one_line(corpus: Path, tmp_path: Path) -> None:
    """In a fresh process, as a user runs it: the exit status and stderr they see."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "hertz_agents.train.cli", "ar", "--config", "finetune_ar",
           "--set", "optim.steps=10.5", "--set", f'data.train="{corpus / "train"}"']  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "error: optim.steps must be a whole number, got 10.5"
