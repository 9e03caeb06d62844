"""Writing a capture's dump: ``<out>.partial`` held by one process, a background writer thread behind
a queue bounded in bytes, signal handling until the file is renamed to ``<out>``.

:class:`CaptureFile` is the whole life of the output file, independent of the training loop::

    with CaptureFile(path) as cap:
        ...                                              # build the model (signals only recorded)
        cap.open(run_meta, compression="lzf", queue_bytes=2**28)
        for step in ...:
            if cap.requested: break                      # SIGINT/SIGTERM asked to stop
            ...; cap.stream.write(layer, "grad", step, call, dy); cap.stream.step_done(step)
        cap.finish(None)                                 # or the reason it stopped early
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import torch

from ..dump.writer import DumpWriter, failure_reason
from ..errors import DumpError, Interrupted, OutputError


def _lower_priority() -> None:
    """Nice the calling thread (Linux: threads have their own nice value), so that the writer takes
    the CPU the training's threads leave idle instead of preempting them mid parallel region."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)


WRITER_NICE = 10


class StreamWriter:
    """Owns ``writer`` on its own thread: the training loop ``put``s work and never touches the file.

    ``put`` blocks while more than ``max_queue_bytes`` of tensors wait (one item is always let in),
    so memory is bounded whatever the number of steps. A failure on the thread (disk full, ...) cuts
    the file back to its last completed step (:meth:`DumpWriter.abort`), drops the rest of the queue
    and is re-raised as :class:`DumpError` by the next ``put``/``flush``/``close``.
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
        self.abandoned = False
        """:meth:`abandon` was called: what was still queued then was dropped."""
        self.abandon_reason = ""
        self.failure: DumpError | None = None
        """The write failure, once it has been raised."""
        self._thread = threading.Thread(target=self._run, name="nmgrad-capture-writer", daemon=True)
        self._thread.start()

    @property
    def queued_bytes(self) -> int:
        """Tensor bytes handed over and not yet written."""
        return self._pending

    # -- producer side (training thread) --
    def add_layer(self, **kwargs) -> None:
        self._put(("layer", kwargs), 0)

    def write(self, layer: str, kind: str, step: int, call: int, tensor: torch.Tensor, ready=None) -> None:
        """Queue one record. ``ready``: an event (``.synchronize()``) the thread waits on before it
        reads ``tensor`` (a device-to-host copy still in flight, :class:`~.host.HostCopies`)."""
        self._put(("write", (layer, kind, step, call, tensor, ready)), tensor.numel() * tensor.element_size())

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

    def abandon(self, reason: str = "abandoned") -> None:
        """Drop what is still queued: the thread finishes the item it is writing and takes no other.

        Safe to call from a signal handler (it takes no lock); ``steps_completed`` then counts the
        steps written before it, and :meth:`close` marks the file interrupted with ``reason``."""
        if not self.abandoned:
            self.abandon_reason = reason
        self.abandoned = True

    def close(self, interrupted: str | None = None) -> None:
        """Write what is queued (unless :meth:`abandon`), then mark ``interrupted`` (a reason) if
        given and close the file. A failure leaves the file cut back to its last completed step."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        while self._thread.is_alive():
            try:
                self._thread.join()
            except BaseException:  # e.g. KeyboardInterrupt without our signal handlers: stop writing,
                self.abandon()  # but never leave the thread inside HDF5 when the interpreter exits
                self._thread.join()
                raise
        if self.failed:  # the thread has already cut the file back and closed it
            with self._cv:
                self._raise()
            return
        if self.abandoned and interrupted is None:
            interrupted = self.abandon_reason
        if interrupted is not None:
            self.writer.mark_interrupted(interrupted)
        try:
            self.writer.close(complete=interrupted is None)  # on failure: cut back to the last step
        except DumpError as exc:
            self.failed = True
            self.failure = exc
            raise

    def _raise(self) -> None:
        """Raise the thread's failure once (as :class:`DumpError`; kept in ``failure``)."""
        if self._error is not None:
            err, self._error = self._error, None
            if not isinstance(err, DumpError):
                err = DumpError(f"writing {self.writer.path} failed: {failure_reason(err)}")
            self.failure = err
            raise err

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
                if not self.failed and not self.abandoned:
                    self._do(op, arg)
            except BaseException as exc:  # noqa: BLE001 - handed to the producer
                self.writer.abort(type(exc).__name__)
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
            *record, ready = arg
            if ready is not None:
                ready.synchronize()
            self.bytes_written += self.writer.write(*record)
        elif op == "layer":
            self.writer.add_layer(**arg)
        elif op == "step":
            self.writer.step_done(arg)
            self.steps_written += 1
        elif op == "run":
            self.writer.set_run(**arg)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".partial")


class PartialFile:
    """``<out>.partial``, owned by one process at a time (an exclusive ``flock`` held until it is
    renamed to ``<out>`` or removed), so a second capture to the same ``--out`` is refused before
    it touches the file. A leftover ``.partial`` of a dead process (no lock) is reused."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = partial_path(path)
        try:
            fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise OutputError(f"cannot create {self.tmp}: {failure_reason(exc)}; choose another --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            same = os.fstat(fd).st_ino == os.stat(self.tmp).st_ino  # not renamed away meanwhile
        except OSError:
            same = False
        if not same:
            os.close(fd)
            raise OutputError(
                f"another capture is writing {self.tmp} (--out {path}): wait for it to finish, or choose another --out"
            )
        self._fd: int | None = fd

    def keep(self) -> None:
        """Rename ``<out>.partial`` to ``<out>`` and let go of it."""
        try:
            os.replace(self.tmp, self.path)
        finally:
            self.release()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the lock
            self._fd = None


class SignalStop:
    """SIGINT/SIGTERM while active (main thread only; the previous handlers are restored after).

    Each signal goes one level further, and none kills the process:

    1. the first is recorded in ``requested``: the loop stops after the current step;
    2. the next raises KeyboardInterrupt in the training loop (the current step is abandoned); while
       the file is being finished (``finishing``) it calls ``on_repeat`` instead (the writer drops the
       steps still queued);
    3. any later one calls ``on_repeat``.

    A signal during ``finishing`` that is the first of the run is only recorded: the steps are all
    computed, the queue is written out as usual.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested: list[str] = []
        self.finishing = False
        self.on_repeat = None
        self._raised = False
        self._old: dict = {}

    def _handler(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        self.requested.append(name)
        if len(self.requested) == 1:
            return
        if self.finishing or self._raised:
            if self.on_repeat is not None:
                self.on_repeat(name)
            return
        self._raised = True
        raise KeyboardInterrupt

    def __enter__(self) -> SignalStop:
        if self.enabled:
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.getsignal(s)
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old.clear()


class CaptureFile:
    """The output of one capture, from ``<out>.partial`` to ``<out>``.

    On enter: installs :class:`SignalStop` (before the file exists, so no signal can leave a
    half-created one) and takes ``<out>.partial`` (:class:`PartialFile`), so a second capture to the
    same ``--out`` is refused before any work. :meth:`open` creates the :class:`DumpWriter` and its
    :class:`StreamWriter` (``stream``). :meth:`finish` closes the file
    (signals still handled: a repeated one drops the queue instead of killing the process) and
    renames it to ``<out>``, or removes it when it holds no completed step and the run was stopped.
    Leaving the block with an exception finishes with the exception's name (completed steps kept).
    The handlers are restored only after that.
    """

    def __init__(self, path: Path, handle_signals: bool = True):
        self.path = path
        self.signals = SignalStop(handle_signals)
        self.requested = self.signals.requested
        self.stream: StreamWriter | None = None
        self.stopped: str | None = None
        """After :meth:`finish`: the interrupt reason written into the file (None: complete)."""
        self._partial: PartialFile | None = None
        self._finished = False

    def __enter__(self) -> CaptureFile:
        self.signals.__enter__()
        try:
            self._partial = PartialFile(self.path)
        except BaseException:
            self.signals.__exit__()
            raise
        return self

    def open(self, run: dict, compression: str, queue_bytes: int) -> StreamWriter:
        """Create the dump in ``<out>.partial`` and start its writer thread (``stream``)."""
        writer = DumpWriter(self._partial.tmp, run=run, compression=compression, force=True, locking=False)
        self.stream = StreamWriter(writer, queue_bytes)
        self.signals.on_repeat = self.stream.abandon
        return self.stream

    def finish(self, interrupted: str | None, on_drain: Callable[[int], None] | None = None) -> None:
        """Write what is queued, close, rename to ``<out>`` (see the class docstring).

        ``on_drain(bytes still queued)`` is called once, when from here on signals no longer stop a
        step but drop the queue. Raises :class:`DumpError` when the file could not be written; it
        then says which completed steps were kept, and where."""
        if self._finished:
            return
        self._finished = True
        self.signals.finishing = True
        stream = self.stream
        if on_drain is not None:
            on_drain(stream.queued_bytes)
        try:
            stream.close(interrupted)
            if stream.failed and stream.failure is not None:  # raised earlier, to the training loop
                raise stream.failure
        except DumpError as exc:
            kept = stream.writer.steps_flushed
            self.stopped = interrupted or "DumpError"
            if kept:
                self._partial.keep()
                raise DumpError(f"{exc}; the {kept} completed steps are kept in {self.path}") from None
            self._partial.discard()
            raise DumpError(f"{exc}; no step was completed, nothing is kept") from None
        self.stopped = interrupted or (stream.abandon_reason if stream.abandoned else None)
        if self.stopped is not None and stream.writer.steps_flushed == 0:
            self._partial.discard()
        else:
            self._partial.keep()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.stream is None:  # failed or interrupted before the file was created
                self._partial.discard()
                if exc_type is KeyboardInterrupt and self.requested:
                    raise Interrupted(
                        f"interrupted ({self.requested[0]}) while setting up: nothing was written to {self.path}"
                    ) from None
            elif not self._finished:
                reason = exc_type.__name__ if exc_type is not None else "not finished"
                if exc_type is KeyboardInterrupt and self.requested:
                    reason = self.requested[0]
                self.finish(reason)
        finally:
            self.signals.__exit__()
