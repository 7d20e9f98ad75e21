import copy

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.case import FedSGD


def _lenet_case(photos32, n=2, **kw):
    x, y = photos32.batch(n)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    return model, x, y, gl.simulate(model, x, y, spec=photos32.spec, **kw)


def test_simulate_fedsgd_matches_manual_gradient(photos32):
    model, x, y, (case, truth) = _lenet_case(photos32)
    ref = copy.deepcopy(model)
    loss = nn.functional.cross_entropy(ref(photos32.spec.normalize(x)), y)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for (name, _), g in zip(ref.named_parameters(), grads):
        assert torch.allclose(case.observed[name], g, atol=1e-6), name
    assert torch.equal(truth.inputs, x) and torch.equal(truth.labels, y)
    assert case.residual(truth.inputs, truth.labels) < 1e-6
    assert case.residual(torch.rand_like(x), y) > 1e-3


def test_simulate_does_not_touch_callers_model(photos32):
    model, x, y, _ = _lenet_case(photos32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gl.simulate(model, x, y, spec=photos32.spec, protocol="fedavg", local_steps=3, local_lr=0.1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert all(p.grad is None for p in model.parameters())


def test_fedavg_matches_manual_sgd_with_fixed_minibatch_order(photos32):
    x, y = photos32.batch(4)
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=photos32.spec.num_classes)
    case, _ = gl.simulate(model, x, y, spec=photos32.spec, protocol="fedavg", local_steps=3, local_lr=0.05,
                          local_batch_size=2)
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    xn = photos32.spec.normalize(x)
    for step in range(3):
        chunk = step % 2
        opt.zero_grad()
        nn.functional.cross_entropy(ref(xn[2 * chunk:2 * chunk + 2]), y[2 * chunk:2 * chunk + 2]).backward()
        opt.step()
    for (name, p0), p1 in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(case.observed[name], p1.detach() - p0.detach(), atol=1e-6), name


def test_bn_train_mode_differs_from_eval_mode(photos32):
    x, y = photos32.batch(2)
    model = gl.models.build("convnet", input_shape=photos32.spec.shape, num_classes=19, width=4)
    ce, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="eval")
    ct, _ = gl.simulate(model, x, y, spec=photos32.spec, bn_mode="train")
    assert ce.bn_mode == "eval" and ct.bn_mode == "train"
    diff = max(float((ce.observed[k] - ct.observed[k]).abs().max()) for k in ce.observed)
    assert diff > 1e-4
    # a train-mode case must not have updated the running statistics it was built from
    assert torch.equal(ct.buffers["1.running_mean"], torch.zeros_like(ct.buffers["1.running_mean"]))


def test_case_validation_lists_every_problem(photos32):
    model, x, y, (case, _) = _lenet_case(photos32)
    grads = dict(case.observed)
    name = next(iter(grads))
    grads[name] = torch.full_like(grads[name], float("nan"))
    grads["nonsense.weight"] = torch.zeros(3)
    last = list(grads)[-2]
    grads[last] = torch.zeros(7)
    with pytest.raises(gl.ValidationError) as e:
        gl.Case(model=model, observation=FedSGD(grads), spec=photos32.spec, batch_size=3, labels=torch.tensor([0, 1]))
    msg = str(e.value)
    assert len(e.value.problems) >= 4
    assert "non-finite" in msg and "nonsense.weight" in msg and "expected" in msg and "batch_size is 3" in msg


def test_from_observed_reads_safetensors_and_signs(tmp_path, photos32):
    from safetensors.torch import save_file

    model, x, y, (case, truth) = _lenet_case(photos32, n=1)
    path = tmp_path / "grad.safetensors"
    save_file({k: v.contiguous() for k, v in case.observed.items()}, str(path))
    c2 = gl.Case.from_observed(model, path, spec=photos32.spec, batch_size=1, labels=y[:1])
    assert c2.residual(truth.inputs, truth.labels) < 1e-6
    torch.save({k: -v for k, v in case.observed.items()}, tmp_path / "neg.pt")
    c3 = gl.Case.from_observed(model, tmp_path / "neg.pt", spec=photos32.spec, batch_size=1, labels=y[:1], sign="server")
    assert c3.residual(truth.inputs, truth.labels) < 1e-6


def test_missing_and_corrupt_observed_files(tmp_path, photos32):
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=19)
    with pytest.raises(gl.DataError, match="no such file"):
        gl.Case.from_observed(model, tmp_path / "nope.pt", spec=photos32.spec, batch_size=1)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a tensor file at all")
    with pytest.raises(gl.DataError, match="expected a .safetensors"):
        gl.Case.from_observed(model, bad, spec=photos32.spec, batch_size=1)


def test_simulate_rejects_bad_inputs(photos32):
    model = gl.models.build("lenet", input_shape=photos32.spec.shape, num_classes=19)
    x, y = photos32.batch(2)
    with pytest.raises(gl.ValidationError) as e:
        gl.simulate(model, x * 3, y[:1], spec=photos32.spec, protocol="fedprox")
    assert len(e.value.problems) == 3


def test_to_float64_keeps_the_case(photos32):
    _, x, y, (case, truth) = _lenet_case(photos32)
    c64 = case.to(dtype=torch.float64)
    assert c64.dtype == torch.float64 and next(c64.model.parameters()).dtype == torch.float64
    assert c64.residual(truth.inputs.double(), truth.labels) < 1e-6


def test_single_output_model_uses_logistic_loss():
    model = gl.models.build("cnn6", input_shape=(3, 16, 16), num_classes=2)
    x = torch.rand(1, 3, 16, 16)
    case, _ = gl.simulate(model, x, torch.tensor([1]))
    assert case.loss == "logistic" and case.spec.num_classes == 2
