"""The command line, run as a user runs it: real files, real checkpoint directories, bad input."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
import torch
from reference import assert_close, load_reference
from tiny_checkpoints import write_codec_only_dir, write_official_dir

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
    assert (
        main(
            [
                "encode",
                "-m",
                str(tiny_model_dir),
                wav,
                "--out",
                str(sampled),
                "--sample",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    assert not np.allclose(np.load(sampled), latents)
    decoded = tmp_path / "decoded.wav"
    assert main(["decode", "-m", str(tiny_model_dir), str(out), "--out", str(decoded)]) == 0
    audio, rate = sf.read(decoded)
    assert rate == 16000 and audio.shape == (24000,)


@pytest.mark.parametrize("split", [True, False])
def test_generate_writes_the_requested_length_reproducibly(
    split, tiny_model_dir, mono_dir, tmp_path
):
    directory = tiny_model_dir if split else mono_dir
    rng = np.random.default_rng(0)
    prompt = _wav(
        tmp_path / "prompt.wav", (0.1 * rng.standard_normal((2, 44100))).astype(np.float32), 44100
    )
    outs = []
    for name in ("a.wav", "b.wav"):
        out = tmp_path / name
        args = [
            "generate",
            "-m",
            str(directory),
            "--prompt",
            prompt,
            "--seconds",
            "1.3",
            "--out",
            str(out),
        ]
        assert main(args + ["--seed", "3", "--temps", "0.8", "0.5", "0.1", "--top-p", "0.9"]) == 0
        audio, rate = sf.read(out, always_2d=True)
        outs.append(audio)
        assert rate == 16000 and audio.shape == (int(1.3 * 16000), 2 if split else 1)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_info_lists_variants_and_model_sizes(tiny_model_dir, capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in (
        "hertz-dev",
        "hertz-dev-mono",
        "hertz-dev-mono-audio",
        "inference_scion_54000.pt",
        "8,528.0 M",
    ):
        assert name in out
    assert main(["info", "--model", str(tiny_model_dir), "--md5"]) == 0
    assert "two-channel" in capsys.readouterr().out


def test_convert_writes_a_loadable_own_layout(tiny_model_dir, tmp_path):
    out = tmp_path / "converted"
    assert (
        main(["convert", "-m", str(tiny_model_dir), "--out", str(out), "--dtype", "float32"]) == 0
    )
    assert (out / "model.safetensors").exists()
    assert main(["bench", "-m", str(out), "--sessions", "2", "--steps", "2", "--json"]) == 0


def _run(args: list[str], env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-m", "hertz_agents.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def _assert_one_clear_line(result: subprocess.CompletedProcess, pattern: str) -> None:
    """Exit 2, no traceback, and one error line on stderr that matches ``pattern``."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0], re.IGNORECASE), lines[0]


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
def test_bad_audio_gets_a_clear_error_not_a_traceback(
    make_input, expected, tiny_model_dir, tmp_path
):
    import re

    path = tmp_path / "bad.wav"
    make_input(path)
    result = _run(
        [
            "generate",
            "-m",
            str(tiny_model_dir),
            "--prompt",
            str(path),
            "--seconds",
            "1",
            "--out",
            str(tmp_path / "o.wav"),
        ]
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert re.search(expected, result.stderr, re.IGNORECASE), result.stderr


def test_missing_and_corrupt_checkpoints_get_clear_errors(tmp_path):
    directory = write_official_dir(tmp_path / "ck")
    (directory / "inference_scion_54000.pt").unlink()
    wav = _wav(tmp_path / "in.wav", np.zeros(4000, dtype=np.float32))
    # generate needs the whole model (encode would not: it loads only the codec, which is there)
    result = _run(
        [
            "generate",
            "-m",
            str(directory),
            "--prompt",
            wav,
            "--seconds",
            "1",
            "--out",
            str(tmp_path / "o.wav"),
        ]
    )
    assert (
        result.returncode == 2
        and "hertz-agents download" in result.stderr
        and "Traceback" not in result.stderr
    )
    write_official_dir(directory)
    codec = directory / "inference_apatosaurus_95000.pt"
    codec.write_bytes(codec.read_bytes()[:500])
    result = _run(["encode", "-m", str(directory), wav, "--out", str(tmp_path / "l.npy")])
    assert (
        result.returncode == 2 and "corrupt" in result.stderr and "Traceback" not in result.stderr
    )


def test_chat_without_portaudio_says_how_to_install(monkeypatch):
    import builtins

    from hertz_agents.commands import chat
    from hertz_agents.errors import HertzError

    real_import = builtins.__import__

    def no_sounddevice(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    # stands in for a machine without PortAudio
    monkeypatch.setattr(builtins, "__import__", no_sounddevice)
    with pytest.raises(HertzError, match="apt-get install libportaudio2"):
        chat.import_sounddevice()


# --- the codec alone -----------------------------------------------------------------------


@pytest.mark.parametrize("config", ["block", "bare", "full"])
def test_encode_and_decode_work_on_a_codec_only_directory(config, tmp_path):
    """A directory with only inference_apatosaurus_95000.pt (+ config.json) reproduces the original
    encoder's posterior mean and decoder, at lengths and config.json shapes no other test uses."""
    codec_dir = write_codec_only_dir(tmp_path / "codec", config=config)
    _, t = load_reference("codec_tiny_a")
    # 1.0 s of the reference audio: the codec is causal, its 8 frames are the reference's first 8.
    wav = _wav(tmp_path / "in.wav", t["input.audio"][0, 0, :16000].numpy())
    out = tmp_path / "latents.npy"
    assert main(["encode", "-m", str(codec_dir), wav, "--out", str(out)]) == 0
    assert_close(torch.from_numpy(np.load(out)), t["output.mu"][0, :8])
    np.save(tmp_path / "mu.npy", t["output.mu"][0].numpy())
    decoded = tmp_path / "decoded.wav"
    mu = str(tmp_path / "mu.npy")
    assert main(["decode", "-m", str(codec_dir), mu, "--out", str(decoded)]) == 0
    audio, rate = sf.read(decoded, dtype="float32")
    assert rate == 16000
    assert_close(torch.from_numpy(audio), t["output.decoded_from_mu"][0, 0])


def test_generate_on_a_codec_only_directory_says_it_only_encodes(tmp_path):
    codec_dir = write_codec_only_dir(tmp_path / "codec")
    prompt = _wav(tmp_path / "p.wav", np.zeros(8000, dtype=np.float32))
    result = _run(
        [
            "generate",
            "-m",
            str(codec_dir),
            "--prompt",
            prompt,
            "--seconds",
            "1",
            "--out",
            str(tmp_path / "o.wav"),
        ]
    )
    _assert_one_clear_line(result, "only the codec.*encode")


def test_info_shows_a_codec_only_directory(tmp_path, capsys):
    codec_dir = write_codec_only_dir(tmp_path / "codec")
    assert main(["info", "--model", str(codec_dir)]) == 0
    out = capsys.readouterr().out
    assert "codec only" in out and "inference_apatosaurus_95000.pt" in out


def test_info_says_where_each_model_is(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HERTZ_AGENTS_CKPT", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"models folder: {tmp_path}" in out
    source = r"\((the checkout's ckpt/|the hertz-agents-small package)\)"
    assert re.search(rf"^default: \S+hertz-small {source}", out, re.M)
    assert f"hertz-dev: {tmp_path / 'hertz-dev'} (not present)" in out
    assert f"codec: {tmp_path / 'codec'} (not present)" in out


# --- user mistakes: one clear line, exit code 2, before any long work --------------------------

# --seconds 1e6 would take hours: each case below returns in seconds only if it is refused up front.
_LONG = ["--seconds", "1000000"]


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
    return _wav(tmp_path_factory.mktemp("prompt") / "p.wav", np.zeros((2, 8000), dtype=np.float32))


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--out", "{tmp}/no/such/folder/o.wav"], r"folder .*no/such/folder does not exist"),
        (["--out", "{tmp}/o.xyz"], r"unknown audio extension '\.xyz'"),
        (["--out", "{tmp}/o"], r"unknown audio extension '\(none\)'"),
        (["--out", "{tmp}"], r"is a folder"),
        (["--out", "{tmp}/o.wav", "--top-p", "5"], r"--top-p must be in \(0, 1\], got 5"),
        (["--out", "{tmp}/o.wav", "--min-p", "1.5"], r"--min-p must be in \[0, 1\)"),
        (["--out", "{tmp}/o.wav", "--temps", "-1", "0.5", "0.1"], r"--temps TOKEN must be >= 0"),
        (
            ["--out", "{tmp}/o.wav", "--temps", "0.8", "-0.5", "0.1"],
            r"--temps CATEGORICAL must be >= 0",
        ),
        (["--out", "{tmp}/o.wav", "--device", "cuda"], r"device 'cuda': .*use --device cpu"),
        (["--out", "{tmp}/o.wav", "--device", "gpu7"], r"unknown device 'gpu7'"),
    ],
    ids=[
        "missing-folder",
        "unknown-ext",
        "no-ext",
        "out-is-folder",
        "top-p",
        "min-p",
        "neg-token-temp",
        "neg-categorical-temp",
        "cuda-without-gpu",
        "bad-device",
    ],
)
def test_generate_refuses_bad_options_before_generating(
    extra, pattern, tiny_model_dir, prompt_wav, tmp_path
):
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    # CUDA_VISIBLE_DEVICES="" hides any GPU: --device cuda must be refused on every machine.
    result = _run(
        ["generate", "-m", str(tiny_model_dir), "--prompt", prompt_wav, *_LONG, *args],
        env={"CUDA_VISIBLE_DEVICES": ""},
        timeout=120,
    )
    _assert_one_clear_line(result, pattern)
    assert not list(tmp_path.glob("o*")), "nothing is written for a refused command"


def test_cuda_with_a_cpu_only_torch_says_to_install_the_cuda_build(monkeypatch):
    from hertz_agents.checkpoint import resolve_device
    from hertz_agents.errors import HertzError

    monkeypatch.setattr(torch.version, "cuda", None)  # what a CPU-only build of torch reports
    with pytest.raises(HertzError, match=r"CPU-only build.*--device cpu.*scripts/setup --cuda"):
        resolve_device("cuda")


def test_negative_seconds_is_refused(tiny_model_dir, prompt_wav, tmp_path):
    result = _run(
        [
            "generate",
            "-m",
            str(tiny_model_dir),
            "--prompt",
            prompt_wav,
            "--seconds",
            "-2",
            "--out",
            str(tmp_path / "o.wav"),
        ]
    )
    _assert_one_clear_line(result, r"--seconds must be a positive number")


def test_encode_writes_exactly_the_name_it_reports(tiny_model_dir, prompt_wav, tmp_path):
    out = tmp_path / "lat.NPY"
    result = _run(["encode", "-m", str(tiny_model_dir), prompt_wav, "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert f"wrote {out}:" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat.NPY"]
    assert np.load(out).shape == (4, 32)


@pytest.mark.parametrize(
    "out, pattern",
    [
        ("y.txt", r"latents are written as .npy; name the file e.g. y.npy"),
        ("missing/y.npy", r"folder .*missing does not exist"),
    ],
    ids=["txt", "missing-folder"],
)
def test_encode_refuses_an_output_it_would_not_write_as_named(
    out, pattern, tiny_model_dir, prompt_wav, tmp_path
):
    result = _run(["encode", "-m", str(tiny_model_dir), prompt_wav, "--out", str(tmp_path / out)])
    _assert_one_clear_line(result, pattern)
    assert not list(tmp_path.rglob("y*"))


@pytest.mark.parametrize(
    "content, pattern",
    [
        (
            b"RIFF\x00\x00\x00\x00WAVEfmt ",
            r"is not a .npy file; give a .npy file written by `hertz-agents encode`",
        ),
        (None, r"does not exist"),
    ],
    ids=["a-wav", "missing"],
)
def test_decode_of_something_else_than_latents_says_what_to_give(
    content, pattern, tiny_model_dir, tmp_path
):
    path = tmp_path / "latents.wav"
    if content is not None:
        path.write_bytes(content)
    out = str(tmp_path / "o.wav")
    result = _run(["decode", "-m", str(tiny_model_dir), str(path), "--out", out])
    _assert_one_clear_line(result, pattern)
    assert "allow_pickle" not in result.stderr


def test_decode_refuses_an_unknown_output_extension_before_loading(tiny_model_dir, tmp_path):
    np.save(tmp_path / "l.npy", np.zeros((3, 32), dtype=np.float32))
    latents, out = str(tmp_path / "l.npy"), str(tmp_path / "o.txt")
    result = _run(["decode", "-m", str(tiny_model_dir), latents, "--out", out])
    _assert_one_clear_line(result, r"unknown audio extension '\.txt'")


def test_decode_writes_flac_in_a_format_flac_supports(tiny_model_dir, tmp_path):
    np.save(tmp_path / "l.npy", np.zeros((3, 32), dtype=np.float32))
    latents, out = str(tmp_path / "l.npy"), str(tmp_path / "o.flac")
    assert main(["decode", "-m", str(tiny_model_dir), latents, "--out", out]) == 0
    info = sf.info(tmp_path / "o.flac")
    assert info.format == "FLAC" and info.frames == 6000


def test_an_empty_model_folder_is_not_told_to_download_into_it(tmp_path, prompt_wav):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _run(
        [
            "generate",
            "-m",
            str(empty),
            "--prompt",
            prompt_wav,
            "--seconds",
            "1",
            "--out",
            str(tmp_path / "o.wav"),
        ]
    )
    _assert_one_clear_line(result, r"holds no model: a checkpoint directory has model.safetensors")
    assert "--dir" not in result.stderr and "GB" not in result.stderr


def test_download_offline_fails_at_once_with_one_message_and_leaves_no_folder(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dest = tmp_path / "models" / "codec"
    start = time.monotonic()
    result = _run(
        ["download", "--variant", "codec", "--dir", str(dest)],
        env={"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HUB_OFFLINE": "0"},
    )
    elapsed = time.monotonic() - start
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1 and "Retrying" not in result.stderr, result.stderr
    assert "offline or the endpoint is unreachable" in result.stderr
    assert "inference_apatosaurus_95000.pt" in result.stderr
    assert "inference_volcano_3.pt" not in result.stderr
    assert not (tmp_path / "models").exists(), "a failed download leaves no empty folder"
    # Without the fix, the Hub client's backoff alone took about 25 s.
    assert elapsed < 20, elapsed


def test_download_with_hf_hub_offline_fails_without_a_folder(tmp_path):
    result = _run(
        ["download", "--variant", "codec", "--dir", str(tmp_path / "m")],
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "offline" in result.stderr
    assert not (tmp_path / "m").exists()


class _NoSoundDevices:
    """Stands in for the sounddevice module on a machine whose PortAudio sees no device (as on a
    server): query_devices raises as the real one does there."""

    class PortAudioError(Exception):
        pass

    @staticmethod
    def query_devices(kind=None):
        raise ValueError(f"No {kind} device matching ''")


def test_chat_without_a_sound_device_says_so_before_loading(monkeypatch, tiny_model_dir, capsys):
    from hertz_agents.commands import chat

    monkeypatch.setattr(chat, "import_sounddevice", lambda: _NoSoundDevices)
    loaded = []
    monkeypatch.setattr("hertz_agents.engine.load_engine", lambda *a, **k: loaded.append(a))
    assert main(["chat", "-m", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "no sound input device" in err and "pip install" not in err and "nan" not in err.lower()
    assert not loaded


def test_chat_summary_is_quiet_when_no_step_ran(capsys):
    from hertz_agents.commands.chat import _print_summary
    from hertz_agents.metrics import SessionMetrics

    _print_summary(SessionMetrics().snapshot())
    assert capsys.readouterr().out == ""


def test_cli_default_temperatures_are_the_sampling_defaults():
    from hertz_agents.commands.common import DEFAULT_TEMPS
    from hertz_agents.sampling import SamplingSettings

    d = SamplingSettings()
    assert DEFAULT_TEMPS == (d.token_temp, d.categorical_temp, d.gaussian_temp)
