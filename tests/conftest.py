import pytest
import torch

torch.set_num_threads(1)  # small models: one thread is fastest, and CI machines are shared


@pytest.fixture(scope="session")
def photos32():
    import gradleak as gl

    return gl.data.samples(32, num_images=8)


@pytest.fixture(scope="session")
def zoo_case(photos32):
    """``zoo_case(name, **simulate_options)``: the case of bundled photo 1 (32 px) on the zoo model ``name``
    (seed 0), as ``gl.simulate`` makes it."""
    import gradleak as gl

    def make(name, **kw):
        x, y = photos32.batch(1, 1)
        model = gl.models.build(name, input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes,
                                seed=0)
        return gl.simulate(model, x, y, spec=photos32.spec, **kw)[0]
    return make
