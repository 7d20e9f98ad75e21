"""Gradient matching by optimisation: DLG, iDLG, Inverting Gradients (FedSGD and FedAvg)."""

from .batched import reconstruct_many
from .common import GradientMatcher, total_variation
from .dlg import DLG, IDLG
from .inverting import InvertingGradients

__all__ = ["DLG", "IDLG", "InvertingGradients", "GradientMatcher", "total_variation", "reconstruct_many"]
