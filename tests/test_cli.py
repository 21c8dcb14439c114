"""The command line, run as a user runs it: real files, real checkpoint directories, bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from reference import assert_close, load_reference
from tiny_checkpoints import write_official_dir

from hertz_agents.cli import main

COMMANDS = ["generate", "encode", "decode", "info", "download", "convert", "bench", "chat"]


@pytest.fixture(scope="module")
def mono_dir(tmp_path_factory):
    return write_official_dir(tmp_path_factory.mktemp("tiny-mono"), split=False)


def _wav(path, audio: np.ndarray, rate: int = 16000) -> str:
    sf.write(path, audio.T if audio.ndim == 2 else audio, rate, subtype="FLOAT")
    return str(path)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_encode_reproduces_the_original_posterior_mean(tiny_model_dir, tmp_path):
    _, t = load_reference("codec_tiny_a")
    wav = _wav(tmp_path / "in.wav", t["input.audio"][0, 0].numpy())
    out = tmp_path / "latents.npy"
    assert main(["encode", "-m", str(tiny_model_dir), wav, "--out", str(out)]) == 0
    latents = np.load(out)
    assert latents.shape == (12, 32) and latents.dtype == np.float32
    import torch

    assert_close(torch.from_numpy(latents), t["output.mu"][0])
    sampled = tmp_path / "sampled.npy"
    assert main(["encode", "-m", str(tiny_model_dir), wav, "--out", str(sampled), "--sample", "--seed", "1"]) == 0
    assert not np.allclose(np.load(sampled), latents)
    decoded = tmp_path / "decoded.wav"
    assert main(["decode", "-m", str(tiny_model_dir), str(out), "--out", str(decoded)]) == 0
    audio, rate = sf.read(decoded)
    assert rate == 16000 and audio.shape == (24000,)


@pytest.mark.parametrize("split", [True, False])
def test_generate_writes_the_requested_length_reproducibly(split, tiny_model_dir, mono_dir, tmp_path):
    directory = tiny_model_dir if split else mono_dir
    rng = np.random.default_rng(0)
    prompt = _wav(tmp_path / "prompt.wav", (0.1 * rng.standard_normal((2, 44100))).astype(np.float32), 44100)
    outs = []
    for name in ("a.wav", "b.wav"):
        out = tmp_path / name
        args = ["generate", "-m", str(directory), "--prompt", prompt, "--seconds", "1.3", "--out", str(out)]
        assert main(args + ["--seed", "3", "--temps", "0.8", "0.5", "0.1", "--top-p", "0.9"]) == 0
        audio, rate = sf.read(out, always_2d=True)
        outs.append(audio)
        assert rate == 16000 and audio.shape == (int(1.3 * 16000), 2 if split else 1)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_info_lists_variants_and_model_sizes(tiny_model_dir, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("hertz-dev", "hertz-dev-mono", "hertz-dev-mono-audio", "inference_scion_54000.pt", "8,528.0 M"):
        assert name in out
    assert main(["info", "--model", str(tiny_model_dir), "--md5"]) == 0
    assert "two-channel" in capsys.readouterr().out


def test_convert_writes_a_loadable_own_layout(tiny_model_dir, tmp_path):
    out = tmp_path / "converted"
    assert main(["convert", "-m", str(tiny_model_dir), "--out", str(out), "--dtype", "float32"]) == 0
    assert (out / "model.safetensors").exists()
    assert main(["bench", "-m", str(out), "--sessions", "2", "--steps", "2", "--json"]) == 0


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hertz_agents.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "make_input, expected",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"RIFF\x00\x00garbage"), "could not read .* as audio|damaged"),
        (lambda p: _wav(p, np.full(4000, np.nan, dtype=np.float32)), "NaN"),
        (lambda p: _wav(p, np.zeros(100, dtype=np.float32)), "short"),
    ],
    ids=["empty", "corrupt", "nan", "too-short"],
)
def test_bad_audio_gets_a_clear_error_not_a_traceback(make_input, expected, tiny_model_dir, tmp_path):
    import re

    path = tmp_path / "bad.wav"
    make_input(path)
    result = _run(["generate", "-m", str(tiny_model_dir), "--prompt", str(path), "--seconds", "1", "--out",
                   str(tmp_path / "o.wav")])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(expected, result.stderr, re.IGNORECASE), result.stderr


def test_missing_and_corrupt_checkpoints_get_clear_errors(tmp_path):
    directory = write_official_dir(tmp_path / "ck")
    (directory / "inference_scion_54000.pt").unlink()
    wav = _wav(tmp_path / "in.wav", np.zeros(4000, dtype=np.float32))
    result = _run(["encode", "-m", str(directory), wav, "--out", str(tmp_path / "l.npy")])
    assert result.returncode == 2 and "hertz-agents download" in result.stderr and "Traceback" not in result.stderr
    write_official_dir(directory)
    codec = directory / "inference_apatosaurus_95000.pt"
    codec.write_bytes(codec.read_bytes()[:500])
    result = _run(["encode", "-m", str(directory), wav, "--out", str(tmp_path / "l.npy")])
    assert result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr


def test_chat_without_portaudio_says_how_to_install(monkeypatch):
    import builtins

    from hertz_agents.commands import chat
    from hertz_agents.errors import HertzError

    real_import = builtins.__import__

    def no_sounddevice(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sounddevice)  # stands in for a machine without PortAudio
    with pytest.raises(HertzError, match="apt-get install libportaudio2"):
        chat.import_sounddevice()
