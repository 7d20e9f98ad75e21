"""``batched.batch_problems`` (what the audit's planner asks before it groups jobs) against what
``reconstruct_many`` does on the same cases, and ``reconstruct_many`` under Ctrl-C: every case keeps its best
so far, as the case run alone does.

Tolerance (float64): the batched rounds sum in another order than a case's own restarts (vmap over cases), as
tests/test_batched_trials.py states: signed-Adam candidates within 1e-9.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gradleak as gl
from gradleak.attacks.optimization import batched as B
from gradleak.attacks.optimization.batched_objective import BatchedObjective
from gradleak.attacks.optimization.dlg import DLG
from gradleak.attacks.optimization.inverting import InvertingGradients
from gradleak.attacks.rgap import RGAP


class _InPlace(nn.Module):
    def __init__(self, input_shape=(3, 16, 16), num_classes=10):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                                 nn.Linear(4 * 16 * 16, num_classes))

    def forward(self, x):
        return self.net(x)


def _cases(model, n=2, bn_mode="eval"):
    x, y = gl.data.samples(16, num_images=n).batch(n)
    return [gl.simulate(model, x[i:i + 1], y[i:i + 1], bn_mode=bn_mode)[0].to(torch.float64) for i in range(n)]


def _zoo(name, **opts):
    return gl.models.build(name, input_shape=(3, 16, 16), num_classes=10, seed=0, **opts)


IG = dict(max_iterations=3, restarts=2)
SITUATIONS = {  # name: (model, bn_mode, attack, batched by reconstruct_many?)
    "lenet": (lambda: _zoo("lenet"), "eval", lambda: InvertingGradients(**IG), True),
    "dlg": (lambda: _zoo("lenet"), "eval", lambda: DLG(max_iterations=2), True),
    "bn-eval": (lambda: _zoo("convnet", width=4), "eval", lambda: InvertingGradients(**IG), True),
    "bn-train": (lambda: _zoo("convnet", width=4), "train", lambda: InvertingGradients(**IG), False),
    "bn-prior": (lambda: _zoo("convnet", width=4), "eval", lambda: InvertingGradients(**IG, bn_prior="running"),
                 False),
    "in-place": (_InPlace, "eval", lambda: InvertingGradients(**IG), False),
    "option-off": (lambda: _zoo("lenet"), "eval", lambda: InvertingGradients(**IG, batch_trials=False), False),
    "pyramid": (lambda: _zoo("lenet"), "eval", lambda: InvertingGradients(**IG, parametrize="laplacian-3"), True),
    "resnet-auto": (lambda: _zoo("resnet20"), "eval", lambda: InvertingGradients(**IG), True),  # a pyramid
}


@pytest.mark.parametrize("name", list(SITUATIONS))
def test_batch_problems_says_what_reconstruct_many_does(name):
    make_model, bn_mode, make_attack, batched = SITUATIONS[name]
    cases = _cases(make_model(), bn_mode=bn_mode)
    problems = B.batch_problems(make_attack(), cases[0], pays=False)
    assert bool(problems) is not batched
    recs = B.reconstruct_many(make_attack(), cases, seeds=[0, 1])
    for rec in recs:
        note = rec.info["batched"]
        assert note["batched"] is batched
        if batched:
            assert note["setups_in_batch"] == 2
        else:  # the very sentences the run gives
            assert note["reason"] == "; ".join(problems)


def test_batch_problems_names_the_reason():
    lenet = _cases(_zoo("lenet"), n=1)[0]
    assert B.batch_problems(RGAP(), lenet) == ["not an optimisation attack with batched trials"]
    train = _cases(_zoo("convnet", width=4), n=1, bn_mode="train")[0]
    assert any("BatchNorm in train mode" in p for p in B.batch_problems(InvertingGradients(**IG), train))
    eval_ = _cases(_zoo("convnet", width=4), n=1)[0]
    assert any("prior 'bn-statistics'" in p
               for p in B.batch_problems(InvertingGradients(**IG, bn_prior="running"), eval_))
    assert any("in-place" in p for p in B.batch_problems(InvertingGradients(**IG), _cases(_InPlace(), n=1)[0]))
    assert B.batch_problems(InvertingGradients(**IG, parametrize="laplacian-3"), lenet) == []
    assert B.batch_problems(InvertingGradients(**IG, batch_trials=False), lenet) == ["batch_trials is off"]


def test_batch_problems_heeds_the_cpu_size_limit_unless_asked_not_to(monkeypatch):
    case = _cases(_zoo("lenet"), n=1)[0]
    assert B.batch_problems(InvertingGradients(**IG), case) == []
    monkeypatch.setattr(B, "CPU_BATCH_MAX_PARAMETERS", 1000)  # as if lenet were a large model on this CPU
    (why,) = B.batch_problems(InvertingGradients(**IG), case)
    assert why == B.worth_batching(case) and "parameters" in why
    assert B.batch_problems(InvertingGradients(**IG), case, pays=False) == []


def on_each_round(monkeypatch, hook) -> None:
    """hook() before every batched evaluation (one per round of a batched group), whichever entry of the engine
    its caller uses (``__call__`` for the trial programs; ``stacked`` where the engine has it: counted once)."""
    depth = [0]

    def wrap(real):
        def wrapped(self, *a, **kw):
            if depth[0] == 0:
                hook()
            depth[0] += 1
            try:
                return real(self, *a, **kw)
            finally:
                depth[0] -= 1
        return wrapped

    for name in ("__call__", "stacked"):
        if hasattr(BatchedObjective, name):
            monkeypatch.setattr(BatchedObjective, name, wrap(getattr(BatchedObjective, name)))


@pytest.fixture
def ctrl_c_at_round(monkeypatch):
    """ctrl_c_at_round(k): the k-th batched evaluation from now raises KeyboardInterrupt (Ctrl-C in round k)."""
    state = {"left": None}

    def hook():
        if state["left"] is not None:
            state["left"] -= 1
            if state["left"] == 0:
                state["left"] = None
                raise KeyboardInterrupt

    on_each_round(monkeypatch, hook)

    def arm(k: int) -> None:
        state["left"] = k

    return arm


def test_ctrl_c_in_reconstruct_many_keeps_each_cases_best_so_far(ctrl_c_at_round):
    """Interrupted in round 30, every case returns what it returns alone interrupted in round 30 (its restarts
    batched, so its round 30 is the same step): its best offer so far, its history, marked interrupted."""
    cases = _cases(_zoo("lenet"), n=3)
    attack = InvertingGradients(max_iterations=10_000, restarts=2, offer_every=5, optimizer="signed-adam")
    alone = []
    for i, case in enumerate(cases):
        ctrl_c_at_round(30)
        alone.append(attack.reconstruct(case, seed=i))
    ctrl_c_at_round(30)
    many = B.reconstruct_many(attack, cases, seeds=[0, 1, 2])
    for a, m in zip(alone, many):
        assert a.info["interrupted"] is True and m.info["interrupted"] is True
        assert "start_point_only" not in m.info  # a candidate was offered: the best so far, not the start
        assert m.info["best_score"] == pytest.approx(a.info["best_score"], rel=1e-9)
        torch.testing.assert_close(m.inputs, a.inputs, rtol=0, atol=1e-9)
        assert len(m.history) == len(a.history) == 2 * 29  # both restarts' steps before the interrupt
        assert m.history == pytest.approx(a.history, rel=1e-9)
        assert m.residual == pytest.approx(a.residual, rel=1e-6)
    assert not torch.equal(many[0].inputs, many[1].inputs)


def test_ctrl_c_before_the_first_offer_keeps_the_start_point(ctrl_c_at_round):
    cases = _cases(_zoo("lenet"), n=2)
    attack = InvertingGradients(max_iterations=10_000, restarts=2, offer_every=1000, optimizer="signed-adam")
    ctrl_c_at_round(3)
    many = B.reconstruct_many(attack, cases, seeds=[0, 1])
    for i, (case, m) in enumerate(zip(cases, many)):
        ctrl_c_at_round(3)
        a = attack.reconstruct(case, seed=i)
        assert m.info["interrupted"] is True and m.info["start_point_only"] is True
        assert a.info["start_point_only"] is True
        torch.testing.assert_close(m.inputs, a.inputs, rtol=0, atol=0)  # the same drawn start
