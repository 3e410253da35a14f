"""Shared fixtures. Torch uses one thread in tests: on a shared 2-core machine two threads slow tiny
convolutions down by orders of magnitude whenever another process is busy."""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_faces():
    """300 synthetic faces at 32 px: enough for every stage to run, in a second."""
    from occkd_core.data import make_synthetic_faces

    return make_synthetic_faces(300, image_size=32, seed=3)
