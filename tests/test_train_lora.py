"""LoRA: adapters hang on the model from outside (names and weights untouched), a new adapter
changes nothing, merging equals the hooked model, the finetune_lora recipe trains adapters only
on first use with 4-30 s stereo files (base frozen, adapter-only checkpoints and result),
resumes exactly, and the result loads through load_model(adapter=), `train merge` and
`serve --adapter`."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from train_fixtures import write_corpus

from hertz_agents.checkpoint import load_model
from hertz_agents.errors import CheckpointError
from hertz_agents.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoRAAdapters,
    LoRASpec,
    merge_adapter,
    save_adapter,
)
from hertz_agents.train.ar_trainer import NextStepObjective, train_ar
from hertz_agents.train.cli import main
from hertz_agents.train.config import load_ar_config
from hertz_agents.train.logs import read_log

BASE = "default"  # the shipped small model stands in for hertz-dev (17 GB, not downloadable here)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ordinary recordings: two of 4 s and one of 30 s, stereo, one speaker per channel."""
    root = write_corpus(tmp_path_factory.mktemp("corpus"), files=2, seconds=4.0)
    long = write_corpus(tmp_path_factory.mktemp("long"), files=1, seconds=30.0, seed=1)
    shutil.copy(long / "train" / "c0.wav", root / "train" / "long.wav")
    return root


def _recipe(corpus: Path, out: Path, steps: int, *extra: str):
    """The shipped recipe as a user runs it, with the small base and a CPU-sized batch."""
    return load_ar_config(
        "finetune_lora",
        [
            f'run.out_dir="{out}"',
            f'data.train="{corpus / "train"}"',
            f'data.val="{corpus / "val"}"',
            f'model.init_from="{BASE}"',
            f"optim.steps={steps}",
            "optim.batch_size=2",
            "optim.grad_accum=1",
            "optim.warmup_steps=1",
            "optim.lr=3e-3",
            "log.every=1",
            "log.val_every=2",
            "log.ckpt_every=2",
            "log.progress=false",
            "log.plot=false",
            "data.workers=0",
            "data.val_items=2",
            "run.threads=1",
            "lora.rank=4",
            *extra,
        ],
    )


def test_a_new_adapter_changes_nothing_and_merging_equals_the_hooked_model(tmp_path: Path) -> None:
    net = load_model(BASE, device="cpu", dtype=torch.float32)
    names = sorted(net.state_dict())
    latents = torch.randn(1, 12, 64)
    before = NextStepObjective(net)(latents)
    adapters = LoRAAdapters.attach(net, LoRASpec(rank=4, alpha=8))
    assert sorted(net.state_dict()) == names  # the model's own names are untouched
    assert len(adapters.paths) == 4 * (4 + 2)  # 4 projections x (4 trunk + 2 resynthesizer blocks)
    assert not any(".quantizer." in p for p in adapters.paths)
    after = NextStepObjective(net)(latents)
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    with torch.no_grad():
        for p in adapters.parameters():
            p.normal_(0, 0.05)
    hooked = NextStepObjective(net)(latents)
    assert not torch.allclose(hooked[0], before[0])
    adapters.detach()
    torch.testing.assert_close(NextStepObjective(net)(latents)[0], before[0], rtol=0, atol=0)
    folder = save_adapter(adapters, tmp_path / "adapter")
    merged = merge_adapter(load_model(BASE, device="cpu", dtype=torch.float32), folder)
    for x, y in zip(hooked, NextStepObjective(merged)(latents), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_an_adapter_for_another_model_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    net = load_model(BASE, device="cpu", dtype=torch.float32)
    folder = save_adapter(
        LoRAAdapters.attach(net, LoRASpec(rank=2)), tmp_path / "a", base_model=BASE
    )
    with pytest.raises(CheckpointError, match="it was trained on default"):
        load_model(tiny_model_dir, device="cpu", dtype=torch.float32, adapter=folder)


@pytest.fixture(scope="module")
def lora_run(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "run"
    train_ar(_recipe(corpus, out, 4))
    return out


def test_finetune_lora_trains_adapters_only_on_4_to_30_s_files(lora_run: Path) -> None:
    final = lora_run / "final"
    assert (final / ADAPTER_CONFIG).exists() and (final / ADAPTER_WEIGHTS).exists()
    assert not (final / "model.safetensors").exists()  # adapter-only result
    state = torch.load(lora_run / "checkpoints" / "step_0000004" / "trainer.pt", weights_only=False)
    assert set(state["modules"]) == {"lora"}  # adapter-only checkpoints
    assert all(".lora_" in k for k in state["modules"]["lora"])
    train = [r for r in read_log(lora_run / "log.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and train[-1]["loss"] < train[0]["loss"]
    val = [r for r in read_log(lora_run / "log.jsonl") if r["split"] == "val"]
    assert val[0]["step"] == 0  # a baseline before the first step
    for name in ("continuation", "roundtrip"):  # samples to hear, through the adapted model
        assert (lora_run / "samples" / "step_0000004" / f"{name}.wav").stat().st_size > 1000


def test_the_adapter_loads_merged_and_through_train_merge(lora_run: Path, tmp_path: Path) -> None:
    base = load_model(BASE, device="cpu", dtype=torch.float32)
    tuned = load_model(BASE, device="cpu", dtype=torch.float32, adapter=lora_run / "final")
    changed = [k for k, v in base.state_dict().items() if not torch.equal(v, tuned.state_dict()[k])]
    assert changed and all(".layers." in k and "quantizer" not in k for k in changed)
    assert (
        main(
            [
                "merge",
                "--model",
                BASE,
                "--adapter",
                str(lora_run / "final"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
        == 0
    )
    merged = load_model(tmp_path / "m", device="cpu", dtype=torch.float32)
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(merged.state_dict()[k], v, rtol=0, atol=0)


def test_lora_resume_matches_an_uninterrupted_run(
    lora_run: Path, corpus: Path, tmp_path: Path
) -> None:
    cut = tmp_path / "cut"
    train_ar(_recipe(corpus, cut, 4, "run.stop_at_step=2"))
    train_ar(_recipe(corpus, cut, 4), resume=cut)
    a = torch.load(lora_run / "checkpoints" / "step_0000004" / "trainer.pt", weights_only=False)
    b = torch.load(cut / "checkpoints" / "step_0000004" / "trainer.pt", weights_only=False)
    for k, v in a["modules"]["lora"].items():
        torch.testing.assert_close(b["modules"]["lora"][k], v, rtol=0, atol=0, msg=k)


def test_serve_takes_an_adapter_and_refuses_a_wrong_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from hertz_agents.cli import main as hertz_main

    code = hertz_main(["serve", "--model", BASE, "--adapter", str(tmp_path), "--port", "0"])
    assert code == 2
    assert "not a LoRA adapter" in capsys.readouterr().err
