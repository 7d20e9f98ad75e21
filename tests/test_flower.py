"""The Flower integration audits a real flwr strategy's round: the server-side wrapper sees each client's
returned parameters and reconstructs the client's data from them."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import flwr  # noqa: E402,F401  (installed by the test extra)
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.server.client_manager import SimpleClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import FedAvg  # noqa: E402

import gradleak as gl  # noqa: E402
from gradleak.integrations.flower import LeakageAudit, case_from_flower  # noqa: E402


class _Proxy(ClientProxy):
    def get_properties(self, ins, timeout, group_id):
        raise NotImplementedError

    def get_parameters(self, ins, timeout, group_id):
        raise NotImplementedError

    def fit(self, ins, timeout, group_id):
        raise NotImplementedError

    def evaluate(self, ins, timeout, group_id):
        raise NotImplementedError

    def reconnect(self, ins, timeout, group_id):
        raise NotImplementedError


def _client_fit(model, arrays, x, y, spec, steps, lr):
    """What a Flower client does: load the global arrays, train locally, return its arrays."""
    m = copy.deepcopy(model)
    m.load_state_dict({k: torch.as_tensor(a) for k, a in zip(m.state_dict(), arrays)})
    opt = torch.optim.SGD(m.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(m(spec.normalize(x)), y).backward()
        opt.step()
    return [v.detach().cpu().numpy() for v in m.state_dict().values()]


def test_audit_wrapper_reconstructs_a_clients_image_from_a_flower_round(tmp_path):
    data = gl.data.samples(16, num_images=2)
    model = gl.models.build("mlp", input_shape=data.spec.shape, num_classes=data.spec.num_classes, width=64,
                            dtype=torch.float64)
    global_arrays = [v.numpy().copy() for v in model.state_dict().values()]
    strategy = FedAvg(min_fit_clients=2, min_available_clients=2, fraction_evaluate=0.0)
    audit = LeakageAudit(strategy, model, data.spec, attack="fc-analytic", local_steps=1, local_lr=0.05,
                         out_dir=tmp_path)
    manager = SimpleClientManager()
    for cid in ("alice", "bob"):
        manager.register(_Proxy(cid))
    instructions = audit.configure_fit(1, ndarrays_to_parameters(global_arrays), manager)
    assert len(instructions) == 2
    results = []
    for i, (proxy, _) in enumerate(instructions):
        x, y = data.batch(1, start=i)
        arrays = _client_fit(model, global_arrays, x.double(), y, data.spec, steps=1, lr=0.05)
        results.append((proxy, FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {})))
    params, _ = audit.aggregate_fit(1, results, [])
    # the wrapped strategy still aggregates: the new global model is the mean of the two clients
    agg = parameters_to_ndarrays(params)
    first = [parameters_to_ndarrays(r.parameters)[0] for _, r in results]
    assert np.allclose(agg[0], (first[0] + first[1]) / 2)
    # and every client's image was recovered exactly from its update
    assert len(audit.records) == 2
    for rec_, (proxy, _) in zip(audit.records, instructions):
        idx = [p.cid for p, _ in instructions].index(rec_.client)
        truth = gl.Truth(data.batch(1, start=idx)[0].double(), data.batch(1, start=idx)[1])
        assert gl.evaluate(rec_.reconstruction, truth).psnr > 100
        assert (rec_.report_dir / "reconstruction.png").is_file()


def test_case_from_flower_checks_the_arrays():
    model = gl.models.build("mlp", input_shape=(1, 4, 4), num_classes=3, width=8)
    arrays = [v.numpy() for v in model.state_dict().values()]
    spec = gl.DataSpec(shape=(1, 4, 4), num_classes=3)
    with pytest.raises(gl.ValidationError, match="one array per state_dict entry"):
        case_from_flower(model, arrays[:-1], arrays, spec=spec, num_examples=1, local_steps=1, local_lr=0.1)
    bad = list(arrays)
    bad[0] = np.zeros((2, 2), dtype=np.float32)
    with pytest.raises(gl.ValidationError, match="expected"):
        case_from_flower(model, arrays, bad, spec=spec, num_examples=1, local_steps=1, local_lr=0.1)
    case = case_from_flower(model, arrays, arrays, spec=spec, num_examples=1, local_steps=1, local_lr=0.1)
    assert case.protocol == "fedavg" and all(float(v.abs().max()) == 0 for v in case.observed.values())
