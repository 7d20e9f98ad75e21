"""Threat models: what the server (or whoever reads the update) knows and may do, as named presets.

The presets follow the threat-model taxonomy of Carletti et al., "SoK: Gradient Inversion Attacks in Federated
Learning" (USENIX Security 2025), the one LeakPro also uses: A eavesdropper (sees the updates), B informed
eavesdropper (+ the model: architecture and parameters), C parameter-aware eavesdropper (+ the training
details: local hyper-parameters, batch size), D data-enhanced eavesdropper (+ surrogate data), E
statistical-informed eavesdropper (+ the clients' data distribution), F active manipulator (+ modifies the model
it sends), G data-enhanced manipulator (F + surrogate data), H active client manipulator (G + client selection).

Each preset maps onto the facts of a :class:`~gradleak.Case` that the attacks read: whether the labels are
given to the attacker (``labels_known``), whether the server may send a crafted model (``may_modify_model``;
only then do attacks with ``crafts_model`` run), and whether BatchNorm running statistics count as known
(``bn_statistics``: the optimisation attacks then match the model's running statistics as the data's,
``bn_prior='running'``). Whatever the preset, what the update itself carries is used: a train-mode client's
returned running statistics reveal its batch's (``bn_prior='update'``, which comes first). The audit records the
channel per attack as ``budget.per_attack[attack].bn_statistics`` ("BN statistics: from the update" / "granted by
the threat model" / "not used: ..."; :func:`gradleak.audit.plan.bn_prior_options`).
Every gradleak attack also needs the model's parameters and the batch size, and the FedAvg attacks the local
hyper-parameters; where a preset denies one of those facts, the results rely on it anyway and the preset lists
that assumption under ``optimistic_for_attacker`` (the report prints it).

D and H are not offered: no gradleak attack uses surrogate data or client selection yet, so they would run the
same attacks as C and F and suggest a coverage the tool does not have.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..registry import Registry


@dataclass(frozen=True)
class ThreatModel:
    """One named threat model. ``server_knows`` says what the adversary knows; ``labels_known`` and
    ``may_modify_model`` are what the audit sets on the cases it builds; ``assumptions`` are facts every
    result relies on; ``optimistic_for_attacker`` the ones this preset grants beyond what it says it knows."""

    name: str
    title: str
    sok: str
    description: str
    parameters: bool
    labels: bool
    batch_size: bool
    bn_statistics: bool
    local_hyperparameters: bool
    may_modify_model: bool = False
    assumptions: tuple[str, ...] = ()
    optimistic_for_attacker: tuple[str, ...] = field(default=())

    @property
    def labels_known(self) -> bool:
        return self.labels

    def server_knows(self) -> dict[str, bool]:
        return {"parameters": self.parameters, "labels": self.labels, "batch_size": self.batch_size,
                "bn_statistics": self.bn_statistics, "local_hyperparameters": self.local_hyperparameters}

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("parameters", "labels", "batch_size", "bn_statistics", "local_hyperparameters"):
            d.pop(k)
        d["server_knows"] = self.server_knows()
        d["assumptions"] = list(self.assumptions)
        d["optimistic_for_attacker"] = list(self.optimistic_for_attacker)
        return d


threat_models: Registry[ThreatModel] = Registry("threat model")

_ALWAYS = ("every attack reads the global model's parameters, which the server sent the client itself",
           "the update is observed exactly as the client sent it (after the defenses under test)")
_BATCH = "the attacks are told the batch size (the number of images behind the update)"
_LOCAL = "the FedAvg attacks are told the local steps, learning rate and mini-batch size"


def _add(tm: ThreatModel, *aliases: str) -> ThreatModel:
    threat_models.register(tm.name, aliases=aliases)(tm)
    return tm


_add(ThreatModel(
    name="eavesdropper", title="Eavesdropper", sok="A",
    description="reads the client's update in transit or at the server and knows nothing else about the "
                "training: not the labels, the batch size or the local hyper-parameters. It sees the global model "
                "only because the protocol broadcasts it.",
    parameters=True, labels=False, batch_size=False, bn_statistics=False, local_hyperparameters=False,
    assumptions=_ALWAYS,
    optimistic_for_attacker=(_BATCH + " (this threat model does not grant it)",
                             _LOCAL + " (this threat model does not grant them)")), "a")
_add(ThreatModel(
    name="informed-eavesdropper", title="Informed eavesdropper", sok="B",
    description="knows the model (architecture and parameters) and the batch size; the labels must be "
                "recovered from the update.",
    parameters=True, labels=False, batch_size=True, bn_statistics=False, local_hyperparameters=False,
    assumptions=_ALWAYS + (_BATCH,),
    optimistic_for_attacker=(_LOCAL + " (this threat model does not grant them)",)), "b")
_add(ThreatModel(
    name="parameter-aware", title="Parameter-aware eavesdropper (honest-but-curious server)", sok="C",
    description="the honest-but-curious server: it runs the protocol as specified and knows the model, the "
                "batch size and the local training details (steps, learning rate, mini-batch size) it configured; "
                "the labels must be recovered from the update. It never modifies the model it sends.",
    parameters=True, labels=False, batch_size=True, bn_statistics=False, local_hyperparameters=True,
    assumptions=_ALWAYS + (_BATCH, _LOCAL)), "c", "honest-but-curious", "honest")
_add(ThreatModel(
    name="statistical-informed", title="Statistical-informed eavesdropper", sok="E",
    description="a parameter-aware server that also knows the clients' data distribution; gradleak grants it "
                "the labels of the batch and the BatchNorm statistics of the data (the model's running "
                "statistics). The usual upper-bound setting of the gradient-inversion literature.",
    parameters=True, labels=True, batch_size=True, bn_statistics=True, local_hyperparameters=True,
    assumptions=_ALWAYS + (_BATCH, _LOCAL),
    optimistic_for_attacker=("the exact labels of the private batch are given to the attacker (knowing the "
                             "label distribution does not reveal them)",)), "e", "upper-bound")
_add(ThreatModel(
    name="active-manipulator", title="Active manipulator (malicious server)", sok="F",
    description="a malicious server: parameter-aware, and it may send the client a crafted model (an "
                "inserted imprint block, trap weights) so that the update reveals the inputs in closed form.",
    parameters=True, labels=False, batch_size=True, bn_statistics=False, local_hyperparameters=True,
    may_modify_model=True,
    assumptions=_ALWAYS + (_BATCH, _LOCAL, "the client trains whatever model the server sends, unchecked")),
    "f", "malicious")
_add(ThreatModel(
    name="data-enhanced-manipulator", title="Data-enhanced manipulator", sok="G",
    description="a malicious server with surrogate data of the clients' kind: it crafts the model from the "
                "data's brightness distribution (the imprint attack's bins) and knows the labels' distribution; "
                "gradleak grants it the labels.",
    parameters=True, labels=True, batch_size=True, bn_statistics=True, local_hyperparameters=True,
    may_modify_model=True,
    assumptions=_ALWAYS + (_BATCH, _LOCAL, "the client trains whatever model the server sends, unchecked"),
    optimistic_for_attacker=("the exact labels of the private batch are given to the attacker",)), "g")

DEFAULT = "parameter-aware"


def get(name: str | ThreatModel) -> ThreatModel:
    """The preset ``name`` (or alias: the SoK letter, 'honest-but-curious', 'malicious', ...)."""
    return name if isinstance(name, ThreatModel) else threat_models.get(name)


__all__ = ["DEFAULT", "ThreatModel", "get", "threat_models"]
