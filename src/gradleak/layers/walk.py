"""Walking a model into a :class:`Chain` of registered layers (torch.fx), every problem collected, and the one
chain-forward loop (:func:`forward`) the attacks and analyses run layers with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from ..activations import Activation, is_activation_function
from ..activations import resolve as resolve_activation
from ..errors import RequirementError
from .rules import _LAYER_RULES, Layer, Shape, _prod, _rule_for, activation_of

_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_WHY = {
    nn.modules.batchnorm._BatchNorm: "BatchNorm mixes the batch (train mode) or adds a per-channel affine map "
                                     "outside the layer systems",
    nn.GroupNorm: "normalisation is outside the layer systems",
    nn.LayerNorm: "normalisation is outside the layer systems",
    nn.modules.pooling._MaxPoolNd: "max pooling is not invertible",
    nn.modules.pooling._AdaptiveMaxPoolNd: "max pooling is not invertible",
    nn.modules.pooling._AvgPoolNd: "pooling has no weights and loses information",
    nn.modules.pooling._AdaptiveAvgPoolNd: "pooling has no weights and loses information",
    nn.Softmax: "a softmax output is not a linear head",
    nn.LogSoftmax: "a softmax output is not a linear head",
}


def _why_unsupported(m: nn.Module) -> str:
    for t, why in _WHY.items():
        if isinstance(m, t):
            return why
    return "no per-layer rule for this module type (register one with gradleak.layers.register_layer)"


class _ChainTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _rule_for(m) is not None or activation_of(m) is not None or isinstance(m, _PASSTHROUGH + (nn.Flatten,)):
            return True
        if isinstance(m, tuple(_WHY)):
            return True
        return super().is_leaf_module(m, qualname)


@dataclass(frozen=True)
class Issue:
    """One problem found while walking a model: where (module path or node name), what (module type or
    operation), why (the reason, shared by every module with the same problem)."""

    where: str
    what: str
    why: str


def _group(issues: Sequence[Issue], limit: int = 8) -> list[str]:
    """One sentence per distinct (what, why), naming every module (up to ``limit``, then 'and N more')."""
    groups: dict[tuple[str, str], list[str]] = {}
    for i in issues:
        groups.setdefault((i.what, i.why), [])
        if i.where not in groups[(i.what, i.why)]:
            groups[(i.what, i.why)].append(i.where)
    out = []
    for (what, why), wheres in groups.items():
        names = ", ".join(f"'{w}'" for w in wheres[:limit])
        if len(wheres) > limit:
            names += f" and {len(wheres) - limit} more"
        out.append(f"{names} ({what}): {why}" if what else f"{names}: {why}")
    return out


@dataclass
class Chain:
    """A model seen as a chain of weight layers (input side first).

    layers: the :class:`Layer` objects; issues: structural problems (unsupported modules, skip connections,
    shape mismatches, non-linear heads) as :class:`Issue`; ``problems`` formats them, one sentence per kind
    naming every module; input_shape: the per-sample input shape.
    """

    input_shape: Shape
    layers: list[Layer] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    #: activations met where no layer owns them (after an unsupported module): (module path, Activation)
    loose_activations: list[tuple[str, Activation]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Structural problems, one sentence per kind of problem, naming each module."""
        return _group(self.issues)

    @property
    def supported(self) -> bool:
        return not self.issues

    @property
    def head(self) -> Layer | None:
        return self.layers[-1] if self.layers else None

    @property
    def all_linear(self) -> bool:
        return bool(self.layers) and all(l.dense for l in self.layers)

    def activation_issues(self) -> list[Issue]:
        out = []
        acts = [(l.activation_name or f"after {l.name}", l.activation) for l in self.layers[:-1]]
        for where, act in acts + list(self.loose_activations):
            if not act.invertible:
                out.append(Issue(where, act.name,
                                 "not invertible: the recursion needs an invertible activation after each hidden "
                                 "layer (identity, leaky-relu, sigmoid, tanh, softplus, or one registered with an "
                                 "inverse)"))
        return out

    def activation_problems(self) -> list[str]:
        """Hidden layers whose activation has no inverse (the recursive attacks need one), formatted."""
        return _group(self.activation_issues())

    def all_problems(self, *, invertible: bool = True) -> list[str]:
        """Structural problems plus (``invertible``) non-invertible activations, grouped, naming each module."""
        return _group(list(self.issues) + (self.activation_issues() if invertible else []))

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def describe(self) -> list[dict]:
        return [l.describe() for l in self.layers]

    def forward(self, x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:func:`forward` through the whole chain."""
        return forward(self.layers, x, params)


def walk(model: nn.Module, input_shape: Sequence[int]) -> Chain:
    """Trace ``model`` into a :class:`Chain` of supported layers for per-sample inputs of ``input_shape``.

    Never raises for an unsupported model: every problem goes to ``chain.issues`` (formatted by
    ``chain.problems``, naming each module), so callers can list them all at once. Supported: chains of
    registered weight layers (nn.Linear, nn.Conv2d, ...), activation modules or functions, Flatten / reshape,
    Identity, Dropout (the client runs in eval mode). A weight layer's activation is the activation right
    after it; a weight layer followed directly by another has the identity.
    """
    chain = Chain(tuple(int(s) for s in input_shape))
    add = chain.issues.append
    name = type(model).__name__
    try:
        graph = _ChainTracer().trace(model)
    except Exception as e:  # dynamic control flow etc.
        add(Issue(name, "", f"cannot be traced into a chain of layers ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:160]}); the closed-form systems need a plain feed-forward "
                            "chain (an nn.Sequential works)"))
        return chain
    modules = dict(model.named_modules())
    nodes = list(graph.nodes)
    shape: Shape | None = chain.input_shape
    prev_out: Shape | None = chain.input_shape
    last: Layer | None = None
    act_since_layer = False
    current = None
    broken = False  # after an unsupported module: activations cannot be attributed to a layer
    branch = "skip connection or branch: the closed-form systems need a plain chain of layers"
    for node in nodes:
        if node.op == "placeholder":
            if current is not None:
                add(Issue(name, "forward", "takes more than one input"))
            current = node
            continue
        if node.op == "get_attr":
            continue
        if node.op == "output":
            break
        tensor_args = [a for a in node.all_input_nodes if a.op != "get_attr"]
        where = node.target if node.op == "call_module" else node.name
        what = type(modules[node.target]).__name__ if node.op == "call_module" else _fn_name(node)
        if len(tensor_args) > 1:
            add(Issue(where, what, f"combines {len(tensor_args)} tensors - {branch}"))
        elif tensor_args and tensor_args[0] is not current:
            add(Issue(where, what, f"reads an earlier tensor - {branch}"))
        current = node
        if len(tensor_args) != 1 or len(tensor_args[0].users) > 1:
            shape = None
        if node.op == "call_module":
            m = modules[node.target]
            rule = _rule_for(m)
            act = activation_of(m)
            if rule is not None:
                last, act_since_layer = None, False
                if shape is None:
                    continue
                layer = rule(len(chain.layers), node.target, m, shape, prev_out if prev_out is not None else shape)
                prefix = {"linear": "fc", "conv2d": "conv"}.get(layer.kind, layer.kind)
                layer.label = f"{prefix}{len(chain.layers) + 1}"
                chain.issues.extend(Issue(layer.name, what, p) for p in layer.problems())
                chain.layers.append(layer)
                last = layer
                shape = prev_out = layer.out_shape
            elif act is not None:
                if broken and last is None:
                    chain.loose_activations.append((node.target, act))
                else:
                    _attach_activation(chain, last, act, node.target, act_since_layer)
                act_since_layer = True
            elif isinstance(m, _PASSTHROUGH):
                pass
            elif isinstance(m, nn.Flatten):
                if shape is not None:
                    if m.start_dim not in (1, -len(shape) - 1) or m.end_dim != -1:
                        add(Issue(where, what, "must flatten every sample dimension (start_dim=1, end_dim=-1)"))
                    shape = (_prod(shape),)
            else:
                add(Issue(where, what, _why_unsupported(m)))
                shape, last, broken = None, None, True
        elif node.op in ("call_function", "call_method"):
            fn = node.target
            act = (resolve_activation(fn, node.args[1:], node.kwargs)
                   if is_activation_function(fn) and node.op in ("call_function", "call_method") else None)
            if act is not None:
                if broken and last is None:
                    chain.loose_activations.append((node.name, act))
                else:
                    _attach_activation(chain, last, act, None, act_since_layer)
                act_since_layer = True
            elif _is_flatten(node):
                if shape is not None:
                    shape = (_prod(shape),)
            elif node.op == "call_function" and fn in (F.dropout, F.dropout2d):
                pass
            elif len(tensor_args) <= 1:
                add(Issue(where, what, "operation outside the supported chain of layers"))
                shape, last, broken = None, None, True
            else:
                shape, last, broken = None, None, True
        else:
            add(Issue(where, node.op, "operation outside the supported chain of layers"))
            shape, last, broken = None, None, True
    if not chain.layers and not chain.issues:
        add(Issue(name, "", "has no weight layer the closed-form systems know (known: "
                            f"{', '.join(sorted(t.__name__ for t in _LAYER_RULES))})"))
    elif chain.layers and not chain.layers[-1].can_be_head and not chain.issues:
        add(Issue(chain.layers[-1].name, type(chain.layers[-1].module).__name__,
                  "the network must end with a linear layer"))
    if not broken and chain.layers and act_since_layer and last is chain.layers[-1]:
        head = chain.layers[-1]
        add(Issue(head.activation_name or f"after {head.name}", head.activation.name,
                  "follows the output layer: the head must be linear (the loss applies the link function)"))
    return chain


def _fn_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", repr(t))


def _is_flatten(node: fx.Node) -> bool:
    t = node.target
    if node.op == "call_function" and t is torch.flatten:
        start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
        return start == 1
    if node.op == "call_method" and t in ("view", "reshape", "flatten"):
        args = node.args[1:]
        if t == "flatten":
            start = node.kwargs.get("start_dim", args[0] if args else 0)
            return start == 1
        if len(args) == 2 and args[1] == -1:
            return True
    return False


def _attach_activation(chain: Chain, last: Layer | None, act: Activation, where: str | None, again: bool) -> None:
    where = where or act.name
    if last is None and not again:
        if not chain.layers:
            chain.issues.append(Issue(where, act.name, "comes before any weight layer: an activation on the input "
                                                       "is outside the layer systems"))
    elif again or last is None:
        chain.issues.append(Issue(where, act.name, "is a second activation in a row: one activation per layer is "
                                                   "supported"))
    else:
        last.activation = act
        last.activation_name = where


def require_chain(model: nn.Module, input_shape: Sequence[int], who: str, *, invertible: bool = True,
                  extra: Sequence[str] = ()) -> Chain:
    """Walk ``model`` and raise one :class:`RequirementError` listing EVERY problem (structural, and
    non-invertible activations when ``invertible``), plus ``extra`` problems of the caller."""
    chain = walk(model, input_shape)
    problems = chain.all_problems(invertible=invertible) + list(extra)
    if problems:
        raise RequirementError(who, problems)
    return chain


# =====================================================================================================
# Stacked systems, rank and least-squares solutions
# =====================================================================================================

def forward(layers: Sequence[Layer], x: torch.Tensor, params: Mapping[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run one sample ``x`` (in_shape of ``layers[0]``) through consecutive ``layers`` of a chain with the
    parameter tensors ``params`` (name -> tensor; may require grad). Returns, per layer, (its input h (1,
    *in_shape), its pre-activation z (1, *out_shape)); the last layer's z is the output (the logits), its
    activation is not applied. The one chain-forward loop of the closed-form attacks and analyses."""
    out = []
    h = x
    for j, layer in enumerate(layers):
        h = h.reshape(1, *layer.in_shape)
        b = params[layer.bias_name] if layer.has_bias else None
        z = layer.add_bias(layer.apply_weight(h, params[layer.weight_name]), b)
        out.append((h, z))
        if j < len(layers) - 1:
            h = layer.activation.fn(z)
    return out
