import pytest
import torch

torch.set_num_threads(1)  # small models: one thread is fastest, and CI machines are shared


@pytest.fixture(scope="session")
def photos32():
    import gradleak as gl

    return gl.data.samples(32, num_images=8)
