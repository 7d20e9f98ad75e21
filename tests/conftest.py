import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def photos32():
    import gradleak as gl

    return gl.data.samples(32, num_images=8)
