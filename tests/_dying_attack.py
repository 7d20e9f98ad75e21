"""A test-only attack whose process dies as one killed for memory does (SIGKILL). It lives outside the test
modules so that it is registered only while a test uses it (the ``dying_attack`` fixtures); the executor
imports this module in its workers (the attack is registered outside gradleak), so a spawned or Ray worker
knows it."""

import dataclasses
import os
import signal

from gradleak.attacks import Attack, Reconstruction
from gradleak.attacks.base import attacks

NAME = "test-dies"


@dataclasses.dataclass
class _NoOptions:
    pass


class Dies(Attack):
    name = NAME
    Options = _NoOptions

    def _reconstruct(self, case, ctx) -> Reconstruction:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("unreachable")


attacks.register(NAME, overwrite=True)(Dies)  # in a worker: on import


def registered():
    """Register it here for one test; returns the function that removes it again."""
    attacks.register(NAME, overwrite=True)(Dies)
    return lambda: attacks._items.pop(NAME, None)
