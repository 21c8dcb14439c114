import sys
from pathlib import Path

import torch

# Tests import helpers such as tests/reference.py as top-level modules.
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(min(2, torch.get_num_threads()))


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real two-channel checkpoint directory in the official layout, tiny sizes (from shared/reference)."""
    from tiny_checkpoints import write_official_dir

    return write_official_dir(tmp_path_factory.mktemp("tiny-official"), split=True)
