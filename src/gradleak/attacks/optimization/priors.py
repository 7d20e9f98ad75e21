"""Image priors of the optimisation attacks: ONE registry of regularisers, one signature.

A regulariser is registered once with :func:`register_prior`: a builder ``builder(case, **options)`` that
returns a function of the candidate batch ``x`` (NORMALISED inputs (B, *shape)) -> 0-d tensor, differentiable in
``x`` (a prior registered with ``uses_labels=True`` is called ``term(x, labels)`` with the candidate's labels:
int (B,) or soft). The attacks (Inverting Gradients / FedAvg, DLG / iDLG) take a list of :class:`PriorSpec` (or
``(name, weight)`` / ``(name, weight, options)`` tuples), :func:`build` them once per reconstruction and add
``sum_r weight_r * term_r(x)`` to the matching objective (never to the score that picks the best restart).
The same built :class:`Objective` is the added term of the one-by-one objective and of the batched trials
(:mod:`.batched`, which evaluates ``Objective.per_trial_value``: every term's per-trial form over the stacked trials,
the one registered with ``stacked=`` where the prior has one (``tv``, ``l2``: bit for bit
``torch.vmap`` of the term, tests/test_losses_stacked.py, without its per-call dispatch), else ``torch.vmap`` of
the term); a prior registered with ``batch_problem`` (why
vmap over trials cannot run it) makes those trials run one by one, with that reason in ``rec.info['batched']``.

Registered:

- ``tv``: anisotropic total variation (Rudin-Osher-Fatemi; in Inverting Gradients, Geiping et al. 2020).
- ``l2``: the mean squared input, ``mean(x^2)`` (the image-norm prior of DeepInversion / GradInversion).
- ``bn-statistics``: BatchNorm statistics matching (GradInversion, Yin et al., CVPR 2021; DeepInversion, Yin et
  al., CVPR 2020): ``sum_l |mu_l(x) - mu_l|_2 + |s2_l(x) - s2_l|_2`` over the BatchNorm layers l, with
  ``mu_l(x), s2_l(x)`` the per-channel mean and unbiased variance of layer l's INPUT on the candidate batch, and
  the targets ``mu_l, s2_l`` from ``source``:
  ``'update'``: what the client's returned running statistics reveal (train mode;
  :func:`gradleak.batchnorm.revealed_statistics`: the batch's own for one forward pass; for FedAvg with K
  local steps the mixture of the K step statistics, which the candidate side computes EXACTLY by replaying the
  client's K steps on the candidate (``fedavg='unrolled'``, the default: the cost of a second unrolled update per
  evaluation) or approximates on the steps' mini-batches at the sent parameters (``fedavg='sent-parameters'``:
  cheap, but the parameters' drift makes it poor at usual local learning rates, see docs/batchnorm.md));
  ``'running'``: the model's running statistics (what the server's model holds: the training data's feature
  statistics, not this batch's; the GradInversion threat model on a trained model in eval mode);
  ``'auto'``: 'update' when the case has returned buffers and ran train mode, else 'running' (nothing for a
  model without BatchNorm).
- ``fc-features``: the candidate's features at the input of a biased fully connected layer (default: the
  classifier, the last one) matched to the features the update itself reveals there: for z = W h + b,
  dL/dW[i, :] = (dL/db_i) h^T, so h = dW^T db / |db|^2 EXACTLY for one sample (Phong et al. 2018; Geiping et al.
  2020, the FC-input proposition; :func:`gradleak.attacks.analytic.recover_linear_input`). The term is
  ``|phi(x) - h|^2 / |h|^2`` (``distance='l2'``) or ``1 - cos(phi(x), h)`` (``'cosine'``), phi(x) the layer's
  input on the candidate. Matching a candidate's features to recovered ones follows the feature-matching terms of
  Liu, Wang, Chen, Lei 2024 (head features, :func:`gradleak.attacks.tensor.feature_matching_term`); its use with
  the classifier's exact input is this package's. One sample, and an update that is one gradient (FedSGD, or one
  full-batch FedAvg step): elsewhere the ratio is a mixture and the prior refuses.
- ``group-consistency``: ``mean((x - target)^2)`` towards a consensus batch (GradInversion's group term; the
  consensus of the restarts is computed by the attack, see :func:`group_consensus`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ... import batchnorm as BN
from ...case import Case
from ...errors import ValidationError
from ...registry import Registry

Term = Callable[[torch.Tensor], torch.Tensor]
#: a term's per-trial form: x (N, B, *shape) [, labels (N, B, ...)] -> (N,), trial t's term of x[t]
StackedTerm = Callable[..., torch.Tensor]
BN_SOURCES = ("none", "update", "running", "auto")


@dataclass(frozen=True)
class Prior:
    """A registered regulariser: its builder, the paper it comes from, and ``problems(case, **options)`` (why it
    cannot be built for a case, [] if it can)."""

    name: str
    builder: Callable[..., Term]
    source: str
    description: str
    problems: Callable[..., list[str]] = lambda case, **o: []
    uses_labels: bool = False
    batch_problem: str = ""
    stacked: Callable[..., StackedTerm] | None = None


priors: Registry[Prior] = Registry("prior")


def register_prior(name: str, *, source: str, description: str,
                   problems: Callable[..., list[str]] | None = None, uses_labels: bool = False,
                   batch_problem: str = "", stacked: Callable[..., StackedTerm] | None = None):
    """Register ``builder(case, **options) -> (x -> 0-d tensor)`` as the prior ``name`` (kebab-case);
    ``uses_labels``: the built term is called ``term(x, labels)``; ``batch_problem``: why the built term cannot
    run under vmap over trials ('' when it is a function of its arguments alone); ``stacked`` (optional): a
    builder with the same signature of the term's per-trial form (x (N, B, *shape) -> (N,)), which must equal
    ``torch.vmap`` of the built term bit for bit (batched trials use it instead of that vmap)."""
    def deco(builder):
        priors.register(name)(Prior(name, builder, source, description, problems or (lambda case, **o: []),
                                    uses_labels, batch_problem, stacked))
        return builder
    return deco


@dataclass(frozen=True)
class PriorSpec:
    """One regulariser of an objective: a registered ``name``, its ``weight`` and the builder's ``options``."""

    name: str
    weight: float
    options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, item: Any) -> "PriorSpec":
        """A PriorSpec from a PriorSpec, ``(name, weight)`` or ``(name, weight, options)``."""
        if isinstance(item, PriorSpec):
            return item
        if isinstance(item, (tuple, list)) and len(item) in (2, 3) and isinstance(item[0], str):
            opts = item[2] if len(item) == 3 else {}
            return cls(item[0], float(item[1]), dict(opts))
        raise ValidationError("prior", [f"a prior is a registered name with a weight, (name, weight) or (name, weight, "
                                        f"options), got {item!r}; registered: {priors.names()}"])


def spec_problems(case: Case | None, items: Sequence[Any]) -> list[str]:
    """Every problem with ``items`` as priors (and, with a case, for that case): unknown names, weights that are
    not finite and >= 0, a prior that cannot apply to the case."""
    out = []
    for item in items:
        if callable(item) and not isinstance(item, (tuple, list, PriorSpec)):
            continue  # a plain callable (x) -> tensor
        try:
            s = PriorSpec.parse(item)
        except (ValidationError, TypeError, ValueError) as e:
            out.append(str(e))
            continue
        if s.name not in priors:
            out.append(f"unknown prior {s.name!r}: expected one of {priors.names()}")
            continue
        if not (s.weight >= 0 and s.weight < float("inf")):
            out.append(f"prior {s.name!r} weight must be a finite number >= 0, got {s.weight}")
        if case is not None and s.weight > 0:
            out += priors.get(s.name).problems(case, **dict(s.options))
    return out


@dataclass
class Objective:
    """The built regularisers of one reconstruction: ``value(x)`` is ``sum_r w_r term_r(x)``. ``terms``: (name,
    weight, term, uses_labels, batch_problem) each; ``stacked``: the per-trial forms of those terms that have one
    (keyed by ``id(term)``)."""

    terms: list[tuple[str, float, Term, bool, str]] = field(default_factory=list)
    stacked: dict[int, StackedTerm] = field(default_factory=dict)

    def value(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """The weighted sum over the terms (None when there is none); ``labels``: the candidate's labels, for
        the terms that use them."""
        total = None
        for name, w, t, uses_labels, _ in self.terms:
            if uses_labels and labels is None:
                raise ValidationError("priors", [f"prior {name!r} needs the candidate's labels"])
            v = w * (t(x, labels) if uses_labels else t(x))
            total = v if total is None else total + v
        return total

    def per_trial_value(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor | None:
        """:meth:`value` of each of N trials at once: x (N, B, *shape), labels (N, B, ...) -> (N,) (None when
        there is no term), bit for bit ``torch.vmap(self.value)(x, labels)``: each term's registered per-trial
        form, or vmap of the term where it has none."""
        total = None
        for name, w, t, uses_labels, _ in self.terms:
            if uses_labels and labels is None:
                raise ValidationError("priors", [f"prior {name!r} needs the candidate's labels"])
            form = self.stacked.get(id(t))
            if form is None:
                form = torch.vmap(t, randomness="error")
            v = w * (form(x, labels) if uses_labels else form(x))
            total = v if total is None else total + v
        return total

    def describe(self) -> list[dict]:
        return [{"prior": n, "weight": w} for n, w, *_ in self.terms]

    def plus(self, other: "Objective") -> "Objective":
        """This objective with ``other``'s terms added (e.g. the group term once the consensus exists)."""
        return Objective(list(self.terms) + list(other.terms), {**self.stacked, **other.stacked})

    def batch_problems(self) -> list[str]:
        """Why vmap over trials cannot run these terms ([] if it can be tried)."""
        return [f"prior {n!r}: {why}" for n, _, _, _, why in self.terms if why]

    def key(self) -> tuple:
        """Equal for two objectives made of the same term functions with the same weights (what lets batched
        trials of several setups share one objective)."""
        return tuple((n, w, id(t)) for n, w, t, _, _ in self.terms)


def build(case: Case, items: Sequence[Any]) -> Objective:
    """Build ``items`` (PriorSpec / tuples, or plain callables ``(x) -> tensor`` with weight 1) for ``case``;
    terms of weight 0 are dropped. Raises :class:`ValidationError` with every problem."""
    problems = spec_problems(case, items)
    if problems:
        raise ValidationError("priors", problems)
    terms, stacked = [], {}
    for item in items:
        if callable(item) and not isinstance(item, (tuple, list, PriorSpec)):
            terms.append((getattr(item, "__name__", "callable"), 1.0, item, False, ""))
            continue
        s = PriorSpec.parse(item)
        if s.weight > 0:
            p = priors.get(s.name)
            term = p.builder(case, **dict(s.options))
            terms.append((p.name, s.weight, term, p.uses_labels, p.batch_problem))
            if p.stacked is not None:
                stacked[id(term)] = p.stacked(case, **dict(s.options))
    return Objective(terms, stacked)


# ---- the registered priors -----------------------------------------------------------------------------------

def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation of images x (B, C, H, W): mean |x[..., :, j+1] - x[..., :, j]| plus
    mean |x[..., i+1, :] - x[..., i, :]|. Returns a 0-d tensor (0 for non-image inputs)."""
    if x.ndim < 4:
        return x.new_zeros(())
    return _variation(x, x.new_zeros(()), lambda t: t.mean())


def total_variation_per_trial(x: torch.Tensor) -> torch.Tensor:
    """:func:`total_variation` of each of N trials' images x (N, B, C, H, W) -> (N,) (the 'tv' prior's
    stacked form: bit for bit its vmap)."""
    if x.ndim < 5:
        return x.new_zeros(x.shape[:1])
    dims = tuple(range(1, x.ndim))
    return _variation(x, x.new_zeros(x.shape[:1]), lambda t: t.mean(dims))


def _variation(x: torch.Tensor, tv: torch.Tensor, mean: Callable) -> torch.Tensor:
    """``tv`` + the mean (``mean``: over one image batch or per trial) absolute differences of horizontal and
    vertical neighbours of x (images last: (..., H, W))."""
    if x.shape[-1] > 1:
        tv = tv + mean((x[..., :, 1:] - x[..., :, :-1]).abs())
    if x.shape[-2] > 1:
        tv = tv + mean((x[..., 1:, :] - x[..., :-1, :]).abs())
    return tv


@register_prior("tv", source="Rudin, Osher, Fatemi 1992; Geiping et al. NeurIPS 2020",
                description="anisotropic total variation of the candidate images",
                stacked=lambda case: total_variation_per_trial)
def _tv(case: Case) -> Term:
    return total_variation


@register_prior("l2", source="Yin et al. CVPR 2020 (DeepInversion); Yin et al. CVPR 2021 (GradInversion)",
                description="mean squared (normalised) input",
                stacked=lambda case: mean_square_per_trial)
def _l2(case: Case) -> Term:
    return mean_square


def mean_square(x: torch.Tensor) -> torch.Tensor:
    """``mean(x^2)`` (the 'l2' prior's term; one function, so that batched setups with it share a batch)."""
    return x.pow(2).mean()


def mean_square_per_trial(x: torch.Tensor) -> torch.Tensor:
    """:func:`mean_square` of each of N trials' x (N, B, ...) -> (N,) (the 'l2' prior's stacked form)."""
    return x.pow(2).mean(tuple(range(1, x.ndim)))


def resolve_bn_source(case: Case, source: str) -> str:
    """'auto' -> 'update' for a train-mode case with returned buffers, else 'running'; 'none' for a model
    without BatchNorm layers (there is nothing to match)."""
    if source != "auto":
        return source
    if not BN.bn_layers(case.model):
        return "none"
    return "update" if case.bn_mode == "train" and case.observed_buffers else "running"


@dataclass(frozen=True)
class BNChannel:
    """Which BatchNorm statistics an attacker with a given threat model can match, for one case.

    source: the ``bn_prior`` to run with ('update', 'running' or 'none'); channel: where the statistics come
    from ('update': the client's returned buffers; 'threat-model': the model's running statistics, granted as the
    data's statistics; 'none'); sentence: the report's line, beginning "BN statistics: "."""

    source: str
    channel: str
    sentence: str


def bn_channel(case: Case, granted: bool) -> BNChannel:
    """The BatchNorm statistics an attack on ``case`` may use. The update's own (its returned running
    statistics, train mode) come first: the server receives them whatever the threat model, and they are the
    batch's (or, for FedAvg, its local steps' mixture), better than any statistics of the data at large. Else,
    when the threat model grants the data's statistics (``granted``), the model's running statistics stand for
    them, unless they are still torch's initial values (``num_batches_tracked`` 0 in every layer: the model
    never tracked data, its 0 / 1 statistics describe none; on the untrained ResNet-20 they lowered IG's PSNR
    on both photos measured, docs/batchnorm.md)."""
    layers = BN.bn_layers(case.model)
    if not layers:
        return BNChannel("none", "none", "BN statistics: not used: model has no BatchNorm")
    if case.bn_mode == "train" and case.observed_buffers:
        try:
            stats = BN.revealed_statistics(case)
        except ValidationError as e:
            why = "; ".join(e.problems)
        else:
            d = stats.describe()
            return BNChannel("update", "update", f"BN statistics: from the update (the returned running statistics "
                                                 f"of {d['layers']} BatchNorm layers reveal {d['reveals']})")
    elif case.bn_mode == "train":
        why = "the update carries no BatchNorm buffers"
    else:
        why = "the client ran BatchNorm in eval mode, so its returned statistics reveal nothing"
    if not granted:
        return BNChannel("none", "none", f"BN statistics: not used: {why}, and the threat model does not grant the "
                                         "data's statistics")
    tracked = [case.buffers.get(f"{n}.num_batches_tracked" if n else "num_batches_tracked") for n in layers]
    if all(t is not None and int(t) == 0 for t in tracked):
        return BNChannel("none", "none", f"BN statistics: not used: {why}; the threat model grants the data's "
                                         "statistics, but the model's running statistics are torch's initial "
                                         "values (no layer tracked a batch), so they describe no data")
    return BNChannel("running", "threat-model", f"BN statistics: granted by the threat model (the model's running "
                                                f"statistics of {len(layers)} BatchNorm layers stand for the data's; "
                                                f"{why})")


FEDAVG_MODES = ("unrolled", "sent-parameters")


def _bn_problems(case: Case, source: str = "auto", fedavg: str = "unrolled") -> list[str]:
    if source not in BN_SOURCES[1:]:
        return [f"bn-statistics source must be one of {BN_SOURCES[1:]}, got {source!r}"]
    if fedavg not in FEDAVG_MODES:
        return [f"bn-statistics fedavg must be one of {FEDAVG_MODES}, got {fedavg!r}"]
    if not BN.bn_layers(case.model):
        return ["bn-statistics: the model has no BatchNorm layer with running statistics"]
    source = resolve_bn_source(case, source)
    if source == "update":
        try:
            BN.revealed_statistics(case)
        except ValidationError as e:
            return [f"bn-statistics source 'update': {p}" for p in e.problems]
    return []


@register_prior("bn-statistics", source="Yin et al. CVPR 2021 (GradInversion); Yin et al. CVPR 2020 (DeepInversion)",
                description="BatchNorm input statistics of the candidate batch matched to the revealed ('update') "
                            "or the model's running ('running') statistics", problems=_bn_problems, uses_labels=True,
                batch_problem="it runs its own forward pass of the model with hooks that record the BatchNorm "
                              "inputs (and, for FedAvg 'update', replays the client's local steps), which vmap "
                              "over trials does not batch")
def _bn_statistics(case: Case, source: str = "auto", fedavg: str = "unrolled") -> Term:
    source = resolve_bn_source(case, source)
    unrolled = None
    if source == "update":
        stats = BN.revealed_statistics(case)
        targets = {n: (s.mean, s.var) for n, s in stats.layers.items()}
        chunks = BN.candidate_chunks(case, stats)
        if not stats.exact and fedavg == "unrolled":
            unrolled = next(iter(stats.layers.values())).weights
    else:
        buf = case.buffers
        targets = {n: (buf[f"{n}.running_mean" if n else "running_mean"], buf[f"{n}.running_var" if n else "running_var"])
                   for n in BN.bn_layers(case.model)}
        chunks = None
    features = BN.FeatureStatistics(case.model, list(targets))

    def term(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen = features(x, chunks) if unrolled is None else features.unrolled(case, x, labels, unrolled)
        total = x.new_zeros(())
        for n, (mu, var) in targets.items():
            m, v = seen[n]
            total = total + (m - mu).norm() + (v - var).norm()
        return total

    return term


FC_DISTANCES = ("l2", "cosine")


def _fc_layer(case: Case, layer: str | None) -> str | None:
    from ..analytic import biased_linear_layers

    if layer:
        return layer
    layers = biased_linear_layers(case)
    return layers[-1] if layers else None


def _fc_problems(case: Case, layer: str | None = None, distance: str = "l2") -> list[str]:
    from ..analytic import _layer_problems

    if distance not in FC_DISTANCES:
        return [f"fc-features distance must be one of {FC_DISTANCES}, got {distance!r}"]
    name = _fc_layer(case, layer)
    if name is None:
        return ["fc-features: the model has no fully connected (nn.Linear) layer with a bias in the observed update"]
    p = [f"fc-features: {q}" for q in _layer_problems(case, name)]
    if case.batch_size != 1:
        p.append(f"fc-features: the layer's input is recovered exactly for one sample only, the case has a batch "
                 f"of {case.batch_size} (its rows are mixtures)")
    if not case.observation.gradient_is_exact(case.batch_size):
        p.append("fc-features: the update is not one gradient (FedAvg with several local steps or mini-batches): "
                 "the layer's input changes between the steps, so the ratio is a mixture")
    return p


@register_prior("fc-features", source="Phong et al. 2018; Geiping et al. NeurIPS 2020 (input of a biased FC layer "
                                      "from its gradients); feature matching as in Liu et al. 2024",
                description="the candidate's input features of a biased FC layer (default: the classifier) matched "
                            "to the ones its weight and bias gradients reveal (exact for one sample)",
                problems=_fc_problems,
                batch_problem="it runs its own forward pass of the model with a hook on the layer, which vmap over "
                              "trials does not batch")
def _fc_features(case: Case, layer: str | None = None, distance: str = "l2") -> Term:
    from ... import functional as Fn
    from ..analytic import recover_linear_input

    name = _fc_layer(case, layer)
    target = recover_linear_input(case, name).least_squares.detach().flatten()
    norm2 = target.pow(2).sum().clamp_min(1e-30)
    module = dict(case.model.named_modules())[name]

    def term(x: torch.Tensor) -> torch.Tensor:
        seen: list[torch.Tensor] = []
        hook = module.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            Fn.forward(case.model, case.parameters, case.buffers, x)
        finally:
            hook.remove()
        phi = seen[0].reshape(-1)
        t = target.to(device=phi.device, dtype=phi.dtype)
        if distance == "cosine":
            return 1.0 - torch.dot(phi, t) / (phi.norm() * t.norm()).clamp_min(1e-30)
        return (phi - t).pow(2).sum() / norm2.to(phi.dtype)

    return term


@register_prior("group-consistency", source="Yin et al. CVPR 2021 (GradInversion)",
                description="mean squared distance to a consensus batch (normalised space)")
def _group(case: Case, target: torch.Tensor | None = None) -> Term:
    if target is None:
        raise ValidationError("group-consistency", ["needs target= (the consensus batch, normalised (B, *shape))"])
    t = target.detach()
    return lambda x: (x - t).pow(2).mean()


def group_consensus(batches: Sequence[torch.Tensor], spec=None) -> torch.Tensor:
    """The consensus of several restarts' batches (B, *shape) (GradInversion's group mean): each batch's samples
    are first put in the order of the first one's (the Hungarian assignment of :func:`gradleak.metrics.align`, on
    the images ``spec.denormalize(batch)`` when a DataSpec is given), so that restarts that found the same images
    in another order agree, then averaged."""
    from ...metrics import align

    image = spec.denormalize if spec is not None else (lambda t: t)
    ref = batches[0].detach()
    aligned = [ref]
    for b in batches[1:]:
        b = b.detach()
        order = align(image(b), image(ref))
        aligned.append(b[torch.as_tensor(order, device=b.device)])
    return torch.stack(aligned).mean(0)
