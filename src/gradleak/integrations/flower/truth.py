"""The simulation-only truth channel: clients of a Flower *simulation* hand their private batch to the audit so
that it can score its reconstructions (PSNR, SSIM); without it the audit reports the residual only.

The batch never travels in a Flower message. :class:`SimulationTruth` is a registry on the local disk, keyed by
round and Flower node id, created by the process that starts the simulation (a fresh directory holding a random
token). The ClientApp object that ``run_simulation`` hands to its Ray workers carries the registry; a client
writes its batch with :meth:`SimulationTruth.share` only if that directory exists on its machine with the same
token, which is true only for clients started by the same simulation on the same machine. In a real deployment
the ClientApp is loaded on another machine from the app's code: any ``SimulationTruth`` built there is a
different registry with another token that the server never reads, and ``share`` of the server's registry fails
there, so no switch, config key or environment variable can turn it on by accident.
"""

from __future__ import annotations

import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ...case import Truth
from ...errors import GradleakError, ValidationError

_MARKER = "gradleak-simulation-truth"


def safe_name(name: str) -> str:
    """``name`` reduced to characters safe in a file name."""
    out = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name)).strip("._")
    return out or "client"


class SimulationTruth:
    """A registry of the clients' private batches for one simulation (see the module docstring).

    directory: where the batches go (default: a fresh temporary directory, removed by :meth:`close`).
    """

    def __init__(self, directory: str | Path | None = None):
        self._owned = directory is None
        self.directory = Path(tempfile.mkdtemp(prefix="gradleak-truth-") if directory is None else directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_hex(16)
        (self.directory / _MARKER).write_text(self.token)

    def __repr__(self) -> str:
        return f"SimulationTruth({str(self.directory)!r})"

    def _path(self, node: Any, server_round: int) -> Path:
        node_id = getattr(node, "node_id", node)  # a Flower Context, or the node id itself
        return self.directory / f"round-{int(server_round):03d}" / f"node-{safe_name(str(node_id))}.pt"

    def _check_here(self) -> None:
        marker = self.directory / _MARKER
        if not marker.is_file() or marker.read_text().strip() != self.token:
            raise GradleakError(
                f"SimulationTruth: the registry {self.directory} of this simulation is not on this machine; the "
                "truth channel works only for clients started by the same Flower simulation (run_simulation) as "
                "the audit, never in a real deployment")

    def share(self, context: Any, server_round: int, inputs: torch.Tensor, labels: torch.Tensor) -> None:
        """Client side: record the batch behind this round's update, keyed by the node (``context``: the
        ClientApp's Flower Context, or its node id). ``inputs`` (B, *shape) in IMAGE space (the data spec's
        value range, before normalisation), ``labels`` int (B,), in the order the client trained on them."""
        self._check_here()
        if not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point():
            raise ValidationError("SimulationTruth.share", ["inputs must be a floating-point tensor (B, *shape)"])
        labels = torch.as_tensor(labels)
        if labels.ndim != 1 or labels.shape[0] != inputs.shape[0]:
            raise ValidationError("SimulationTruth.share", [f"labels must have shape ({inputs.shape[0]},), "
                                                            f"got {tuple(labels.shape)}"])
        path = self._path(context, server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"inputs": inputs.detach().cpu().clone(), "labels": labels.detach().cpu().to(torch.long)}, tmp)
        tmp.replace(path)

    def get(self, node_id: Any, server_round: int) -> Truth | None:
        """Server side: the batch node ``node_id`` shared for ``server_round``, or None."""
        path = self._path(node_id, server_round)
        if not path.is_file():
            return None
        d = torch.load(path, map_location="cpu", weights_only=True)
        return Truth(inputs=d["inputs"], labels=d["labels"])

    def close(self) -> None:
        """Remove the registry's directory if this object created it."""
        if self._owned:
            shutil.rmtree(self.directory, ignore_errors=True)
