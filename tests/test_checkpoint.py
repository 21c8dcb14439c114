"""Loading checkpoints: official layout with config.json, own layout, full-size keys, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from reference import REFERENCE_DIR, assert_close, load_reference
from tiny_checkpoints import write_official_dir

from hertz_agents.checkpoint import load_model, load_official_states, save_model
from hertz_agents.config import HertzConfig
from hertz_agents.errors import CheckpointError, ModelNotFound
from hertz_agents.model.hertz import HertzModel
from hertz_agents.registry import VARIANTS

FULL_SECTIONS = {
    "hertz-dev": (
        "codec (inference_apatosaurus_95000)",
        "quantizer (inference_volcano_3)",
        "resynthesizer split (inference_care_50000)",
        "ar split (inference_scion_54000)",
    ),
    "hertz-dev-mono": (
        "codec (inference_apatosaurus_95000)",
        "quantizer (inference_volcano_3)",
        "resynthesizer mono (inference_whip_72000)",
        "ar mono (inference_caraway_112000, inference_syrup_110000)",
    ),
}
# caraway and syrup share one layout (one section in keys_full.json): all seven files are covered.
FULL_SECTIONS["hertz-dev-mono-audio"] = FULL_SECTIONS["hertz-dev-mono"]


@pytest.mark.parametrize("split", [True, False])
def test_official_layout_with_config_reproduces_reference(tmp_path, split):
    directory = write_official_dir(tmp_path / "tiny", split=split)
    net = load_model(directory, device="cpu")
    assert net.config.split is split
    _, codec_t = load_reference("codec_tiny_a")
    with torch.no_grad():
        mu, _ = net.codec.posterior(codec_t["input.audio"])
    assert_close(mu, codec_t["output.mu"])
    _, ar_t = load_reference("ar_split_tiny_a" if split else "ar_mono_tiny_a")
    with torch.no_grad():
        logits = net.ar(ar_t["input.latents"])
    assert_close(logits[0], ar_t["output.logits_full_1" if split else "output.logits_full"])


@pytest.mark.parametrize("variant", list(FULL_SECTIONS))
def test_full_size_official_keys_and_shapes_load_on_meta_device(variant):
    """All seven official files' keys and shapes fit the full-size model, allocating no memory."""
    keys_path = REFERENCE_DIR / "keys_full.json"
    if not keys_path.exists():
        pytest.skip("shared/reference/keys_full.json not found")
    sections = json.loads(keys_path.read_text())
    codec_keys = dict(sections[FULL_SECTIONS[variant][0]])
    # The official codec file also holds keys the model never used; they must be accepted.
    codec_keys["recon_metric.metrics.0.window"] = [512]
    codec_keys["encoder.res_stack.0.pad_buffer"] = [1, 1, 6]
    states = {}
    for role, section in zip(("codec", "quantizer", "resynthesizer", "ar"), FULL_SECTIONS[variant]):
        shapes = codec_keys if role == "codec" else sections[section]
        states[role] = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    with torch.device("meta"):
        net = HertzModel(HertzConfig(split=VARIANTS[variant].split))
    load_official_states(net, states, {r: r for r in states})
    assert all(p.is_meta for p in net.parameters())
    assert 8.3e9 < sum(p.numel() for p in net.parameters()) < 8.6e9  # the 8.5B model


def test_unexpected_and_misshaped_keys_are_named(tmp_path):
    directory = write_official_dir(tmp_path / "tiny")
    ar_file = directory / VARIANTS["hertz-dev"].file("ar").name
    state = torch.load(ar_file)
    state["layers.0.extra.weight"] = torch.zeros(1)
    state["input.weight"] = torch.zeros(3, 3)
    del state["output.norm.weight"]
    torch.save(state, ar_file)
    with pytest.raises(CheckpointError) as info:
        load_model(directory, device="cpu")
    message = str(info.value)
    for name in ("layers.0.extra.weight", "input.weight", "output.norm.weight", ar_file.name):
        assert name in message


def test_unknown_codec_key_is_rejected(tmp_path):
    directory = write_official_dir(tmp_path / "tiny")
    codec_file = directory / VARIANTS["hertz-dev"].file("codec").name
    state = torch.load(codec_file)
    state["decoder.surprise"] = torch.zeros(1)
    torch.save(state, codec_file)
    with pytest.raises(CheckpointError, match="decoder.surprise"):
        load_model(directory, device="cpu")


def test_truncated_file_gives_a_clear_error(tmp_path):
    directory = write_official_dir(tmp_path / "tiny")
    path = directory / VARIANTS["hertz-dev"].file("resynthesizer").name
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_model(directory, device="cpu")


def test_missing_file_says_how_to_download(tmp_path):
    directory = write_official_dir(tmp_path / "tiny")
    (directory / VARIANTS["hertz-dev"].file("ar").name).unlink()
    with pytest.raises(ModelNotFound, match="hertz-agents download"):
        load_model(directory, device="cpu")


def test_own_layout_round_trips(tmp_path):
    net = load_model(write_official_dir(tmp_path / "tiny"), device="cpu")
    out = save_model(net, tmp_path / "own")
    again = load_model(out, device="cpu")
    for (k, a), (_, b) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        load_model(out, device="cpu")


def test_unknown_model_name(tmp_path):
    with pytest.raises(ModelNotFound, match="hertz-dev"):
        load_model(str(Path(tmp_path) / "nope"))


# --- the codec alone ------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["block", "bare", "none"])
def test_load_codec_from_a_codec_only_directory(tmp_path, config):
    from tiny_checkpoints import write_codec_only_dir

    from hertz_agents.checkpoint import is_codec_only, load_codec

    directory = write_codec_only_dir(tmp_path / "codec", config=config)
    assert is_codec_only(directory)
    if config == "none":  # no config.json: the official sizes, which the tiny weights do not fit
        with pytest.raises(CheckpointError, match="config.json must give its sizes"):
            load_codec(directory, device="cpu")
        return
    codec = load_codec(directory, device="cpu")
    _, t = load_reference("codec_tiny_a")
    assert_close(codec.encode(t["input.audio"]), t["output.mu"])
    assert_close(codec.decode(t["output.mu"]), t["output.decoded_from_mu"])
    assert not any(p.requires_grad for p in codec.parameters())


def test_load_codec_of_full_models_in_both_layouts(tmp_path):
    from hertz_agents.checkpoint import load_codec

    official = write_official_dir(tmp_path / "tiny")
    own = save_model(load_model(official, device="cpu"), tmp_path / "own")
    _, t = load_reference("codec_tiny_a")
    for directory in (official, own):
        assert_close(load_codec(directory, device="cpu").encode(t["input.audio"]), t["output.mu"])


def test_load_model_on_a_codec_only_directory_says_what_it_can_do(tmp_path):
    from tiny_checkpoints import write_codec_only_dir

    with pytest.raises(CheckpointError, match="holds only the codec.*load_codec"):
        load_model(write_codec_only_dir(tmp_path / "codec"), device="cpu")


def test_an_incomplete_model_is_not_taken_for_a_codec_only_one(tmp_path):
    from hertz_agents.checkpoint import is_codec_only

    directory = write_official_dir(tmp_path / "tiny")
    (directory / VARIANTS["hertz-dev"].file("ar").name).unlink()
    assert not is_codec_only(directory)


# --- where models are -----------------------------------------------------------------------------


def test_default_model_comes_from_the_package_when_there_is_no_checkout(monkeypatch):
    """An installed wheel has no ckpt/ next to it: default is hertz-agents-small's package data."""
    import hertz_agents_small

    from hertz_agents import locations

    monkeypatch.delenv("HERTZ_AGENTS_CKPT", raising=False)
    monkeypatch.setattr(locations, "checkout_ckpt", lambda: None)
    location = locations.locate("default")
    assert location.directory == hertz_agents_small.MODEL_DIR
    assert location.source == "the hertz-agents-small package"
    assert (location.directory / "model.safetensors").is_file()


def test_named_variants_of_an_installed_package_go_to_the_user_cache(monkeypatch, tmp_path):
    from hertz_agents import locations

    monkeypatch.delenv("HERTZ_AGENTS_CKPT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(locations, "checkout_ckpt", lambda: None)
    expected = tmp_path / "hertz-agents" / "ckpt" / "hertz-dev"
    assert locations.locate("hertz-dev").directory == expected


def test_hertz_agents_ckpt_points_named_models_elsewhere(monkeypatch, tmp_path):
    from hertz_agents import locations

    monkeypatch.setenv("HERTZ_AGENTS_CKPT", str(tmp_path))
    assert locations.locate("hertz-dev").directory == tmp_path / "hertz-dev"
    assert locations.locate("codec").directory == tmp_path / "codec"
    # default: a hertz-small folder there wins; without one the installed default model is used
    assert locations.locate("default").directory != tmp_path / "hertz-small"
    save_model(load_model("default", device="cpu"), tmp_path / "hertz-small")
    assert locations.locate("default").directory == tmp_path / "hertz-small"
    assert locations.locate("default").source == "$HERTZ_AGENTS_CKPT"


def test_a_missing_variant_says_where_download_puts_it(monkeypatch, tmp_path):
    monkeypatch.setenv("HERTZ_AGENTS_CKPT", str(tmp_path))
    hint = rf"hertz-agents download --variant hertz-dev.*{tmp_path}"
    with pytest.raises(ModelNotFound, match=hint):
        load_model("hertz-dev")
