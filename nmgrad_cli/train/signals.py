"""Ctrl-C during training: finish the step in progress, then stop (:class:`CtrlC`)."""

from __future__ import annotations

import signal
import threading


class CtrlC:
    """SIGINT while training (a context manager, main thread only): the first Ctrl-C lets the step in
    progress finish and stops the run after it (``seen``), the second interrupts at once
    (KeyboardInterrupt). No exception is raised at an arbitrary point by the first, so none can be
    lost in a finaliser or leave a half-written metrics line."""

    def __init__(self) -> None:
        self.seen = False
        self._old: list = []  # the handler to put back, when one was installed

    def _handler(self, signum, frame) -> None:
        if self.seen:
            raise KeyboardInterrupt
        self.seen = True

    def __enter__(self) -> CtrlC:
        if threading.current_thread() is threading.main_thread():
            self._old = [signal.signal(signal.SIGINT, self._handler)]
        return self

    def __exit__(self, *exc) -> None:
        if self._old:
            old = self._old.pop()
            signal.signal(signal.SIGINT, old if old is not None else signal.SIG_DFL)
