"""Attacks of a malicious server: it may change the model it sends before the client computes its update.

- ``imprint`` (:mod:`.imprint`): Robbing the Fed's imprint block (Fowl et al., ICLR 2022).
- ``trap-weights`` (:mod:`.trap`): trap weights in the first fully connected layer (Boenisch et al., EuroS&P 2023).

Secure aggregation over K clients (what the server sees when each client trains the crafted model):
:func:`gradleak.defenses.aggregate_cases`.

Each attack class has ``crafts_model = True``: it needs the right to modify the model, so an honest-but-curious
audit must skip it (its ``requirements`` refuse a model it did not craft). ``attack.craft(model, spec,
generator=...)`` returns the model the server sends; simulate the client on it.
"""

from .crafted import CraftRecord, crafted_record
from .imprint import Imprint, ImprintBlock, ImprintedModel, expected_share, interval_masses
from .outcome import outcomes
from .trap import TrapWeights

__all__ = ["CraftRecord", "crafted_record", "Imprint", "ImprintBlock", "ImprintedModel", "expected_share",
           "interval_masses", "outcomes", "TrapWeights"]
