"""Exceptions the CLI reports on one line: problems a user can fix, and early stops of training."""

from __future__ import annotations


class UserInputError(ValueError):
    """A problem with the user's input; the CLI prints its message on one line and exits 2.

    The message must name the file, key or value at fault and say how to fix it.
    """


class ConfigKeyError(UserInputError):
    """A config key that does not exist or a value of the wrong type; the message names the key.

    Front ends add where the keys are listed (the CLI: ``alphastomics train --print_config``).
    """


class TrainingStopped(Exception):
    """Training stopped early (interrupted, or too many non-finite steps) in a known state.

    The CLI prints the message (what happened, which checkpoint holds what, how to go on) on one
    line and exits with ``exit_code``: 128 + the signal number after SIGINT/SIGTERM, 1 otherwise.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class OutputWriteError(OSError):
    """Writing an output failed (read-only folder, full disk): ``filename`` is the output.

    The CLI prints it on one line with the fix and exits 2; nothing half-written is left.
    """
