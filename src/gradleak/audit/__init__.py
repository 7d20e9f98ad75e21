"""The privacy audit of a deployment: ``gl.audit(model, data, ...)`` / ``gradleak audit`` (docs/audit.md)."""

from .api import AuditConfig, AuditResult, audit, to_command
from .threat import ThreatModel, threat_models

__all__ = ["AuditConfig", "AuditResult", "ThreatModel", "audit", "threat_models", "to_command"]
