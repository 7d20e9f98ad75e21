"""Integrations with federated-learning frameworks (optional extras)."""
