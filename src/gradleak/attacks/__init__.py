"""Attacks: ``create(name, **options)`` builds one; ``attacks.names()`` lists them."""

from .base import Attack, Reconstruction, RunContext, attacks, create, register

__all__ = ["Attack", "Reconstruction", "RunContext", "attacks", "create", "register"]
