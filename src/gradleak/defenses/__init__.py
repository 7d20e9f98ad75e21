"""Defenses against gradient leakage, their privacy accounting and their utility cost.

Update transforms (:mod:`.update`; applied to what the client would send, no privacy guarantee):

- ``noise``: i.i.d. Gaussian (``sigma``) or Laplace (``kind=laplace,scale=b``) noise on every entry.
- ``clip-update``: scale the whole update down to L2 norm ``max_norm``.
- ``clip-noise-update``: clip-update then Gaussian noise ``noise_multiplier * max_norm``: NOT DP-SGD, no epsilon.
- ``prune``: zero the ``ratio`` fraction of smallest-magnitude entries (per tensor or global).
- ``quantize``: uniform quantisation to ``bits`` bits per tensor.
- ``topk``: send the ``ratio`` fraction of largest entries, with or without error feedback.

In-client defenses (they change the client's computation; ``acts_in_client``):

- ``dp-sgd`` (:mod:`.dpsgd`): per-example clipping, Gaussian noise on the sum, opacus's (epsilon, delta).
- ``soteria`` (:mod:`.soteria`): prune representation features in the first FC layer's gradient.

Protocols: ``secure-aggregation`` (:mod:`.secagg`): the server sees only the mean of K clients' updates
(pairwise masking); :func:`aggregate_cases` gives the one Case a server sees from K clients' Cases.

Cost: :func:`utility` (:mod:`.utility`): held-out accuracy of FedAvg with each defense beside the baseline.

``create(name, **options)``, ``parse("name:k=v,...")`` and ``compose(a, b)`` build them; options are typed and
every bad value is one error naming the defense. Random defenses take a ``torch.Generator``.
"""

from .base import Compose, Defense, Update, as_defense, compose, create, defenses, option, parse
from .dpsgd import DPSGD, accountant_epsilon
from .secagg import Aggregate, SecureAggregation, aggregate_cases, secure_aggregate
from .soteria import Soteria
from .update import ClipNoiseUpdate, ClipUpdate, Noise, Prune, Quantize, TopK, global_norm
from .utility import DefenseUtility, UtilityResult, client_shards, utility

__all__ = ["Defense", "Compose", "Update", "option", "create", "parse", "compose", "as_defense", "defenses",
           "Noise", "ClipUpdate", "ClipNoiseUpdate", "Prune", "Quantize", "TopK", "DPSGD", "accountant_epsilon",
           "Soteria", "SecureAggregation", "secure_aggregate", "aggregate_cases", "Aggregate", "utility", "UtilityResult",
           "DefenseUtility", "client_shards", "global_norm"]
