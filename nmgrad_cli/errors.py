"""User-facing errors.

Every mistake a user can make (a bad pattern, a missing file, an unknown method) raises a subclass
of :class:`NmgradError` whose message is one line that says what to do. The CLI prints that line and
exits non-zero; library users catch the exception.
"""


class NmgradError(Exception):
    """A user error: the message says what is wrong and how to fix it."""

    exit_code = 2


class PatternError(NmgradError, ValueError):
    """An N:M pattern that is malformed or that a method cannot handle."""


class MethodError(NmgradError, KeyError):
    """An unknown pruning method name."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DumpError(NmgradError):
    """A dump file that is missing, not HDF5, of another schema, too new, truncated or empty."""


class OutputError(NmgradError):
    """An output path that cannot be written: a directory, or a missing or read-only folder."""


class OutputExistsError(OutputError):
    """An output path exists and ``--force`` was not given."""


class ImportSpecError(NmgradError):
    """A ``package.module:factory`` spec that cannot be imported or whose factory raised."""


class Interrupted(NmgradError):
    """Stopped by SIGINT/SIGTERM before anything worth keeping was written."""

    exit_code = 130


class RankLostError(NmgradError):
    """Under torchrun: another rank of the process group died (or its connection broke) mid-run."""

    exit_code = 1
