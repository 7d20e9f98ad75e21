"""How SIGINT (Ctrl-C) and SIGTERM become interrupts: one place for the CLI and the audit's executor."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def interrupt_on_signals(handler=None):
    """While active, SIGTERM (what ``timeout``, schedulers, ``docker stop`` send) and SIGINT raise
    KeyboardInterrupt in the main thread (or call ``handler(signum, frame)`` instead), so a run stops the same
    way for both; the previous handlers are restored after. A signal that was ignored (SIG_IGN, e.g. under
    ``nohup``) stays ignored. Does nothing outside the main thread (signal handlers can only be set there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    handler = handler or interrupt

    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        prev = signal.getsignal(sig)
        if prev is signal.SIG_IGN:
            continue
        old[sig] = prev
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, prev in old.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
