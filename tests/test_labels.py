"""Label recovery: iDLG for one sample, count-based for batches with repeated labels, FedAvg, edge cases."""

from collections import Counter

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.attacks.labels import label_recovery_problems, last_linear, recover_labels


@pytest.fixture(scope="module")
def photos():
    return gl.data.samples(16)  # all 19 photos at 16x16 (fast)


def _multiset_hits(a, b):
    return sum((Counter(a.tolist()) & Counter(b.tolist())).values())


@pytest.mark.parametrize("model_name", ["lenet", "mlp"])
def test_idlg_label_recovery_is_perfect_on_random_single_samples(photos, model_name):
    """iDLG: 100% on 12 random single-sample cases per model (24 in total)."""
    g = torch.Generator().manual_seed(7)
    for trial in range(12):
        model = gl.models.build(model_name, input_shape=(3, 16, 16), num_classes=19, seed=trial,
                                **({"width": 64} if model_name == "mlp" else {}))
        i = int(torch.randint(0, len(photos), (1,), generator=g))
        label = torch.randint(0, 19, (1,), generator=g)
        case, _ = gl.simulate(model, photos.images[i:i + 1], label, spec=photos.spec, labels_known=False)
        est = recover_labels(case)
        assert est.labels.tolist() == label.tolist(), f"trial {trial}: {est} vs {label}"
        assert est.method == "idlg-bias" and est.confident
        assert est.labels.dtype == torch.long


def test_idlg_label_without_bias_uses_weight_row_sums(photos):
    """No bias in the classifier, non-negative (ReLU) features: argmin of the weight-gradient row sums."""
    g = torch.Generator().manual_seed(3)
    for trial in range(20):
        torch.manual_seed(trial)
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 19, bias=False))
        i = int(torch.randint(0, len(photos), (1,), generator=g))
        label = torch.randint(0, 19, (1,), generator=g)
        case, _ = gl.simulate(model, photos.images[i:i + 1], label, spec=photos.spec, labels_known=False)
        est = recover_labels(case)
        assert est.method == "idlg-weight" and not est.confident
        assert est.labels.tolist() == label.tolist()


def test_label_recovery_under_fedavg_single_sample(photos):
    for trial in range(6):
        model = gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=19, seed=trial)
        label = torch.tensor([(5 * trial + 3) % 19])
        case, _ = gl.simulate(model, photos.images[trial:trial + 1], label, spec=photos.spec, labels_known=False,
                              protocol="fedavg", local_steps=3, local_lr=0.01)
        assert recover_labels(case).labels.tolist() == label.tolist()


@pytest.mark.parametrize("model_name,opts", [("mlp", {"width": 128}), ("lenet", {}), ("convnet", {"width": 8})])
def test_batch_label_counts_with_repeated_labels(photos, model_name, opts):
    """B = 6 labels drawn from 3 classes (so repeated): the exact multiset is recovered (FedSGD)."""
    g = torch.Generator().manual_seed(11)
    for trial in range(4):
        model = gl.models.build(model_name, input_shape=(3, 16, 16), num_classes=19, seed=trial, **opts)
        idx = torch.randperm(len(photos), generator=g)[:6]
        labels = torch.randint(0, 3, (6,), generator=g) * 5
        assert len(set(labels.tolist())) < 6
        case, _ = gl.simulate(model, photos.images[idx], labels, spec=photos.spec, labels_known=False)
        est = recover_labels(case)
        assert sorted(est.labels.tolist()) == sorted(labels.tolist()), (trial, est, labels)
        assert est.method == "count-bias"
        assert not est.confident  # repeated labels: the counts are estimates


def test_batch_distinct_labels_are_certain(photos):
    model = gl.models.build("lenet", input_shape=(3, 16, 16), num_classes=19, seed=1)
    labels = torch.tensor([4, 0, 17, 9])
    case, _ = gl.simulate(model, photos.images[:4], labels, spec=photos.spec, labels_known=False)
    est = recover_labels(case)
    assert est.labels.tolist() == sorted(labels.tolist()) and est.confident


def test_batch_labels_under_fedavg_are_mostly_right(photos):
    hits = total = 0
    g = torch.Generator().manual_seed(5)
    for trial in range(4):
        model = gl.models.build("mlp", input_shape=(3, 16, 16), num_classes=19, width=128, seed=trial)
        labels = torch.randint(0, 4, (6,), generator=g)
        case, _ = gl.simulate(model, photos.images[:6], labels, spec=photos.spec, labels_known=False,
                              protocol="fedavg", local_steps=3, local_lr=0.01, local_batch_size=3)
        hits += _multiset_hits(recover_labels(case).labels, labels)
        total += 6
    assert hits / total >= 0.9


def test_logistic_single_output_label(photos):
    for trial in range(6):
        model = gl.models.build("mlp", input_shape=(3, 16, 16), num_classes=1, width=32, seed=trial)
        label = torch.tensor([trial % 2])
        case, _ = gl.simulate(model, photos.images[trial:trial + 1], label, spec=photos.spec, labels_known=False)
        assert case.loss == "logistic"
        est = recover_labels(case)
        assert est.method == "logistic-bias" and est.labels.tolist() == label.tolist()


def test_no_final_linear_layer_is_a_requirement_error():
    class ConvHead(nn.Sequential):
        num_outputs = 5

    model = ConvHead(nn.Conv2d(3, 5, 8), nn.Flatten())
    case, _ = gl.simulate(model, torch.rand(1, 3, 8, 8), torch.tensor([2]), labels_known=False)
    assert last_linear(case) is None
    assert "final nn.Linear" in label_recovery_problems(case)[0]
    with pytest.raises(gl.RequirementError, match="final nn.Linear"):
        recover_labels(case)
