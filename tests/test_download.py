"""The checkpoint registry and the download machinery.

The real Hub cannot be reached from tests (and its files are gigabytes), so the Hub is replaced by
``hf_fake_server.FakeHub``: a real HTTP server on 127.0.0.1 that answers like the Hub's file
endpoints, driven by the real ``huggingface_hub`` client (``get_hf_file_metadata`` and
``http_get``). The files are tiny torch state_dicts under the official names; their md5 differs from
the official one, so tests pass their own via ``md5_overrides``.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_fake_server import FakeHub, unreachable_endpoint
from huggingface_hub import constants as hub_constants
from huggingface_hub import file_download as hub_file_download
from huggingface_hub.utils import _http as hub_http

from hertz_agents.download import PARTIAL_DIR, ChecksumError, DownloadError, download_variant
from hertz_agents.registry import REPO_ID, VARIANTS, check_dir, get_variant, md5_file

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE_README = REPO_ROOT.parent / "shared" / "reference" / "README.md"
VARIANT = "hertz-dev"


def _tiny_state_dict_bytes(seed: int) -> bytes:
    """A real, loadable ``.pt`` state_dict of a few KB."""
    g = torch.Generator().manual_seed(seed)
    state = {
        "input.weight": torch.randn(16, 32, generator=g),
        "input.bias": torch.randn(16, generator=g),
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny_files() -> dict[str, bytes]:
    """Every file of every variant, as tiny checkpoints."""
    names = sorted({f.name for v in VARIANTS.values() for f in v.files})
    return {name: _tiny_state_dict_bytes(i) for i, name in enumerate(names)}


@pytest.fixture
def md5s(tiny_files: dict[str, bytes]) -> dict[str, str]:
    """md5 overrides for the files of ``VARIANT``."""
    return {f.name: hashlib.md5(tiny_files[f.name]).hexdigest() for f in get_variant(VARIANT).files}


@pytest.fixture(autouse=True)
def isolated_hub_client(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep huggingface_hub off ~/.cache, off any token, and away from the real huggingface.co.

    huggingface_hub reads its environment at import, so the module constants are patched as well.
    The default endpoint points at a closed port: a test that forgot ``endpoint=`` fails instead of
    going out.
    """
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HOME", str(home))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(hub_constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    guard = unreachable_endpoint()
    monkeypatch.setattr(hub_constants, "ENDPOINT", guard)
    monkeypatch.setattr(
        hub_constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        guard + "/{repo_id}/resolve/{revision}/{filename}",
    )


class _NoSleep:
    """The ``time`` module with ``sleep`` made instant."""

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@pytest.fixture
def no_hub_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip huggingface_hub's retry sleeps (about 23 s of backoff against a dead endpoint)."""
    monkeypatch.setattr(hub_http, "time", _NoSleep())
    monkeypatch.setattr(hub_file_download, "time", _NoSleep())


def _leftovers(root: Path) -> list[Path]:
    """Anything a finished or failed-and-cleaned download should not leave behind."""
    return [p for p in root.rglob("*") if p.name.endswith(".incomplete") or PARTIAL_DIR in p.parts]


def _fail_midway(hub: FakeHub, name: str, keep: int) -> None:
    """Make the next download of ``name`` fail.

    ``keep`` bytes get through, then every retry is hung up on.

    The client resets its retry count whenever it receives bytes, so the retries must get none for
    the call to give up (after 1 + 5 attempts in huggingface_hub 2.4; 20 covers older counts too).
    """
    hub.interrupt_after[name] = [keep] + [0] * 20


# --- registry
# ---------------------------------------------------------------------------------------


def test_every_variant_has_one_file_per_role() -> None:
    for v in VARIANTS.values():
        assert sorted(f.role for f in v.files) == ["ar", "codec", "quantizer", "resynthesizer"]
        assert v.file("codec").name == "inference_apatosaurus_95000.pt"
        assert v.file("quantizer").name == "inference_volcano_3.pt"
    assert get_variant("hertz-dev").split and not get_variant("hertz-dev-mono").split
    assert get_variant("hertz-dev-mono-audio").file("ar").name == "inference_syrup_110000.pt"
    assert REPO_ID == "si-pbc/hertz-dev"


@pytest.mark.skipif(not REFERENCE_README.is_file(), reason="shared reference data not checked out")
def test_registry_md5_sums_match_the_reference_table() -> None:
    table = dict(
        re.findall(
            r"^\| (inference_\w+\.pt) \| ([0-9a-f]{32}) \|", REFERENCE_README.read_text(), re.M
        )
    )
    registry = {f.name: f.md5 for v in VARIANTS.values() for f in v.files}
    assert registry == table


def test_unknown_variant_error_lists_the_known_names() -> None:
    with pytest.raises(KeyError) as info:
        get_variant("hertz-xl")
    assert all(name in str(info.value) for name in VARIANTS)


def test_md5_file_streams_to_the_same_digest_as_hashlib(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tmp_path / "f").write_bytes(data)
    assert md5_file(tmp_path / "f") == hashlib.md5(data).hexdigest()


def test_check_dir_reports_missing_present_ok_and_bad(
    tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    v = get_variant(VARIANT)
    codec, quantizer, resyn, _ = v.filenames
    v = v.with_md5({codec: hashlib.md5(tiny_files[codec]).hexdigest()})
    (tmp_path / codec).write_bytes(tiny_files[codec])
    (tmp_path / quantizer).write_bytes(tiny_files[quantizer])  # official md5 expected: so "bad"
    assert [s.state for s in check_dir(tmp_path, v)] == ["present", "present", "missing", "missing"]
    hashed = check_dir(tmp_path, v, md5=True)
    assert [s.state for s in hashed] == ["ok", "bad", "missing", "missing"]
    assert hashed[0].size == len(tiny_files[codec])
    assert "expected" in hashed[1].describe() and resyn in hashed[2].describe()


# --- download
# ---------------------------------------------------------------------------------------


def test_download_fetches_every_file_and_verifies_it(
    tmp_path: Path, tiny_files: dict[str, bytes], md5s: dict[str, str]
) -> None:
    with FakeHub(tiny_files) as hub:
        dest = download_variant(
            VARIANT, tmp_path / "ckpt", endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
    assert dest == tmp_path / "ckpt"
    v = get_variant(VARIANT).with_md5(md5s)
    assert [s.state for s in check_dir(dest, v, md5=True)] == ["ok"] * 4
    for name in v.filenames:
        assert (dest / name).read_bytes() == tiny_files[name]
    state = torch.load(dest / v.file("ar").name, weights_only=True, map_location="cpu")
    assert set(state) == {"input.weight", "input.bias"}
    assert not _leftovers(tmp_path)


def test_second_download_makes_no_request_at_all(
    tmp_path: Path, tiny_files: dict[str, bytes], md5s: dict[str, str]
) -> None:
    with FakeHub(tiny_files) as hub:
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        assert len(hub.gets()) == 4
        hub.requests.clear()
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        assert hub.requests == []


def test_present_file_with_wrong_md5_is_fetched_again(
    tmp_path: Path, tiny_files: dict[str, bytes], md5s: dict[str, str]
) -> None:
    v = get_variant(VARIANT)
    with FakeHub(tiny_files) as hub:
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        ar = v.file("ar").name
        (tmp_path / ar).write_bytes(b"half a file")
        hub.requests.clear()
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        assert [r.path.rsplit("/", 1)[1] for r in hub.gets()] == [ar]
    assert (tmp_path / ar).read_bytes() == tiny_files[ar]


def test_verify_false_trusts_present_files(tmp_path: Path, tiny_files: dict[str, bytes]) -> None:
    v = get_variant(VARIANT)
    for name in v.filenames[:3]:
        (tmp_path / name).write_bytes(b"not checked")
    with FakeHub(tiny_files) as hub:
        download_variant(VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, verify=False)
        assert [r.path.rsplit("/", 1)[1] for r in hub.gets()] == [v.filenames[3]]


def test_corrupted_transfer_raises_checksum_error_and_leaves_no_bad_file(
    tmp_path: Path, tiny_files: dict[str, bytes], md5s: dict[str, str]
) -> None:
    resyn = get_variant(VARIANT).file("resynthesizer").name
    served = dict(tiny_files)
    served[resyn] = served[resyn][:-1] + bytes([served[resyn][-1] ^ 0xFF])  # one flipped byte
    with FakeHub(served) as hub, pytest.raises(ChecksumError) as info:
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
    err = info.value
    assert err.filename == resyn and err.expected == md5s[resyn]
    assert err.actual == hashlib.md5(served[resyn]).hexdigest()
    assert resyn in str(err) and "again" in str(err)
    assert not (tmp_path / resyn).exists()
    assert not _leftovers(tmp_path)


@pytest.mark.usefixtures("no_hub_backoff")
def test_unreachable_endpoint_raises_download_error_explaining_the_manual_copy(
    tmp_path: Path,
) -> None:
    v = get_variant(VARIANT)
    with pytest.raises(DownloadError) as info:
        download_variant(VARIANT, tmp_path, endpoint=unreachable_endpoint(), progress=False)
    message = str(info.value)
    assert info.value.filename == v.filenames[0]
    assert "offline" in message and str(tmp_path.resolve()) in message
    assert all(name in message for name in v.filenames)
    assert not any(p.is_file() for p in tmp_path.iterdir())


def test_offline_mode_raises_download_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with FakeHub({}) as hub, pytest.raises(DownloadError, match="offline"):
        download_variant(VARIANT, tmp_path, endpoint=hub.endpoint, progress=False)
    assert hub.requests == []


def test_file_missing_on_the_endpoint_raises_download_error(
    tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    codec = get_variant(VARIANT).file("codec").name
    served = {k: v for k, v in tiny_files.items() if k != codec}
    with FakeHub(served) as hub, pytest.raises(DownloadError, match="404") as info:
        download_variant(VARIANT, tmp_path, endpoint=hub.endpoint, progress=False)
    assert info.value.filename == codec


@pytest.mark.usefixtures("no_hub_backoff")
def test_interrupted_transfer_resumes_with_a_range_request(
    tmp_path: Path,
    tiny_files: dict[str, bytes],
    md5s: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The client writes whole chunks (10 MB by default); small chunks let a few-KB file resume
    # mid-way.
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 512)
    ar = get_variant(VARIANT).file("ar").name
    half = len(tiny_files[ar]) // 2
    with FakeHub(tiny_files) as hub:
        hub.interrupt_after[ar] = half
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        ranges = [r.range for r in hub.gets(ar)]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", ranges[1] or "").group(1))  # type: ignore[union-attr]
    assert 0 < resumed_at <= half
    assert (tmp_path / ar).read_bytes() == tiny_files[ar]


@pytest.mark.usefixtures("no_hub_backoff")
def test_download_that_failed_midway_resumes_on_the_next_run_with_a_range_request(
    tmp_path: Path,
    tiny_files: dict[str, bytes],
    md5s: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # so a few-KB file can stop mid-way
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 512)
    v = get_variant(VARIANT)
    ar = v.file("ar").name
    half = len(tiny_files[ar]) // 2
    part = tmp_path / PARTIAL_DIR / f"{ar}.part"
    with FakeHub(tiny_files) as hub:
        _fail_midway(hub, ar, half)
        with pytest.raises(DownloadError) as info:
            download_variant(
                VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
            )
        assert info.value.filename == ar and "resumes" in str(info.value)
        assert not (tmp_path / ar).exists()
        kept = part.stat().st_size
        assert 0 < kept <= half and part.read_bytes() == tiny_files[ar][:kept]

        hub.interrupt_after.clear()
        hub.requests.clear()
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        # only the rest of the one unfinished file
        assert [r.range for r in hub.gets()] == [f"bytes={kept}-"]
        assert hub.gets()[0].path.endswith(f"/{ar}")
    assert [s.state for s in check_dir(tmp_path, v.with_md5(md5s), md5=True)] == ["ok"] * 4
    assert not _leftovers(tmp_path)


@pytest.mark.usefixtures("no_hub_backoff")
def test_partial_download_of_a_file_changed_on_the_hub_restarts_from_zero(
    tmp_path: Path,
    tiny_files: dict[str, bytes],
    md5s: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 512)
    ar = get_variant(VARIANT).file("ar").name
    with FakeHub(tiny_files) as hub:
        _fail_midway(hub, ar, len(tiny_files[ar]) // 2)
        with pytest.raises(DownloadError):
            download_variant(
                VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
            )
        assert (tmp_path / PARTIAL_DIR / f"{ar}.part").stat().st_size > 0

        hub.interrupt_after.clear()
        hub.files[ar] = _tiny_state_dict_bytes(seed=1234)  # new bytes, so a new ETag
        new_md5s = {**md5s, ar: hashlib.md5(hub.files[ar]).hexdigest()}
        hub.requests.clear()
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=new_md5s
        )
        assert [r.range for r in hub.gets(ar)] == [None]
    assert (tmp_path / ar).read_bytes() == hub.files[ar]
    assert not _leftovers(tmp_path)


@pytest.mark.usefixtures("no_hub_backoff")
def test_resumed_file_with_wrong_md5_is_deleted_so_the_next_run_starts_over(
    tmp_path: Path,
    tiny_files: dict[str, bytes],
    md5s: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Bytes corrupted on disk between runs keep their etag, so only the md5 can catch them.
    monkeypatch.setattr(hub_constants, "DOWNLOAD_CHUNK_SIZE", 512)
    ar = get_variant(VARIANT).file("ar").name
    part = tmp_path / PARTIAL_DIR / f"{ar}.part"
    with FakeHub(tiny_files) as hub:
        _fail_midway(hub, ar, len(tiny_files[ar]) // 2)
        with pytest.raises(DownloadError):
            download_variant(
                VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
            )
        hub.interrupt_after.clear()
        part.write_bytes(b"\0" * part.stat().st_size)
        with pytest.raises(ChecksumError):
            download_variant(
                VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
            )
        assert not (tmp_path / ar).exists() and not _leftovers(tmp_path)
        hub.requests.clear()
        download_variant(
            VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, md5_overrides=md5s
        )
        assert [r.range for r in hub.gets()] == [None]
    assert (tmp_path / ar).read_bytes() == tiny_files[ar]


def test_verify_false_still_resumes_and_moves_the_file_into_place(
    tmp_path: Path, tiny_files: dict[str, bytes]
) -> None:
    ar = get_variant(VARIANT).file("ar").name
    folder = tmp_path / PARTIAL_DIR
    folder.mkdir()
    sha = hashlib.sha256(tiny_files[ar]).hexdigest()
    # as a killed earlier run would leave it
    (folder / f"{ar}.part").write_bytes(tiny_files[ar][:1000])
    (folder / f"{ar}.json").write_text(f'{{"etag": "{sha}", "size": {len(tiny_files[ar])}}}')
    with FakeHub(tiny_files) as hub:
        download_variant(VARIANT, tmp_path, endpoint=hub.endpoint, progress=False, verify=False)
        assert [r.range for r in hub.gets(ar)] == ["bytes=1000-"]
    assert (tmp_path / ar).read_bytes() == tiny_files[ar]
    assert not _leftovers(tmp_path)


def test_hf_endpoint_environment_variable_is_honoured(
    tmp_path: Path, tiny_files: dict[str, bytes], md5s: dict[str, str]
) -> None:
    # huggingface_hub reads HF_ENDPOINT at import, so this runs in a fresh interpreter.
    code = (
        "import sys; from hertz_agents.download import download_variant; "
        f"download_variant({VARIANT!r}, sys.argv[1], progress=False, md5_overrides={md5s!r})"
    )
    with FakeHub(tiny_files) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "home"),
            "PYTHONPATH": str(REPO_ROOT),
        }
        env.pop("HF_TOKEN", None)
        result = subprocess.run(
            [sys.executable, "-c", code, str(tmp_path / "ckpt")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert len(hub.gets()) == 4


# --- the codec alone ----------------------------------------------------------------------------


def test_codec_variant_fetches_only_the_codec_file_md5_checked(
    tmp_path: Path, tiny_files: dict[str, bytes], md5s: dict[str, str]
) -> None:
    codec = get_variant("codec").file("codec").name
    with FakeHub(tiny_files) as hub:
        dest = download_variant(
            "codec",
            tmp_path / "codec",
            endpoint=hub.endpoint,
            progress=False,
            md5_overrides={codec: md5s[codec]},
        )
        requested = [r.path for r in hub.requests]
    assert sorted(p.name for p in dest.iterdir()) == [codec]
    assert (dest / codec).read_bytes() == tiny_files[codec]
    assert requested and all(r.endswith("/" + codec) for r in requested), requested
    with FakeHub(tiny_files) as hub, pytest.raises(ChecksumError):  # the registry's md5 is checked
        download_variant("codec", tmp_path / "other", endpoint=hub.endpoint, progress=False)


def test_codec_variant_is_not_a_full_model_variant() -> None:
    assert "codec" not in VARIANTS
    assert get_variant("codec").filenames == ["inference_apatosaurus_95000.pt"]


@pytest.mark.usefixtures("no_hub_backoff")
def test_failed_first_download_leaves_no_empty_folder(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b"
    with pytest.raises(DownloadError):
        download_variant("codec", dest, endpoint=unreachable_endpoint(), progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_endpoint_fails_without_the_hub_clients_backoff(tmp_path: Path) -> None:
    """No backoff patching here: the first request must not be retried for ~25 s."""
    start = time.monotonic()
    with pytest.raises(DownloadError, match="offline"):
        download_variant("codec", tmp_path / "c", endpoint=unreachable_endpoint(), progress=False)
    assert time.monotonic() - start < 10
