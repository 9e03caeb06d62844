"""A background thread that writes records to a :class:`DumpWriter`, behind a queue bounded in bytes."""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque

import torch

from ..dump.writer import DumpWriter
from ..errors import DumpError


def _lower_priority() -> None:
    """Nice the calling thread (Linux: threads have their own nice value), so that the writer takes
    the CPU the training's threads leave idle instead of preempting them mid parallel region."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


WRITER_NICE = 10


class StreamWriter:
    """Owns ``writer`` on its own thread: the training loop ``put``s work and never touches the file.

    ``put`` blocks while more than ``max_queue_bytes`` of tensors wait (one item is always let in),
    so memory is bounded whatever the number of steps. A failure on the thread (disk full, ...) is
    re-raised as :class:`DumpError` by the next ``put``/``flush``/``close``.
    """

    def __init__(self, writer: DumpWriter, max_queue_bytes: int):
        self.writer = writer
        self.max_queue_bytes = max(1, int(max_queue_bytes))
        self.bytes_written = 0
        """Uncompressed bytes of the tensors written so far (updated by the thread)."""
        self.steps_written = 0
        self._queue: deque = deque()
        self._pending = 0
        self._cv = threading.Condition()
        self._error: BaseException | None = None
        self.failed = False
        """A write failed: the file is then never marked complete."""
        self._closed = False
        self._busy = False
        self._thread = threading.Thread(target=self._run, name="nmgrad-capture-writer", daemon=True)
        self._thread.start()

    # -- producer side (training thread) --
    def add_layer(self, **kwargs) -> None:
        self._put(("layer", kwargs), 0)

    def write(self, layer: str, kind: str, step: int, call: int, tensor: torch.Tensor) -> None:
        self._put(("write", (layer, kind, step, call, tensor)), tensor.numel() * tensor.element_size())

    def step_done(self, step: int) -> None:
        self._put(("step", step), 0)

    def set_run(self, **updates) -> None:
        self._put(("run", updates), 0)

    def _put(self, item, nbytes: int) -> None:
        with self._cv:
            while self._pending > 0 and self._pending + nbytes > self.max_queue_bytes and self._error is None:
                self._cv.wait()
            self._raise()
            self._queue.append((item, nbytes))
            self._pending += nbytes
            self._cv.notify_all()

    def flush(self) -> None:
        """Wait until everything queued so far is on disk (flushed)."""
        with self._cv:
            while (self._queue or self._busy) and self._error is None:
                self._cv.wait()
            self._raise()

    def close(self, interrupted: str | None = None) -> None:
        """Write what is queued, then mark ``interrupted`` (a reason) if given and close the file."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join()
        try:
            if interrupted is not None and self.writer._f.id.valid:
                self.writer.mark_interrupted(interrupted)
        finally:
            self.writer.close(complete=interrupted is None and not self.failed)
        with self._cv:
            self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, DumpError):
                raise err
            raise DumpError(f"writing {self.writer.path} failed: {type(err).__name__}: {err}") from None

    # -- consumer side (writer thread) --
    def _run(self) -> None:
        _lower_priority()
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                (op, arg), nbytes = self._queue.popleft()
                self._busy = True
            try:
                if self._error is None:
                    self._do(op, arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                with self._cv:
                    self._error = exc
                    self.failed = True
            finally:
                with self._cv:
                    self._busy = False
                    self._pending -= nbytes
                    self._cv.notify_all()

    def _do(self, op: str, arg) -> None:
        if op == "write":
            self.bytes_written += self.writer.write(*arg)
        elif op == "layer":
            self.writer.add_layer(**arg)
        elif op == "step":
            self.writer.step_done(arg)
            self.steps_written += 1
        elif op == "run":
            self.writer.set_run(**arg)
