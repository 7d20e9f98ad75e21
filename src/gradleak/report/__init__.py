"""The run directory a user looks at: ``reconstruction.png`` (truth row above reconstruction row, PSNR under
each), ``metrics.json``, ``reconstruction.safetensors``, ``config.json`` (everything needed to re-run, with the
software environment) and a self-contained ``report.html``.

A run directory is written atomically and locked while it is written (:class:`RunDirectory`); see
docs/reliability.md for what it guarantees.
"""

from __future__ import annotations

from .environment import environment
from .figures import image_grid
from .jsonable import to_jsonable
from .rundir import RunDirectory, check_output_file
from .writer import metrics_of, run_warnings, write_report

__all__ = ["write_report", "image_grid", "to_jsonable", "RunDirectory", "check_output_file", "environment",
           "metrics_of", "run_warnings"]
