import sys
from pathlib import Path

import torch

# Tests import helpers such as tests/reference.py as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402

# Every test file's kind, in one place (markers declared in pyproject.toml). `pytest -m unit` is
# the fast set to run while changing code (in-process, a tiny model, no servers); `integration`
# starts real servers, browsers, pipelines or subprocesses, or trains (a test that does so in a
# unit file carries its own `integration` mark); `livekit_server` needs a
# livekit-server binary; `gpu` a CUDA device. A file not listed here counts as integration (so a
# slow new file never slows the fast set); list it, or give it `pytestmark`, to change that.
TEST_KINDS: dict[str, tuple[str, ...]] = {
    "test_audio.py": ("unit",),
    "test_checkpoint.py": ("unit",),
    "test_codec_streaming.py": ("unit",),
    "test_engine.py": ("unit",),
    "test_livekit_example.py": ("unit",),
    "test_livekit_room_analysis.py": ("unit",),
    "test_parity.py": ("unit",),
    "test_pipecat_gate.py": ("unit",),
    "test_pipecat_support.py": ("unit",),
    "test_quiet_level.py": ("unit",),
    "test_resample.py": ("unit",),
    "test_sampling.py": ("unit",),
    "test_server_protocol.py": ("unit",),
    "test_session.py": ("unit",),
    "test_train_config.py": ("unit",),
    "test_train_data.py": ("unit",),
    "test_cli.py": ("integration",),
    "test_download.py": ("integration",),
    "test_livekit_agent_session.py": ("integration",),
    "test_livekit_console.py": ("integration",),
    "test_livekit_plugin.py": ("integration",),
    "test_livekit_sip.py": ("integration",),
    "test_pipecat_browser.py": ("integration",),
    "test_pipecat_latency.py": ("integration",),
    "test_pipecat_remote.py": ("integration",),
    "test_pipecat_service.py": ("integration",),
    "test_pipecat_twilio.py": ("integration",),
    "test_pipecat_webrtc.py": ("integration",),
    "test_server_app.py": ("integration",),
    "test_server_fuzz.py": ("integration",),
    "test_server_soak.py": ("integration",),
    "test_train_ar.py": ("integration",),
    "test_train_codec.py": ("integration",),
    "test_train_distributed.py": ("integration",),
    "test_train_small_model.py": ("integration",),
}
KINDS = ("unit", "integration", "livekit_server", "gpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its file's kind, unless the test already carries one."""
    for item in items:
        if any(item.get_closest_marker(kind) for kind in KINDS):
            continue
        name = item.path.name
        kinds = TEST_KINDS.get(name, ("integration",))
        if name.startswith("test_livekit_server"):
            kinds = ("integration", "livekit_server")
        for kind in kinds:
            item.add_marker(kind)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real two-channel checkpoint directory in the official layout, tiny sizes.

    Built from shared/reference.
    """
    from tiny_checkpoints import write_official_dir

    return write_official_dir(tmp_path_factory.mktemp("tiny-official"), split=True)
